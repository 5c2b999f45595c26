"""The mapped space of a linear mapper, searched without being written.

A gallery-side linear mapper sends an old vector x to y = (x W + c) · r_x, where
r_x = 1 / ‖x W + c‖ (1 when it does not normalise). A new query q scores it
q · y = ((q Wᵀ) · x + q · c) · r_x, so the mapped plan can search the old space's own
index with the folded query q Wᵀ and rescale each candidate by its r_x. The map step
then writes one float per item (the `scales` space, of dim 1) instead of d_new floats,
and no second index is published: on this machine's disk, writing the mapped vectors
durably costs several times the matrix product that computes them.

Rescaling can reorder: an item below the K candidates fetched could still win if its
r is larger. Every item outside them has a numerator at most the K-th one, a_K, so none
scores above a_K · r_max (a_K · r_min when a_K < 0). While the k-th rescaled score is
under that bound, K grows eightfold. Two things keep that growth short:
- the HEAVY items of largest scale are scored exactly on every query and r_max is taken
  over the others, so one item of tiny mapped length (a near-zero vector: r up to 1e12)
  does not send every query through the whole space;
- once the space's scaled items are no more than the candidates about to be fetched (a
  map step under way: most old items have no scale yet), those items are scanned
  exactly instead, in blocks, so a query never asks the index for more candidates than
  there are mapped items.
Over an exact (flat) index the answer is therefore the materialised mapped space's own
top k; over a graph or code index it is as approximate as that index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embcompat.adapters.linear import LinearMap
from embcompat.arrays import BoolArray, FloatArray, IdArray, check_vectors, member
from embcompat.index.faiss_index import SpaceSearcher
from embcompat.index.store import Snapshot, SpaceStore

EXPAND = 8  # candidates grow by this factor while the bound is not met
HEAVY = 256  # items of largest scale, scored exactly on every query
SCAN_BLOCK = 65_536  # rows per block of an exact scan


@dataclass(frozen=True)
class ScaleSummary:
    """One snapshot of the scales: the HEAVY largest (ids sorted, with their scales) and
    the range of all the others (1, 1 when there are none)."""

    snap: Snapshot
    heavy: IdArray
    heavy_r: FloatArray
    lo: float
    hi: float


def summarize(snap: Snapshot, heavy: int = HEAVY) -> ScaleSummary:
    """snap: a scales space's snapshot (dim 1) → its ScaleSummary; O(n) once per snapshot."""
    r = snap.vectors[:, 0] if len(snap) else np.zeros(0, np.float32)
    h = min(heavy, len(r))
    top = np.argpartition(-r, h - 1)[:h] if h else np.zeros(0, np.int64)
    rest = np.ones(len(r), bool)
    rest[top] = False
    order = np.argsort(snap.ids[top])
    lo, hi = (float(r[rest].min()), float(r[rest].max())) if rest.any() else (1.0, 1.0)
    return ScaleSummary(snap, snap.ids[top][order], r[top][order], lo, hi)


class FoldedSearcher:
    """Searches `old` as if every item stored there were mapped by `mapper`, with the
    items' scales (1 / output length) in `scales`; an item without a scale is not in
    the mapped space (not mapped yet, or deleted since) and is never returned."""

    def __init__(
        self,
        old: SpaceSearcher,
        mapper: LinearMap,
        scales: SpaceStore,
        heavy: int = HEAVY,
        scan_block: int = SCAN_BLOCK,
    ) -> None:
        self.old = old
        self.mapper = mapper
        self.scales = scales
        self.heavy = heavy
        self.scan_block = scan_block
        self._summary: ScaleSummary | None = None

    def summary(self) -> ScaleSummary:
        """The scales' summary for their current snapshot, recomputed only when it changes."""
        snap = self.scales.snapshot()
        kept = self._summary
        if kept is None or kept.snap is not snap:
            kept = self._summary = summarize(snap, self.heavy)
        return kept

    def search(
        self,
        queries: FloatArray,
        k: int,
        exclude: IdArray | None = None,
        budget: float = 1.0,
        allow: IdArray | None = None,
    ) -> tuple[FloatArray, IdArray]:
        """As `SpaceSearcher.search`, with queries in the mapped (new) space."""
        q = check_vectors(queries, self.mapper.target_dim, "search of a folded mapped space")
        folded = np.ascontiguousarray(q @ self.mapper.weight.T, np.float32)
        shift = (q @ self.mapper.offset).astype(np.float32)
        summary = self.summary()  # one snapshot of the scales for the whole search
        old = self.old.store.snapshot()
        n, m = len(old), len(summary.snap)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        fetch = min(max(4 * k, 64), max(n, 1))
        if m <= max(fetch, len(summary.heavy)):  # few items mapped: scan them all
            mapped = summary.snap.sorted_ids
            return self._scan(folded, shift, k, summary, old, mapped, exclude, allow)
        h_ids = self._eligible(summary.heavy, old, exclude, allow)
        h_r = summary.heavy_r[member(h_ids, summary.heavy)]  # h_ids: a sorted subset
        h_s = self._scores(folded, shift, old, h_ids, h_r)  # (nq, heavy) exact
        todo = np.arange(len(q))
        while len(todo):
            s, i = self.old.search(folded[todo], fetch, exclude, budget, allow)
            a = s + shift[todo, None]
            r, found = _lookup(summary.snap, i.ravel())
            scored = (i >= 0) & found.reshape(i.shape) & ~member(summary.heavy, i)
            score = np.where(scored, a * np.where(scored, r.reshape(i.shape), 1), -np.inf)
            score = np.concatenate([score, h_s[todo]], axis=1)
            ids = np.concatenate([i, np.broadcast_to(h_ids, (len(todo), len(h_ids)))], axis=1)
            top = np.argsort(-score, axis=1, kind="stable")[:, :k]
            top_s = np.take_along_axis(score, top, 1)
            top_i = np.where(np.isfinite(top_s), np.take_along_axis(ids, top, 1), -1)
            a_last = np.where(i >= 0, a, np.inf).min(1)  # the K-th numerator fetched
            bound = np.where(a_last >= 0, a_last * summary.hi, a_last * summary.lo)
            exhausted = (i >= 0).sum(1) < fetch  # the index had no more to give
            kth = top_s[:, k - 1] if top_s.shape[1] == k else np.full(len(todo), -np.inf)
            done = exhausted | (kth >= bound) | (fetch >= n)
            width = top_s.shape[1]
            out_s[todo[done], :width], out_i[todo[done], :width] = top_s[done], top_i[done]
            todo, fetch = todo[~done], min(fetch * EXPAND, n)
            if len(todo) and m <= fetch:  # more candidates than mapped items: scan those
                s_, i_ = self._scan(
                    folded[todo], shift[todo], k, summary, old, summary.snap.sorted_ids,
                    exclude, allow,
                )  # fmt: skip
                out_s[todo], out_i[todo] = s_, i_
                break
        return out_s, out_i

    @staticmethod
    def _eligible(
        ids: IdArray, old: Snapshot, exclude: IdArray | None, allow: IdArray | None
    ) -> IdArray:
        """The `ids` (sorted) live in the old space, not excluded and allowed."""
        keep = old.positions(ids)[1]
        if exclude is not None and len(exclude):
            keep &= ~member(exclude, ids)
        if allow is not None:
            keep &= member(allow, ids)
        return ids[keep]

    @staticmethod
    def _scores(
        folded: FloatArray, shift: FloatArray, old: Snapshot, ids: IdArray, r: FloatArray
    ) -> FloatArray:
        """(nq, len(ids)) mapped scores of `ids` (live in `old`) with scales `r`."""
        if len(ids) == 0:
            return np.zeros((len(folded), 0), np.float32)
        x = old.rows(old.positions(ids)[0])
        return ((folded @ x.T + shift[:, None]) * r[None, :]).astype(np.float32)

    def _scan(
        self,
        folded: FloatArray,
        shift: FloatArray,
        k: int,
        summary: ScaleSummary,
        old: Snapshot,
        mapped: IdArray,
        exclude: IdArray | None,
        allow: IdArray | None,
    ) -> tuple[FloatArray, IdArray]:
        """Exact top k over every mapped item, `scan_block` rows at a time."""
        if allow is not None and len(allow) < len(mapped):
            mapped = allow[member(mapped, allow)]
        best_s = np.full((len(folded), 0), -np.inf, np.float32)
        best_i = np.zeros((len(folded), 0), np.int64)
        for start in range(0, len(mapped), self.scan_block):
            ids = self._eligible(mapped[start : start + self.scan_block], old, exclude, allow)
            r, _ = _lookup(summary.snap, ids)
            s = np.concatenate([best_s, self._scores(folded, shift, old, ids, r)], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(ids, (len(folded), len(ids)))], axis=1)
            if s.shape[1] > k:  # partition first: a full sort of each block is O(B log B)
                part = np.argpartition(-s, k - 1, axis=1)[:, :k]
                s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
            top = np.argsort(-s, axis=1, kind="stable")
            best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        out_s = np.full((len(folded), k), -np.inf, np.float32)
        out_i = np.full((len(folded), k), -1, np.int64)
        out_s[:, : best_s.shape[1]], out_i[:, : best_i.shape[1]] = best_s, best_i
        return out_s, np.where(np.isfinite(out_s), out_i, -1)


def _lookup(snap: Snapshot, ids: IdArray) -> tuple[FloatArray, BoolArray]:
    """ids (n,) → their scales in `snap` (1 where missing) and a found mask."""
    rows, found = snap.positions(np.asarray(ids, np.int64))
    r = np.ones(len(ids), np.float32)
    if found.any():
        r[found] = snap.rows(rows[found])[:, 0]
    return r, found
