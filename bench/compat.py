"""How much search quality does each compatibility adapter keep on a real upgrade?

For each model pair of DATA.md on the WordNet task (3,000 labelled queries over a
12,000-document gallery), fits every adapter kind in both directions on paired samples
of 1k, 5k and 20k documents (drawn from the gallery plus 8,000 other synsets), and
reports M(old,old), M(new,new), M(new,old) through the adapter (R@10, nDCG@10),
retention, the compatibility criterion (ECC), negative flips, fit time and µs per
transformed vector. `auto` (selection by held-out neighbour recall) runs at the largest
size; `none` is the raw new query against the old gallery.

    python bench/compat.py [--json PATH] [--pairs NAME,...] [--sizes 1000,5000,20000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from common import PAIRS, Embedded, embedded_pair, print_table, write_json

from embcompat.adapters import KINDS, BasisAdapter
from embcompat.adapters.base import Adapter
from embcompat.adapters.metrics import CompatReport, compat_report
from embcompat.adapters.select import select_adapter

DIRECTIONS = ("query: new->old", "gallery: old->new")
BRIDGE_KINDS = ("procrustes", "affine", "lowrank", "residual_mlp")
COLUMNS = [
    "pair",
    "adapter",
    "direction",
    "pairs",
    "r10_old_old",
    "r10_new_new",
    "r10_new_old",
    "ndcg10_new_old",
    "retention_r10",
    "ecc",
    "nfr",
    "fit_s",
    "us_per_query",
]


def _us_per_vector(adapter: Adapter, x: np.ndarray, repeats: int = 200) -> float:
    """Median latency of transforming one vector, as a query-time bridge would."""
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        adapter.transform(x[i % len(x)][None, :])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def _evaluate(e: Embedded, adapter: Adapter | None) -> tuple[CompatReport, float]:
    rel = e.task.relevant
    if adapter is None:  # raw new queries on the old gallery (cut or zero-padded to fit)
        d = e.g_old.shape[1]
        raw = np.zeros((len(e.q_new), d), np.float32)
        raw[:, : min(d, e.q_new.shape[1])] = e.q_new[:, :d]
        return compat_report(e.q_old, e.q_new, e.g_old, e.g_new, rel, raw, e.g_old), 0.0
    if isinstance(adapter, BasisAdapter):
        queries, gallery = adapter.transform(e.q_new), adapter.pad_old(e.g_old)
        sample = e.q_new
    elif adapter.direction == "query: new->old":
        queries, gallery, sample = adapter.transform(e.q_new), e.g_old, e.q_new
    else:  # gallery: old->new, the stored old vectors are mapped once
        queries, gallery, sample = e.q_new, adapter.transform(e.g_old), e.g_old
    report = compat_report(e.q_old, e.q_new, e.g_old, e.g_new, rel, queries, gallery)
    return report, _us_per_vector(adapter, sample)


def _row(
    pair: str, name: str, direction: str, n: int, e: Embedded, adapter: Adapter | None, fit_s: float
) -> dict[str, Any]:
    rep, us = _evaluate(e, adapter)
    return {
        "pair": pair,
        "adapter": name,
        "direction": direction,
        "pairs": n,
        "r10_old_old": rep.r10_old_old,
        "r10_new_new": rep.r10_new_new,
        "r10_new_old": rep.r10_new_old,
        "ndcg10_new_old": rep.ndcg10_new_old,
        "retention_r10": rep.retention_r10,
        "ecc": rep.ecc,
        "nfr": rep.negative_flip_rate,
        "fit_s": fit_s,
        "us_per_query": us,
    }


def _timed(fit: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fit(*args)
    return out, time.perf_counter() - t0


def run_pair(pair: str, sizes: list[int], seed: int = 0) -> list[dict[str, Any]]:
    e = embedded_pair(pair, 3000, 12000, 8000)
    new_all = np.concatenate([e.g_new, e.p_new])
    old_all = np.concatenate([e.g_old, e.p_old])
    order = np.random.default_rng(seed).permutation(len(new_all))
    rows = [_row(pair, "none", "-", 0, e, None, 0.0)]
    for n in sizes:
        idx = order[: min(n, len(order))]
        x_new, x_old = new_all[idx], old_all[idx]
        for direction in DIRECTIONS:
            src, tgt = (x_new, x_old) if direction.startswith("query") else (x_old, x_new)
            for kind in BRIDGE_KINDS:
                adapter, secs = _timed(KINDS[kind].fit, src, tgt, direction)  # type: ignore[attr-defined]
                rows.append(_row(pair, kind, direction, len(idx), e, adapter, secs))
                print(
                    f"  {pair} {kind:12s} {direction:18s} {len(idx):6d} "
                    f"R@10 new/old {rows[-1]['r10_new_old']:.3f}",
                    flush=True,
                )
            if n == sizes[-1]:
                sel, secs = _timed(select_adapter, src, tgt, direction)
                picked = f"auto:{sel.kind}"
                rows.append(_row(pair, picked, direction, len(idx), e, sel.adapter, secs))
                rows[-1]["auto_scores"] = sel.scores
        basis, secs = _timed(BasisAdapter.fit, x_new, x_old)
        rows.append(_row(pair, "basis", "basis: new->compatible", len(idx), e, basis, secs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as a JSON list")
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--sizes", default="1000,5000,20000")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for pair in args.pairs.split(","):
        rows += run_pair(pair, [int(s) for s in args.sizes.split(",")])
    print()
    print_table(rows, COLUMNS)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
