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
under that bound, K grows eightfold, up to the whole space. Over an exact (flat) index
the answer is therefore the materialised mapped space's own top k; over a graph or code
index it is as approximate as that index.
"""

from __future__ import annotations

import numpy as np

from embcompat.adapters.linear import LinearMap
from embcompat.arrays import FloatArray, IdArray, check_vectors
from embcompat.index.faiss_index import SpaceSearcher
from embcompat.index.store import Snapshot, SpaceStore

EXPAND = 8  # candidates grow by this factor while the bound is not met


class FoldedSearcher:
    """Searches `old` as if every item stored there were mapped by `mapper`, with the
    items' scales (1 / output length) in `scales`; an item without a scale is not in
    the mapped space (not mapped yet, or deleted since) and is never returned."""

    def __init__(self, old: SpaceSearcher, mapper: LinearMap, scales: SpaceStore) -> None:
        self.old = old
        self.mapper = mapper
        self.scales = scales
        self._range: tuple[Snapshot, float, float] | None = None

    def scale_range(self) -> tuple[float, float]:
        """(smallest, largest) scale in the space, recomputed only when it changes."""
        snap = self.scales.snapshot()
        if self._range is None or self._range[0] is not snap:
            r = snap.vectors if len(snap) else np.ones((1, 1), np.float32)
            self._range = (snap, float(r.min()), float(r.max()))
        return self._range[1], self._range[2]

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
        shift = q @ self.mapper.offset
        lo, hi = self.scale_range()
        n = len(self.old.store.snapshot())
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        todo = np.arange(len(q))
        fetch = min(max(4 * k, 64), max(n, 1))
        while len(todo):
            s, i = self.old.search(folded[todo], fetch, exclude, budget, allow)
            a = s + shift[todo, None]
            r, found = self.scales.get(i.ravel())
            mapped = (i >= 0) & found.reshape(i.shape)
            score = np.where(mapped, a * np.where(mapped, r.reshape(i.shape), 1), -np.inf)
            top = np.argsort(-score, axis=1, kind="stable")[:, :k]
            top_s = np.take_along_axis(score, top, 1)
            top_i = np.where(np.isfinite(top_s), np.take_along_axis(i, top, 1), -1)
            a_last = np.where(i >= 0, a, np.inf).min(1)  # the K-th numerator fetched
            bound = np.where(a_last >= 0, a_last * hi, a_last * lo)
            exhausted = (i >= 0).sum(1) < fetch  # the index had no more to give
            kth = top_s[:, k - 1] if top_s.shape[1] == k else np.full(len(todo), -np.inf)
            done = exhausted | (kth >= bound) | (fetch >= n)
            width = top_s.shape[1]
            out_s[todo[done], :width], out_i[todo[done], :width] = top_s[done], top_i[done]
            todo, fetch = todo[~done], min(fetch * EXPAND, n)
        return out_s, out_i
