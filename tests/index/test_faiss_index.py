"""Index generations: exact answers for every kind, atomic publish under concurrent
searches, writes visible before a rebuild, corrupt files refused while still serving."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from embcompat.arrays import l2_normalize
from embcompat.errors import CorruptArtifact, DimensionMismatch
from embcompat.index import binary, faiss_index
from embcompat.index.faiss_index import IndexGenerations, SpaceSearcher
from embcompat.index.store import SpaceStore


@pytest.fixture
def space(tmp_path: Path) -> tuple[SpaceStore, np.ndarray]:
    x = l2_normalize(np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32))
    store = SpaceStore(tmp_path / "s", 16)
    store.add(np.arange(1000) * 3, x)  # ids that are not row numbers
    return store, x


def _brute(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1)[:, :k] * 3


@pytest.mark.parametrize(("kind", "min_recall"), [("flat", 1.0), ("hnsw", 0.95), ("ivf", 0.5)])
def test_each_index_kind_answers_like_brute_force(
    space: tuple[SpaceStore, np.ndarray], tmp_path: Path, kind: str, min_recall: float
) -> None:
    store, x = space
    gens = IndexGenerations(tmp_path / f"idx-{kind}", kind)  # type: ignore[arg-type]
    gens.publish(store)
    _, ids = SpaceSearcher(store, gens).search(x[:50], 10)
    truth = _brute(x, x[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= min_recall


def test_writes_after_a_generation_are_visible_at_once(
    space: tuple[SpaceStore, np.ndarray], tmp_path: Path
) -> None:
    store, x = space
    gens = IndexGenerations(tmp_path / "idx")
    gens.publish(store)
    searcher = SpaceSearcher(store, gens)
    store.add([7777], x[:1])  # a new item identical to item 0
    store.delete([0])  # item 0 leaves
    _, ids = searcher.search(x[:1], 3)
    assert ids[0, 0] == 7777 and 0 not in ids[0]


def test_search_during_publish_gets_complete_results_from_one_generation(
    space: tuple[SpaceStore, np.ndarray], tmp_path: Path
) -> None:
    store, x = space
    gens = IndexGenerations(tmp_path / "idx")
    gens.publish(store)
    searcher = SpaceSearcher(store, gens)
    truth = _brute(x, x[:20], 10)
    stop, errors, seen_gens = threading.Event(), [], set()

    def publisher() -> None:
        while not stop.is_set():
            gens.publish(store)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for _ in range(200):
            _, ids = searcher.search(x[:20], 10)
            seen_gens.add(gens.current_number())
            if not np.array_equal(ids, truth):
                errors.append(ids)
    finally:
        stop.set()
        thread.join()
    assert not errors, "a search saw a partial or mixed index"
    assert len(seen_gens) > 1, "no generation was published during the searches"


def test_corrupt_index_file_is_refused_and_the_space_stays_servable(
    space: tuple[SpaceStore, np.ndarray], tmp_path: Path
) -> None:
    store, x = space
    gens = IndexGenerations(tmp_path / "idx")
    number = gens.publish(store)
    (tmp_path / "idx" / f"gen-{number:06d}" / "index.faiss").write_bytes(b"\0" * 64)
    with pytest.raises(CorruptArtifact, match="fails its checksum"):
        IndexGenerations(tmp_path / "idx").load()
    searcher = SpaceSearcher(store, IndexGenerations(tmp_path / "idx"))
    _, ids = searcher.search(x[:5], 10)
    np.testing.assert_array_equal(ids, _brute(x, x[:5], 10))
    assert "fails its checksum" in (searcher.last_error or "")
    gens.publish(store)  # a rebuild heals it
    assert IndexGenerations(tmp_path / "idx").load() is not None


def test_query_of_the_wrong_dim_is_refused(
    space: tuple[SpaceStore, np.ndarray], tmp_path: Path
) -> None:
    store, _ = space
    gens = IndexGenerations(tmp_path / "idx")
    gens.publish(store)
    with pytest.raises(DimensionMismatch, match="expects dim 16, got 8"):
        SpaceSearcher(store, gens).search(np.zeros((1, 8), np.float32), 5)


@pytest.mark.parametrize("share", [0.0, 0.5, 0.97])
def test_excluded_ids_never_come_back_and_k_stays_full(
    space: tuple[SpaceStore, np.ndarray], tmp_path: Path, share: float
) -> None:
    store, x = space
    gens = IndexGenerations(tmp_path / "idx")
    gens.publish(store)
    rng = np.random.default_rng(1)
    excluded_rows = rng.permutation(1000)[: int(share * 1000)]
    kept = np.setdiff1d(np.arange(1000), excluded_rows)
    _, ids = SpaceSearcher(store, gens).search(x[:20], 10, exclude=np.sort(excluded_rows) * 3)
    truth = kept[np.argsort(-(x[:20] @ x[kept].T), axis=1)[:, :10]] * 3
    np.testing.assert_array_equal(ids, truth)


def test_ivfpq_keeps_codes_in_memory_and_reranks_with_the_stored_floats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IVF-PQ: 16 bytes of code a 64-d vector, yet the re-rank from the floats on disk
    gives nearly exact answers; deletes, later writes and allow-sets hold as in flat."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(64, 64))
    x = l2_normalize((centres[rng.integers(0, 64, 12_000)] + 0.4 * rng.normal(size=(12_000, 64)))
                     .astype(np.float32))  # fmt: skip
    store = SpaceStore(tmp_path / "s", 64)
    store.add(np.arange(12_000) * 3, x)
    gens = IndexGenerations(tmp_path / "idx", "ivfpq")
    gens.publish(store)
    gen = gens.load(store)
    assert gen is not None and type(gen.index).__name__ == "PQRerankIndex"
    assert gen.index.index.code_size == 16  # type: ignore[union-attr]
    searcher = SpaceSearcher(store, gens)
    q = x[:100]
    scores, ids = searcher.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10] * 3
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.9
    np.testing.assert_allclose(scores[:, 0], (q * x[ids[:, 0] // 3]).sum(1), rtol=1e-5)  # exact

    monkeypatch.setattr(faiss_index, "EXACT_SCAN", 0)  # 10 % goes through the codes
    allow = np.arange(0, 12_000 * 3, 3)[rng.random(12_000) < 0.1]
    _, hit = searcher.search(q, 10, allow=allow)
    assert np.isin(hit, allow).all()
    sub = x[allow // 3]
    truth = allow[np.argsort(-(q @ sub.T), axis=1)[:, :10]]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hit, truth, strict=True)]) >= 0.9

    store.delete([0])
    store.add([99_999], x[:1])
    _, ids = searcher.search(x[:1], 3)
    assert ids[0, 0] == 99_999 and 0 not in ids


def test_ivfpq_fills_k_when_most_of_the_index_is_excluded(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12_000, 16)).astype(np.float32)
    store = SpaceStore(tmp_path / "s", 16)
    store.add(np.arange(12_000), x)
    gens = IndexGenerations(tmp_path / "idx", "ivfpq", "l2")
    gens.publish(store)
    excluded = np.sort(rng.permutation(12_000)[:11_400])  # 600 left
    scores, ids = SpaceSearcher(store, gens).search(x[:3], 100, exclude=excluded)
    assert ((ids >= 0).sum(1) == 100).all() and not np.isin(ids, excluded).any()
    kept = np.setdiff1d(np.arange(12_000), excluded)
    truth = kept[np.argsort(((x[kept][None] - x[:3, None]) ** 2).sum(-1), axis=1)[:, :10]]
    assert np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]) >= 0.9


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_an_index_built_shard_by_shard_answers_as_one_built_from_every_vector(
    tmp_path: Path, kind: str
) -> None:
    """Publishing adds vectors shard by shard from the memory-mapped files; it never joins
    the space's floats in memory (at 10M 128-d vectors, 5 GB more). IVF trains on the
    same rows k-means would take (all of them at this size), so its lists agree too."""
    store = SpaceStore(tmp_path / "s", 8)
    x = l2_normalize(np.random.default_rng(0).normal(size=(700, 8)).astype(np.float32))
    ids = np.random.default_rng(1).permutation(10_000)[:700].astype(np.int64)
    for a, b in ((0, 100), (100, 350), (350, 700)):
        store.add(ids[a:b], x[a:b])
    snap = store.snapshot()
    assert len(snap.shards) == 3
    built = faiss_index.build_from_snapshot(snap, kind, "ip")  # type: ignore[arg-type]
    assert "vectors" not in snap.__dict__
    whole = faiss_index.build_index(x, ids, kind, "ip")  # type: ignore[arg-type]
    q = x[:20]
    got, want = built.search(q, 5), whole.search(q, 5)
    if kind in ("flat", "ivf"):  # IVF: the same training rows in the same order
        np.testing.assert_array_equal(got[1], want[1])
    assert (got[1][:, 0] == ids[:20]).all()  # every query finds itself first


def test_binary_codes_come_block_by_block_from_the_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary publish fits its binarizer on sampled rows and codes the space a block
    at a time (blocks here split every shard): the codes of every vector, in row order,
    with the floats never joined in memory."""
    monkeypatch.setattr(binary, "CODE_BLOCK", 64)
    store = SpaceStore(tmp_path / "s", 16)
    x = l2_normalize(np.random.default_rng(0).normal(size=(700, 16)).astype(np.float32))
    for a, b in ((0, 100), (100, 350), (350, 700)):
        store.add(np.arange(a, b), x[a:b])
    snap = store.snapshot()
    binarizer, fresh = binary.ensure_binarizer(tmp_path / "idx", snap)
    codes = binary.snapshot_codes(binarizer, snap)
    assert fresh and "vectors" not in snap.__dict__
    np.testing.assert_array_equal(codes, binarizer.codes(x))
