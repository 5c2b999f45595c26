"""IVF-PQ generations: for galleries whose floats should stay on disk.

The index holds 8-bit product-quantisation codes (d/4 bytes a vector) in inverted lists
trained on a sample; a search takes the top `rerank` candidates by their approximate
scores and re-scores them exactly with their float vectors read from the space's
memory-mapped shards, as the binary kinds do. Building adds the space shard by shard,
so publishing never holds the whole gallery's floats in memory.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from embcompat.arrays import FloatArray, IdArray, member
from embcompat.index.store import Snapshot, SpaceStore

MIN_VECTORS = 10_000  # fewer: a flat index is smaller than the codebooks are worth
TRAIN_PER_LIST = 40  # training sample per inverted list (FAISS warns below 39)
MAX_TRAIN = 200_000
ADD_BATCH = 100_000


def _subquantizers(d: int) -> int:
    """The most sub-vectors of at least 4 dimensions that divide d (d/4 bytes a code)."""
    return max(m for m in range(1, max(d // 4, 1) + 1) if d % m == 0)


def build_ivfpq(snap: Snapshot, metric: int, seed: int = 0) -> faiss.IndexIVFPQ:
    """An IVF-PQ index of the snapshot's vectors, trained on a sample and filled in
    batches read from the shards (bounded memory at any gallery size)."""
    n, d = len(snap), snap.dim
    nlist = int(max(16, min(np.sqrt(n), n // TRAIN_PER_LIST)))
    quantizer = faiss.IndexFlat(d, metric)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, _subquantizers(d), 8, metric)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max(TRAIN_PER_LIST * nlist, 20_000), MAX_TRAIN),
                                replace=False))  # fmt: skip
    index.train(snap.rows(sample))
    for start in range(0, n, ADD_BATCH):
        rows = np.arange(start, min(start + ADD_BATCH, n))
        index.add_with_ids(snap.rows(rows), snap.ids[rows])
    index.nprobe = max(8, nlist // 32)
    return index


class PQRerankIndex:
    """A published IVF-PQ generation as SpaceSearcher uses it: approximate candidates
    from the codes, re-ranked exactly with the floats of the space's store."""

    def __init__(self, index: faiss.IndexIVFPQ, store: SpaceStore, rerank: int = 100) -> None:
        self.index, self.store, self.rerank = index, store, rerank

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search_excluding(
        self,
        q: FloatArray,
        k: int,
        live: IdArray,
        excluded: IdArray | None,
        allow: IdArray | None = None,
    ) -> tuple[FloatArray, IdArray]:
        """Top k of the live, not excluded (and, given `allow`, allowed) items by exact
        score among the candidates; the candidate depth and the lists probed grow
        fourfold for rows left short until they fill or every item was a candidate."""
        params: Any = faiss.SearchParametersIVF(nprobe=self.index.nprobe)  # type: ignore[call-arg]
        if allow is not None:
            params.sel = selector = faiss.IDSelectorBatch(np.ascontiguousarray(allow, np.int64))
            params.keepalive = selector  # the C++ object must outlive the search
        depth = max(self.rerank, k)
        rows = np.arange(len(q))
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        while len(rows):
            _, cand = self.index.search(q[rows], depth, params=params)
            bad = (cand < 0) | ~member(live, cand)
            if excluded is not None:
                bad |= member(excluded, cand)
            cand = np.where(bad, -1, cand)
            s, i = self._rerank(q[rows], cand, k)
            out_s[rows, : s.shape[1]], out_i[rows, : i.shape[1]] = s, i
            if depth >= self.ntotal and params.nprobe >= self.index.nlist:
                break  # every item was a candidate
            rows = rows[(i >= 0).sum(1) < k]
            depth = min(depth * 4, self.ntotal)
            params.nprobe = min(params.nprobe * 4, self.index.nlist)
        return out_s, out_i

    def _rerank(self, q: FloatArray, cand: IdArray, k: int) -> tuple[FloatArray, IdArray]:
        unique, inverse = np.unique(cand, return_inverse=True)  # each row read once
        vectors, found = self.store.get(unique)
        inverse = inverse.reshape(cand.shape)
        if self.index.metric_type == faiss.METRIC_INNER_PRODUCT:
            scores = np.matmul(vectors[inverse], q[:, :, None])[..., 0]
        else:  # scores are "higher is better" everywhere
            scores = -((vectors[inverse] - q[:, None, :]) ** 2).sum(-1)
        scores[~found[inverse] | (cand < 0)] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        s = np.take_along_axis(scores, top, 1).astype(np.float32)
        return s, np.where(np.isfinite(s), np.take_along_axis(cand, top, 1), -1)
