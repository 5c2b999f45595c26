"""Measuring a mixed index over an upgrade: score calibration from the paired sample,
the upgrade curve's summary (no regret, area under the curve), the plan choice, a plot.

No regret (DESIGN.md): the curve never drops below M(old,old) and never decreases.
`no_regret` applies it strictly; `no_regret_tol` forgives dips of at most `TOLERANCE`
(0.25 points of R@10: about 4 queries in 1,500, well inside the sampling noise of a
1,500-query evaluation, whose standard error is about 1.2 points).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from embcompat.adapters.base import Adapter
from embcompat.adapters.metrics import neighbour_recall, search
from embcompat.arrays import FloatArray
from embcompat.index.merge import Platt

TOLERANCE = 0.0025


def fit_calibration(
    old: FloatArray,
    new: FloatArray,
    bridge: Adapter | None = None,
    mapper: Adapter | None = None,
    n_queries: int = 1000,
    k: int = 10,
    depth: int = 50,
) -> dict[str, Platt]:
    """Per-path Platt maps from the paired sample (old, new: (n, d) of the same items).

    Label-free truth: each probe item's k nearest other items by the new model. Every
    path's top-`depth` scores for the probe items are labelled against that truth."""
    nq = min(n_queries, len(new) // 2)
    _, truth = search(new[:nq], new, k + 1)
    truth_sets = [set(row[1:].tolist()) for row in truth]  # drop the item itself
    paths: dict[str, tuple[FloatArray, FloatArray]] = {
        "new": (new[:nq], new),
        "old": (old[:nq], old),
    }
    if bridge is not None:
        paths["bridge"] = (bridge.transform(new[:nq]), old)
    if mapper is not None:
        paths["mapped"] = (new[:nq], mapper.transform(old))
    out = {}
    for name, (queries, gallery) in paths.items():
        scores, ids = search(queries, gallery, depth + 1)
        not_self = ids != np.arange(nq)[:, None]
        labels = np.array([[i in t for i in row] for row, t in zip(ids, truth_sets, strict=True)])
        out[name] = Platt.fit(scores[not_self], labels[not_self])
    return out


def proxy_curve(
    old: FloatArray,
    new: FloatArray,
    plan: str,
    adapter: Adapter,
    calibration: dict[str, Platt] | None = None,
    steps: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The upgrade curve of one adapter on held-out pairs (old, new: (n, d) of the same
    items), label-free: the truth of each item is its 10 nearest other items by the new
    model (so M(new,new) = 1), and `r10` is how much of it the mixed gallery returns when
    a fraction of items (random order) is upgraded and the rest is served by `plan`
    (`bridge`, `mapped` or `basis`). Rows fit `plot_curves`."""
    n = len(new)
    _, truth = search(new, new, 11)
    truth = truth[:, 1:]
    r10_old_old = neighbour_recall(search(old, old, 11)[1][:, 1:], truth)
    if plan == "bridge":
        q_old, g_old = adapter.transform(new), old
    elif plan == "mapped":
        q_old, g_old = new, adapter.transform(old)
    else:  # basis: the head scores new queries against old vectors
        q_old, g_old = new @ adapter.head, old  # type: ignore[attr-defined]
    cal = calibration or {}
    rank = np.random.default_rng(seed).permutation(n)
    rows = []
    for f in np.linspace(0.0, 1.0, steps + 1):
        upgraded = rank < round(f * n)
        s_new = np.where(upgraded[None, :], new @ new.T, -np.inf)
        s_old = np.where(~upgraded[None, :], q_old @ g_old.T, -np.inf)
        if plan in cal and "new" in cal:
            s_new, s_old = cal["new"](s_new), cal[plan](s_old)
        scores = np.maximum(s_new, s_old)
        np.fill_diagonal(scores, -np.inf)  # an item is not its own neighbour
        top = np.argsort(-scores, axis=1)[:, :10]
        rows.append(
            {
                "plan": plan,
                "merge": "calibrated" if plan in cal and "new" in cal else "raw",
                "order": "random",
                "fraction": float(f),
                "r10": neighbour_recall(top, truth),
                "r10_old_old": r10_old_old,
                "r10_new_new": 1.0,
            }
        )
    return rows


def curve_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (pair, plan, merge, order): no_regret, auc, min, largest drop."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["pair"], r["plan"], r["merge"], r["order"])].append(r)
    out = []
    for (pair, plan, merge, order), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["fraction"])
        f = np.array([r["fraction"] for r in rs])
        y = np.array([r["r10"] for r in rs])
        oo, nn = rs[0]["r10_old_old"], rs[0]["r10_new_new"]
        drops = np.diff(y)
        out.append(
            {
                "pair": pair,
                "plan": plan,
                "merge": merge,
                "order": order,
                "no_regret": _no_regret(y, oo, 0.0),
                "no_regret_tol": _no_regret(y, oo, TOLERANCE),
                "auc": float(np.trapezoid(y, f)),
                "min_r10": float(y.min()),
                "below_old_old": float(max(0.0, oo - y.min())),
                "largest_drop": float(max(0.0, -drops.min())) if len(drops) else 0.0,
                "min_gain_vs_new_new": float((y - nn).min()),
                "r10_old_old": oo,
                "r10_new_new": nn,
            }
        )
    return out


def _no_regret(y: np.ndarray, r10_old_old: float, tol: float) -> bool:
    return bool((y >= r10_old_old - tol).all() and (np.diff(y) >= -tol).all())


def choose_plan(curves: dict[tuple[str, str], list[float]], r10_old_old: float) -> dict[str, Any]:
    """Pick, from curves measured on a probe (R@10 at increasing fractions), the no-regret
    plan (within TOLERANCE) with the best worst point; say why, else fall back to `dual`."""
    ok = {key: c for key, c in curves.items() if _no_regret(np.array(c), r10_old_old, TOLERANCE)}
    if not ok:
        return {
            "plan": "dual",
            "merge": "calibrated",
            "no_regret": False,
            "reason": "no plan was no-regret on the probe; serving the old part as before",
        }
    (plan, merge), best = max(ok.items(), key=lambda kv: (min(kv[1]), float(np.mean(kv[1]))))
    return {
        "plan": plan,
        "merge": merge,
        "no_regret": True,
        "probe_min_r10": min(best),
        "reason": f"no-regret on the probe with the highest lowest point ({min(best):.3f})",
    }


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per backfill order: R@10 against fraction for each plan and merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = sorted({r["order"] for r in rows})
    fig, axes = plt.subplots(1, len(orders), figsize=(7 * len(orders), 5), squeeze=False)
    for ax, order in zip(axes[0], orders, strict=True):
        sub = [r for r in rows if r["order"] == order]
        for key in sorted({(r["plan"], r["merge"]) for r in sub}):
            pts = sorted((r["fraction"], r["r10"]) for r in sub if (r["plan"], r["merge"]) == key)
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"{key[0]}/{key[1]}")
        ax.axhline(sub[0]["r10_old_old"], color="k", ls="--", lw=1, label="M(old,old)")
        ax.axhline(sub[0]["r10_new_new"], color="k", ls=":", lw=1, label="M(new,new)")
        ax.set(title=f"upgrade curve ({order} order)", xlabel="backfill fraction", ylabel="R@10")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
