"""A folded mapped space answers exactly as the written one: same ids, same scores, under
exclusions, filters, deletions, items written after the index and items never mapped,
including mappers whose output lengths vary enough to force the candidate expansion."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embcompat.adapters import AffineAdapter, LinearMap, LowRankAdapter, ProcrustesAdapter, linear
from embcompat.arrays import l2_normalize, row_norms
from embcompat.index.faiss_index import IndexGenerations, SpaceSearcher
from embcompat.index.folded import FoldedSearcher
from embcompat.index.store import SpaceStore


def _mapper(kind: str, x: np.ndarray, y: np.ndarray, normalize: bool) -> LinearMap:
    d = "gallery: old->new"
    if kind == "procrustes":
        return ProcrustesAdapter.fit(x, y, direction=d, normalize_output=normalize)
    if kind == "lowrank":
        return LowRankAdapter.fit(x, y, direction=d, rank=4, normalize_output=normalize)
    return AffineAdapter.fit(x, y, direction=d, normalize_output=normalize)


@pytest.mark.parametrize("kind", ["procrustes", "affine", "lowrank"])
@pytest.mark.parametrize(("d_old", "d_new"), [(16, 16), (12, 20), (20, 12)])
@pytest.mark.parametrize("block", [7, 2048])  # blocks that split the rows, and one
def test_output_norms_are_the_lengths_of_the_unnormalised_outputs(
    kind: str, d_old: int, d_new: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linear, "NORM_BLOCK", block)
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(300, d_old)).astype(np.float32))
    y = l2_normalize((x @ rng.normal(size=(d_old, d_new)) + 0.5).astype(np.float32))
    mapper = _mapper(kind, x, y, normalize=False)
    want = row_norms(mapper.transform(x))[:, 0]
    kept = x.copy()
    np.testing.assert_allclose(mapper.output_norms(x), want, rtol=1e-4)
    np.testing.assert_array_equal(x, kept)  # often a view of a shard: never written


def _world(
    root: Path,
    seed: int,
    n: int,
    kind: str,
    normalize: bool,
    spread: float,
    mapped_share: float = 0.9,
    heavy: int = 256,
    scan_block: int = 65_536,
) -> dict:
    """An old space (indexed, then changed), its mapper, and both forms of the mapped
    space over the same items: written vectors and folded scales. `mapped_share`: the
    share of items mapped (a map step under way maps few)."""
    rng = np.random.default_rng(seed)
    d_old, d_new = 8, 10
    x = l2_normalize(rng.normal(size=(n, d_old)).astype(np.float32))
    # targets whose mapped lengths differ a lot: the rescaling reorders the old ranking
    y = (x @ rng.normal(size=(d_old, d_new)) * (1 + spread * rng.random((n, 1)))).astype(np.float32)
    mapper = _mapper(kind, x, y + spread * rng.normal(size=d_new).astype(np.float32), normalize)
    ids = np.arange(n) * 3 + 5
    old = SpaceStore(root / "old", d_old)
    first = n * 3 // 4
    old.add(ids[:first], x[:first])
    gens = IndexGenerations(root / "old-idx")
    gens.publish(old)
    old.add(ids[first:], x[first:])  # written after the generation: scanned beside it
    deleted = ids[rng.random(n) < 0.1]
    old.delete(deleted)
    mapped_ids = ids[rng.random(n) < mapped_share]  # the rest were never mapped
    rows = np.searchsorted(ids, mapped_ids)
    written = SpaceStore(root / "written", d_new)
    written.add(mapped_ids, mapper.transform(x[rows]))
    written.delete(deleted)
    scales = SpaceStore(root / "scales", 1)
    r = 1 / mapper.output_norms(x[rows]) if normalize else np.ones(len(rows), np.float32)
    scales.add(mapped_ids, r[:, None])
    scales.delete(deleted)
    return {
        "ids": ids,
        "rng": rng,
        "written": SpaceSearcher(written, IndexGenerations(root / "written-idx")),
        "folded": FoldedSearcher(SpaceSearcher(old, gens), mapper, scales, heavy, scan_block),
        "queries": l2_normalize(rng.normal(size=(6, d_new)).astype(np.float32)),
    }


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(40, 400),
    kind=st.sampled_from(["procrustes", "affine", "lowrank"]),
    normalize=st.booleans(),
    spread=st.sampled_from([0.0, 0.5, 3.0]),
    k=st.integers(1, 30),
    filtered=st.sampled_from(["none", "exclude", "allow", "both"]),
    mapped_share=st.sampled_from([0.02, 0.5, 0.9]),
    heavy=st.sampled_from([0, 3, 256]),  # 0 and 3: the index path, not a scan
    scan_block=st.sampled_from([7, 65_536]),
)
def test_folded_search_equals_the_written_mapped_space(
    seed: int,
    n: int,
    kind: str,
    normalize: bool,
    spread: float,
    k: int,
    filtered: str,
    mapped_share: float,
    heavy: int,
    scan_block: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        w = _world(Path(tmp), seed, n, kind, normalize, spread, mapped_share, heavy, scan_block)
        rng, ids = w["rng"], w["ids"]
        exclude = np.sort(ids[rng.random(n) < 0.3]) if filtered in ("exclude", "both") else None
        allow = np.sort(ids[rng.random(n) < 0.5]) if filtered in ("allow", "both") else None
        want_s, want_i = w["written"].search(w["queries"], k, exclude=exclude, allow=allow)
        got_s, got_i = w["folded"].search(w["queries"], k, exclude=exclude, allow=allow)
    assert got_s.shape == want_s.shape == (6, k)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-5)
    with np.errstate(invalid="ignore"):  # -inf minus -inf in empty slots
        gaps = np.abs(np.diff(want_s, axis=1))
    for row in range(len(want_i)):  # ids agree wherever the scores are not tied
        if not (gaps[row][np.isfinite(gaps[row])] < 1e-4).any():
            assert got_i[row].tolist() == want_i[row].tolist()


def test_a_wide_spread_of_scales_grows_the_candidates_until_the_bound_holds(
    tmp_path: Path,
) -> None:
    """One item ranked 100th by the old index, with a scale a thousand times the others:
    only growing the candidates past the first fetch finds it."""
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(500, 8)).astype(np.float32))
    mapper = ProcrustesAdapter.fit(x, x, direction="gallery: old->new", center=False)
    old = SpaceStore(tmp_path / "old", 8)
    old.add(np.arange(500), x)
    q = x[:1]
    far = int(np.argsort(-(x @ q[0]))[100])
    assert float(x[far] @ q[0]) > 0
    r = np.ones((500, 1), np.float32)
    r[far] = 1e3
    scales = SpaceStore(tmp_path / "scales", 1)
    scales.add(np.arange(500), r)
    searcher = SpaceSearcher(old, IndexGenerations(tmp_path / "idx"))
    folded = FoldedSearcher(searcher, mapper, scales, heavy=0)  # no item scored up front
    s, got = folded.search(q, 5)
    assert got[0, 0] == far and s[0, 0] == pytest.approx(1e3 * float(x[far] @ q[0]), rel=1e-4)


class CountingSearcher(SpaceSearcher):
    """A real searcher that records how many candidates each call asked for."""

    asked: list[int]

    def search(self, queries, k, exclude=None, budget=1.0, allow=None):  # type: ignore[no-untyped-def]
        self.asked.append(k)
        return super().search(queries, k, exclude, budget, allow)


def _counting(root: Path, x: np.ndarray) -> CountingSearcher:
    old = SpaceStore(root / "old", x.shape[1])
    old.add(np.arange(len(x)), x)
    gens = IndexGenerations(root / "idx")
    gens.publish(old)
    searcher = CountingSearcher(old, gens)
    searcher.asked = []
    return searcher


def _brute(mapper: LinearMap, x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple:
    scores = q @ mapper.transform(x[ids]).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), ids[top]


def test_a_map_step_under_way_never_sends_a_query_through_the_whole_space(
    tmp_path: Path,
) -> None:
    """Mid map step, most old items have no scale yet and rank among the first
    candidates: the few mapped items are scanned, never more candidates fetched than
    there are mapped items (it was every item of the space, per query)."""
    rng = np.random.default_rng(5)
    n = 5000
    x = l2_normalize(rng.normal(size=(n, 16)).astype(np.float32))
    y = l2_normalize((x @ rng.normal(size=(16, 16)) + 0.3).astype(np.float32))
    mapper = AffineAdapter.fit(x, y, direction="gallery: old->new", normalize_output=True)
    searcher = _counting(tmp_path, x)
    q = l2_normalize(rng.normal(size=(5, 16)).astype(np.float32))
    for mapped in (0, 40, 300, 1200):
        scales = SpaceStore(tmp_path / f"scales-{mapped}", 1)
        ids = np.sort(rng.choice(n, mapped, replace=False))
        if mapped:
            scales.add(ids, (1 / mapper.output_norms(x[ids]))[:, None])
        searcher.asked.clear()
        s, i = FoldedSearcher(searcher, mapper, scales, heavy=8).search(q, 10)
        assert max(searcher.asked, default=0) <= max(mapped, 64), mapped
        if mapped == 0:
            assert (i == -1).all()
            continue
        want_s, want_i = _brute(mapper, x, ids, q, 10)
        np.testing.assert_allclose(s, want_s, rtol=1e-4, atol=1e-5)
        assert (i == want_i).mean() > 0.99


def test_one_item_of_near_zero_mapped_length_does_not_widen_every_query(
    tmp_path: Path,
) -> None:
    """An old vector the mapper sends to (almost) zero has a scale near 1e12; a bound
    over every scale would then fetch the whole space for every query. It is scored
    exactly instead, and the others bound the rest."""
    rng = np.random.default_rng(6)
    n = 4000
    x = l2_normalize(rng.normal(size=(n, 16)).astype(np.float32))
    x[17] = 0.0  # an empty vector: x W + c = 0 for a mapper without offset
    mapper = ProcrustesAdapter.fit(
        x, x @ np.linalg.qr(rng.normal(size=(16, 16)))[0].astype(np.float32),
        direction="gallery: old->new", center=False, normalize_output=True,
    )  # fmt: skip
    searcher = _counting(tmp_path, x)
    scales = SpaceStore(tmp_path / "scales", 1)
    scales.add(np.arange(n), (1 / mapper.output_norms(x))[:, None])
    assert scales.get(np.array([17]))[0][0, 0] > 1e6
    q = l2_normalize(rng.normal(size=(8, 16)).astype(np.float32))
    s, i = FoldedSearcher(searcher, mapper, scales).search(q, 10)
    assert max(searcher.asked) < n // 4
    want_s, want_i = _brute(mapper, x, np.arange(n), q, 10)
    np.testing.assert_allclose(s, want_s, rtol=1e-4, atol=1e-5)
    assert (i == want_i).all()


@pytest.mark.parametrize("kind", ["procrustes", "affine", "lowrank"])
def test_output_norms_hold_in_an_anisotropic_old_space(kind: str) -> None:
    """Old vectors a mean cosine of 0.999 apart: x W and the offset c are long and
    nearly opposite, and their float32 difference lost four digits of the length (the
    scale of every item, so the order of near ties)."""
    rng = np.random.default_rng(8)
    d = 64
    base = rng.normal(size=d) / np.sqrt(d)
    x = l2_normalize((base + 0.03 * rng.normal(size=(4000, d)) / np.sqrt(d)).astype(np.float32))
    y = l2_normalize(((x - x.mean(0)) @ rng.normal(size=(d, d))).astype(np.float32))
    mapper = _mapper(kind, x, y, normalize=True)
    w = mapper.weight.astype(np.float64)
    c = mapper.mu_y.astype(np.float64) - mapper.mu_x.astype(np.float64) @ w
    truth = np.linalg.norm(x.astype(np.float64) @ w + c, axis=1)
    np.testing.assert_allclose(mapper.output_norms(x), truth, rtol=2e-5)
