"""Binary serving stage: Hamming candidates, float re-ranking read from disk, mixed stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embcompat.adapters.binary import ITQBinarizer, RecurrentBinarizer
from embcompat.errors import CorruptArtifact, DimensionMismatch, InvalidInput
from embcompat.index.binary import BinaryIndex, TwoStageSearcher
from embcompat.index.store import SpaceStore
from tests.adapters.test_binary import clustered


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b, strict=True)]))


@pytest.fixture
def gallery(tmp_path: Path) -> tuple[SpaceStore, np.ndarray, np.ndarray]:
    x = clustered(2000, d=32, seed=1)
    ids = np.arange(1000, 3000, dtype=np.int64)
    store = SpaceStore(tmp_path / "space", dim=32)
    store.add(ids[:1200], x[:1200])
    store.add(ids[1200:], x[1200:])  # two shards
    return store, ids, x


def test_read_from_disk_matches_get(gallery: tuple[SpaceStore, np.ndarray, np.ndarray]) -> None:
    store, ids, x = gallery
    store.add(ids[:5], x[5:10], replace=True)  # moved rows live in a newer shard
    store.delete(ids[10:12])
    ask = np.array([ids[3], 7, ids[1500], ids[11], ids[0]], np.int64)
    got, found = store.get(ask)  # rows read from the memory-mapped shards
    snap = store.snapshot()
    rows, want_found = snap.positions(ask)
    want = np.where(want_found[:, None], snap.vectors[rows], 0)  # the space in memory
    assert np.array_equal(found, want_found) and found.tolist() == [True, False, True, False, True]
    assert np.array_equal(got, want)
    assert np.array_equal(got[0], x[8]) and not got[1].any()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_reranking_recovers_exact_float_search(
    gallery: tuple[SpaceStore, np.ndarray, np.ndarray], kind: str
) -> None:
    store, ids, x = gallery
    binarizer = ITQBinarizer.fit(x, 4.0)
    index = BinaryIndex.build(binarizer.codes(x), ids, kind)  # type: ignore[arg-type]
    searcher = TwoStageSearcher(binarizer, index, [store])
    q = clustered(100, d=32, seed=2)
    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    _, hamming = searcher.search(q, 10, rerank=0)
    scores, reranked = searcher.search(q, 10, rerank=300)
    assert (
        overlap(reranked, exact) >= 0.9 and overlap(reranked, exact) > overlap(hamming, exact) + 0.1
    )
    assert (reranked >= 0).all() and np.all(np.diff(scores, axis=1) <= 0)
    vectors, _ = store.get(reranked[0])
    assert np.allclose(scores[0], vectors @ q[0], atol=1e-5)  # exact float scores


def test_mixed_stores_rerank_each_item_from_the_store_holding_it(tmp_path: Path) -> None:
    x = clustered(600, d=32, seed=3)
    ids = np.arange(600, dtype=np.int64)
    new, mapped = SpaceStore(tmp_path / "new", 32), SpaceStore(tmp_path / "mapped", 32)
    new.add(ids[:300], x[:300])
    mapped.add(ids[200:300], x[200:300] * 0.5)  # mid-move: in both stores; new wins
    mapped.add(ids[300:], x[300:])
    binarizer = ITQBinarizer.fit(x, 1.0)
    searcher = TwoStageSearcher(
        binarizer, BinaryIndex.build(binarizer.codes(x), ids), [new, mapped]
    )
    scores, got = searcher.search(x[[250, 450]], 1, rerank=50)
    assert got[:, 0].tolist() == [250, 450]
    assert np.allclose(scores[:, 0], [1.0, 1.0], atol=1e-5)
    with pytest.raises(InvalidInput, match="item id twice"):
        BinaryIndex.build(binarizer.codes(x[:2]), np.array([1, 1]))


def test_save_load_and_corruption(
    gallery: tuple[SpaceStore, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    _, ids, x = gallery
    binarizer = ITQBinarizer.fit(x, 2.0)
    index = BinaryIndex.build(binarizer.codes(x), ids, "hnsw")
    index.save(tmp_path / "bin")
    loaded = BinaryIndex.load(tmp_path / "bin")
    codes = binarizer.codes(x[:20])
    assert np.array_equal(loaded.search(codes, 5)[1], index.search(codes, 5)[1])
    assert loaded.kind == "hnsw" and loaded.memory_bytes() == index.memory_bytes()
    blob = bytearray((tmp_path / "bin" / "binary.faiss").read_bytes())
    blob[100] ^= 0xFF
    (tmp_path / "bin" / "binary.faiss").write_bytes(bytes(blob))
    with pytest.raises(CorruptArtifact, match="fails its checksum"):
        BinaryIndex.load(tmp_path / "bin")


def test_wrong_dims_are_refused(
    gallery: tuple[SpaceStore, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    store, ids, x = gallery
    binarizer = ITQBinarizer.fit(x, 1.0)
    index = BinaryIndex.build(binarizer.codes(x), ids)
    searcher = TwoStageSearcher(binarizer, index, [store])
    with pytest.raises(DimensionMismatch, match="expects dim 32, got 31"):
        searcher.search(np.zeros((1, 31), np.float32), 5)
    with pytest.raises(DimensionMismatch, match="32-bit codes"):
        index.search(np.zeros((1, 8), np.uint8), 5)
    with pytest.raises(DimensionMismatch, match="holds dim 16"):
        TwoStageSearcher(binarizer, index, [SpaceStore(tmp_path / "small", 16)])
    with pytest.raises(DimensionMismatch, match="emits 32 bits"):
        TwoStageSearcher(binarizer, BinaryIndex.build(ITQBinarizer.fit(x, 2.0).codes(x), ids))
    with pytest.raises(InvalidInput, match="unknown binary index kind 'ivf'"):
        BinaryIndex.build(binarizer.codes(x), ids, "ivf")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_codes_rescored_from_the_index_without_float_reads(
    gallery: tuple[SpaceStore, np.ndarray, np.ndarray], kind: str
) -> None:
    _, ids, x = gallery
    binarizer = RecurrentBinarizer.fit(x, 2, hidden=16, epochs=2)
    index = BinaryIndex.build(binarizer.codes(x), ids, kind)  # type: ignore[arg-type]
    assert np.array_equal(index.stored_codes(), binarizer.codes(x))  # a view, same bytes
    searcher = TwoStageSearcher(binarizer, index)  # no stores: codes only
    q = clustered(100, d=32, seed=2)
    exact = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    _, hamming = searcher.search(q, 10, rerank=0)
    scores, rescored = searcher.search(q, 10, rerank=0, code_rerank=200)
    assert overlap(rescored, exact) > overlap(hamming, exact)
    want = binarizer.asymmetric_scores(q[:1], binarizer.codes(x[rescored[0] - 1000])[None])[0]
    assert np.allclose(scores[0], want, atol=1e-4) and np.all(np.diff(scores, axis=1) <= 1e-6)
