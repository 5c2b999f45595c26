"""A labelled probe (queries with their relevant item ids) measured before the backfill.

Before the backfill only the paired sample has both versions' vectors, so the probe is
measured on that sub-gallery, with the probe queries whose relevant items are in it.
Ranks scale with gallery size, so a cut-off K on the full gallery is measured as
K·m/n on a sub-gallery of m of its n items. From it the gate learns:
- whether the upgrade is a downgrade: M(new,new) below M(old,old) by more than noise
  (queries v2 loses minus queries it wins above two standard deviations of a sign
  test, as McNemar's test counts them): refused;
- the cascade's merge: RRF, or a fusion weight learned on the probe only when it beats
  RRF on queries it was not fitted on; and the fused quality at 100 % (keep v1 or not);
- whether the old model's recall@K caps the cascade, and the K that lifts the cap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.adapters.metrics import hits_at_k, recall_at_k, search
from embcompat.arrays import FloatArray, IdArray
from embcompat.index.merge import fit_weight, fuse_z, rrf_rows, zscore_rows
from embcompat.index.plans import later_repeats
from embcompat.service.context import Context
from embcompat.service.galleries.layout import item_ids_of

MIN_QUERIES = 10
KS = (50, 100, 200)
KEEP_OLD_MIN_GAIN = 0.01  # fused R@10 must beat v2 alone by a point to keep v1 running
FOLDS = 5


def measure(
    ctx: Context,
    gallery_id: int,
    probe: list[dict[str, Any]],
    pair_ids: np.ndarray,
    g_old: np.ndarray,
    g_new: np.ndarray,
    old: Any,
    new: Any,
    n_gallery: int,
    adapters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """pair_ids: (m,) item ids whose vectors g_old (m, d_old) and g_new (m, d_new) are
    known. `adapters`: the job's fitted `bridge` (new→old queries) and `mapper` (old→new
    items), measured as plans beside the cascade and the backfill (`plan_points`)."""
    wanted = sorted({r for q in probe for r in q.get("relevant", [])})
    with ctx.session() as s:
        by_ext = item_ids_of(s, gallery_id, wanted)
    row = {int(i): r for r, i in enumerate(pair_ids)}
    texts, relevant = [], []
    for q in probe:
        rows = {row[by_ext[e]] for e in q.get("relevant", []) if by_ext.get(e) in row}
        if rows and q.get("text"):
            texts.append(q["text"])
            relevant.append(rows)
    out: dict[str, Any] = {"queries": len(texts), "sub_gallery": len(pair_ids)}
    if len(texts) < MIN_QUERIES:
        return {
            **out,
            "note": f"fewer than {MIN_QUERIES} probe queries have a relevant item "
            "in the paired sample: nothing measured",
        }
    q_old = ctx.encoder(old).encode(texts)
    q_new = ctx.encoder(new).encode(texts)
    scale = len(pair_ids) / max(n_gallery, 1)
    k10 = max(1, round(10 * scale)) if scale < 1 else 10
    ranked_old, ranked_new = search(q_old, g_old, k10)[1], search(q_new, g_new, k10)[1]
    r_oo = recall_at_k(ranked_old, relevant, k10)
    r_nn = recall_at_k(ranked_new, relevant, k10)
    hit_old, hit_new = hits_at_k(ranked_old, relevant, k10), hits_at_k(ranked_new, relevant, k10)
    lost, won = int((hit_old & ~hit_new).sum()), int((hit_new & ~hit_old).sum())
    old_recall = {
        k: recall_at_k(
            search(q_old, g_old, max(1, round(k * scale)))[1], relevant, max(1, round(k * scale))
        )
        for k in KS
    }
    cascade_k = next((k for k in KS if old_recall[k] >= r_nn), KS[-1])
    kk = max(1, round(cascade_k * scale))
    # at 100 %: the old index proposes its top K, the new index its own; both score all
    cand = np.concatenate([search(q_old, g_old, kk)[1], search(q_new, g_new, kk)[1]], axis=1)
    dup = later_repeats(cand)
    s_old = np.where(dup, np.nan, np.einsum("qcd,qd->qc", g_old[cand], q_old))
    s_new = np.where(dup, np.nan, np.einsum("qcd,qd->qc", g_new[cand], q_new))
    fusion = choose_merge(s_old, s_new, cand, relevant, k10)
    day_one = {
        "dual": ranked_old,  # the new space holds only the pairs: v1 answers
        "cascade": fusion.pop("ranked"),
    }
    if adapters:
        day_one["bridge"] = search(adapters["bridge"].transform(q_new), g_old, k10)[1]
        day_one["mapped"] = search(q_new, adapters["mapper"].transform(g_old), k10)[1]
    final = {"cascade": max(fusion["r10_cascade"], r_nn)}  # v1 kept at 100 % only if it helps
    return {
        **out,
        "k_scaled": k10,
        "r10_old_old": r_oo,
        "r10_new_new": r_nn,
        "queries_lost": lost,
        "queries_won": won,
        "downgrade": bool(lost - won > 2 * np.sqrt(lost + won)),
        **fusion,
        "fusion_gain": fusion["r10_cascade"] - r_nn,
        "keep_old_at_100": fusion["r10_cascade"] - r_nn >= KEEP_OLD_MIN_GAIN,
        "old_recall_at_k": {str(k): v for k, v in old_recall.items()},
        "cascade_k": cascade_k,
        "capped": old_recall[KS[-1]] < r_nn,
        "plans": plan_points(day_one, final, hit_old, r_nn, relevant, k10),
    }


def plan_points(
    day_one: dict[str, IdArray],
    final: dict[str, float],
    hit_old: npt.NDArray[np.bool_],
    r_new: float,
    relevant: list[set[int]],
    k: int,
) -> dict[str, dict[str, Any]]:
    """Each plan's upgrade curve by its two ends on the probe: R@k on day one (its
    ranking `day_one[plan]`) and at 100 % (`final[plan]`, else v2 alone, `r_new`), its
    lowest point, and whether it is no-regret: on day one it loses no more queries to v1
    than it wins beyond two standard deviations of a sign test (the curve in between
    moves from one end to the other as items are re-embedded)."""
    out = {}
    for plan, ranked in day_one.items():
        first = recall_at_k(ranked, relevant, k)
        hit = hits_at_k(ranked, relevant, k)
        lost, won = int((hit_old & ~hit).sum()), int((hit & ~hit_old).sum())
        last = final.get(plan, r_new)
        out[plan] = {
            "r10_day_one": first,
            "r10_final": last,
            "lowest": min(first, last),
            "queries_lost": lost,
            "queries_won": won,
            "no_regret": not lost - won > 2 * np.sqrt(lost + won),
            "queries": len(relevant),
        }
    return out


def choose_merge(
    s_old: FloatArray,
    s_new: FloatArray,
    cand: IdArray,
    relevant: list[set[int]],
    k: int,
    folds: int = FOLDS,
) -> dict[str, Any]:
    """RRF, or the weight of a z-score fusion learned on the probe, whichever finds more
    relevant items on probe queries it was not fitted on (`folds`-fold cross-validation;
    a tie keeps RRF, which fits nothing). Scores: (nq, c) per candidate, NaN where unknown.
    Returns the merge, the weight (fitted on every query), the held-out R@k of both, and
    the R@k of the chosen merge on every query."""
    zo, zn = zscore_rows(s_old), zscore_rows(s_new)
    rrf = np.where(np.isfinite(s_old) | np.isfinite(s_new), rrf_rows(s_old) + rrf_rows(s_new),
                   -np.inf)  # fmt: skip

    def recall(fused: FloatArray, rows: IdArray) -> float:
        order = np.argsort(-fused[rows], axis=1, kind="stable")[:, :k]
        ranked = np.take_along_axis(cand[rows], order, 1)
        return recall_at_k(ranked, [relevant[r] for r in rows], k) * len(rows)

    everyone = np.arange(len(cand))
    parts = np.array_split(np.random.default_rng(0).permutation(len(cand)), folds)
    held_learned = held_rrf = 0.0
    for part in parts:
        fit_rows = np.setdiff1d(everyone, part)
        w = fit_weight(lambda w: recall(fuse_z(zo, zn, w), fit_rows))  # noqa: B023
        held_learned += recall(fuse_z(zo, zn, w), part)
        held_rrf += recall(rrf, part)
    weight = fit_weight(lambda w: recall(fuse_z(zo, zn, w), everyone))
    learned = held_learned > held_rrf
    fused = fuse_z(zo, zn, weight) if learned else rrf
    order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    return {
        "merge": "learned" if learned else "rrf",
        "weight": weight,
        "cv_r10_learned": held_learned / len(cand),
        "cv_r10_rrf": held_rrf / len(cand),
        "r10_cascade": recall(fused, everyone) / len(cand),
        "ranked": np.take_along_axis(cand, order, 1),
    }
