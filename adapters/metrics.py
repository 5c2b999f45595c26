"""Retrieval and compatibility metrics, named as in DESIGN.md.

For labelled queries over a gallery and a metric M:
- `M(old,old)`: v1 queries on the v1 gallery; `M(new,new)`: v2 on v2 (the ceiling);
- `M(new,old)`: v2 queries on the v1 gallery through a bridge (the day-one result);
- compatible (ECC) ⇔ M(new,old) > M(old,old); retention = M(new,old) / M(new,new);
- negative-flip rate: queries answered right before the upgrade and wrong after.
Relevance is either one gallery row per query, (nq,) ints, or a list of row collections.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from faiss.contrib.evaluation import knn_intersection_measure

from embcompat.arrays import FloatArray

IntArray = npt.NDArray[np.int64]
Relevance = IntArray | Sequence[Collection[int]]


def search(queries: FloatArray, gallery: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
    """Exact inner-product search: queries (nq, d), gallery (ng, d) → D, I: (nq, k)."""
    d, i = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(gallery, dtype=np.float32),
        min(k, len(gallery)),
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return d, i.astype(np.int64)


def _as_sets(relevant: Relevance) -> list[set[int]]:
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1:
        return [{int(r)} for r in relevant]
    return [set(map(int, r)) for r in relevant]


def hits_at_k(ranked: IntArray, relevant: Relevance, k: int) -> npt.NDArray[np.bool_]:
    """ranked (nq, ≥k) → (nq,) whether any relevant row is in the top k."""
    return np.array(
        [
            bool(rel & set(row[:k].tolist()))
            for row, rel in zip(ranked, _as_sets(relevant), strict=True)
        ]
    )


def recall_at_k(ranked: IntArray, relevant: Relevance, k: int = 10) -> float:
    """Mean over queries of |top-k ∩ relevant| / |relevant|."""
    sets = _as_sets(relevant)
    return float(
        np.mean(
            [
                len(rel & set(row[:k].tolist())) / len(rel)
                for row, rel in zip(ranked, sets, strict=True)
            ]
        )
    )


def ndcg_at_k(ranked: IntArray, relevant: Relevance, k: int = 10) -> float:
    """Binary-relevance nDCG@k."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    scores = []
    for row, rel in zip(ranked, _as_sets(relevant), strict=True):
        gains = np.array([1.0 if int(r) in rel else 0.0 for r in row[:k]])
        ideal = discounts[: min(len(rel), k)].sum()
        scores.append(float((gains * discounts[: len(gains)]).sum() / ideal))
    return float(np.mean(scores))


def mrr(ranked: IntArray, relevant: Relevance) -> float:
    """Mean reciprocal rank of the first relevant row (0 when none is ranked)."""
    out = []
    for row, rel in zip(ranked, _as_sets(relevant), strict=True):
        pos = next((i for i, r in enumerate(row.tolist()) if r in rel), None)
        out.append(0.0 if pos is None else 1.0 / (pos + 1))
    return float(np.mean(out))


def negative_flip_rate(before: npt.NDArray[np.bool_], after: npt.NDArray[np.bool_]) -> float:
    """Share of queries right before the upgrade (`before`) and wrong after."""
    return float(np.mean(before & ~after))


def neighbour_recall(predicted: IntArray, truth: IntArray, k: int = 10) -> float:
    """Label-free proxy: overlap of a ranking's top k with the reference top k,
    predicted and truth: (nq, ·) → mean share of k found (a gallery of fewer than k
    items ranks fewer columns: the overlap is counted on the columns both have)."""
    width = min(k, predicted.shape[1], truth.shape[1])
    return float(knn_intersection_measure(predicted[:, :width], truth[:, :width])) * width / k


@dataclass(frozen=True)
class CompatReport:
    r10_old_old: float
    r10_new_new: float
    r10_new_old: float
    ndcg10_old_old: float
    ndcg10_new_new: float
    ndcg10_new_old: float
    mrr_new_old: float
    retention_r10: float
    ecc: bool
    negative_flip_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compat_report(
    q_old: FloatArray,
    q_new: FloatArray,
    g_old: FloatArray,
    g_new: FloatArray,
    relevant: Relevance,
    bridge_queries: FloatArray,
    bridge_gallery: FloatArray,
    k: int = 10,
) -> CompatReport:
    """q_old/q_new: queries by each model; g_old/g_new: the gallery by each model;
    bridge_queries × bridge_gallery: how new queries meet the old gallery through a bridge
    (mapped queries × g_old, q_new × mapped gallery, or basis × zero-padded g_old)."""
    _, oo = search(q_old, g_old, k)
    _, nn = search(q_new, g_new, k)
    _, no = search(bridge_queries, bridge_gallery, k)
    r_oo, r_nn, r_no = (recall_at_k(r, relevant, k) for r in (oo, nn, no))
    return CompatReport(
        r10_old_old=r_oo,
        r10_new_new=r_nn,
        r10_new_old=r_no,
        ndcg10_old_old=ndcg_at_k(oo, relevant, k),
        ndcg10_new_new=ndcg_at_k(nn, relevant, k),
        ndcg10_new_old=ndcg_at_k(no, relevant, k),
        mrr_new_old=mrr(no, relevant),
        retention_r10=r_no / r_nn if r_nn > 0 else 0.0,
        ecc=r_no > r_oo,
        negative_flip_rate=negative_flip_rate(
            hits_at_k(oo, relevant, k), hits_at_k(no, relevant, k)
        ),
    )
