"""Does search ever get worse during an upgrade? The no-regret curve of each serving plan.

On the WordNet task (12,000 documents; 3,000 labelled queries split into a probe half,
used to fit the cascade's fusion weight and to choose the plan, and an evaluation half),
the mixed-version index is measured at backfill fractions 0, 10, ..., 100 %, in random
order and in "touched first" order (items the probe queries retrieve are backfilled
first), for every plan and merge. Adapters and score calibration are fitted on a paired
sample of 5,000 gallery documents, as the service does.

    python bench/upgrade_curve.py [--pair NAME] [--json PATH] [--plot PNG] [--latency]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import PAIRS, Embedded, embedded_pair, print_table, write_json

from embcompat.adapters import AffineAdapter, BasisAdapter, ProcrustesAdapter
from embcompat.adapters.metrics import ndcg_at_k, recall_at_k, search
from embcompat.index.curve import choose_plan, curve_summary, fit_calibration
from embcompat.index.faiss_index import IndexGenerations, SpaceSearcher
from embcompat.index.merge import fit_weight
from embcompat.index.plans import MixedIndex, Plan
from embcompat.index.plans import search as plan_search
from embcompat.index.store import SpaceStore

FRACTIONS = [round(0.1 * i, 1) for i in range(11)]
TWO_PART = [
    ("bridge", "raw"),
    ("bridge", "rrf"),
    ("bridge", "calibrated"),
    ("mapped", "raw"),
    ("mapped", "rrf"),
    ("mapped", "calibrated"),
    ("dual", "raw"),
    ("dual", "rrf"),
    ("dual", "calibrated"),
    ("basis", "raw"),
]
CASCADE = [("cascade", "rrf"), ("cascade", "learned")]


class LookupReadThrough:
    """Stands in for the encoder during the curve (the same vectors the new model gives,
    precomputed): writes each encoded item to the new space, once, and counts it."""

    def __init__(self, new_space: SpaceStore, vectors: np.ndarray) -> None:
        self.space, self.vectors, self.encoded = new_space, vectors, 0

    def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        added = self.space.add_missing(ids, self.vectors[ids])
        self.encoded += len(added)
        return ids, self.vectors[ids]


def _space(root: Path, name: str, ids: np.ndarray, vecs: np.ndarray, kind: str) -> SpaceSearcher:
    store = SpaceStore(root / name, vecs.shape[1])
    store.add(ids, vecs[ids])
    gens = IndexGenerations(root / f"{name}-index", kind)  # type: ignore[arg-type]
    gens.publish(store)
    return SpaceSearcher(store, gens)


def run(
    pair: str, kind: str = "flat", seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    e = embedded_pair(pair, 3000, 12000, 0)
    rng = np.random.default_rng(seed)
    n = len(e.g_old)
    qperm = rng.permutation(len(e.q_new))
    probe, evalq = qperm[: len(qperm) // 2], qperm[len(qperm) // 2 :]
    rel = e.task.relevant
    paired = rng.permutation(n)[:5000]
    bridge = ProcrustesAdapter.fit(e.g_new[paired], e.g_old[paired], "query: new->old")
    mapper = AffineAdapter.fit(e.g_old[paired], e.g_new[paired], "gallery: old->new")
    basis = BasisAdapter.fit(e.g_new[paired], e.g_old[paired])
    mapped_all = mapper.transform(e.g_old)
    calibration = fit_calibration(e.g_old[paired], e.g_new[paired], bridge, mapper)
    weight = _fit_cascade_weight(e, probe)
    common = {"bridge": bridge, "basis_head": basis.head, "calibration": calibration}
    plans = {(p, m): Plan(p, m, weight=weight, **common) for p, m in TWO_PART + CASCADE}  # type: ignore[arg-type]
    touched = _touched_first(e, probe, rng)
    orders = {"random": rng.permutation(n), "touched": touched}
    ids_all = np.arange(n)
    rows: list[dict[str, Any]] = []
    probe_curves: dict[tuple[str, str], list[float]] = {}
    _, oo = search(e.q_old[evalq], e.g_old, 10)
    _, nn = search(e.q_new[evalq], e.g_new, 10)
    r_oo, r_nn = recall_at_k(oo, rel[evalq], 10), recall_at_k(nn, rel[evalq], 10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        old = _space(root, "old", ids_all, e.g_old, kind)
        mapped = _space(root, "mapped", ids_all, mapped_all, kind)

        def evaluate(
            done: np.ndarray, key: tuple[str, str], queries: np.ndarray
        ) -> tuple[np.ndarray, dict[str, float]]:
            """A fresh new space holding the backfilled items; cascade streams the queries."""
            scratch = root / "new"
            new = _space(scratch, "new", done, e.g_new, kind)
            mixed = MixedIndex(old, new, mapped)
            try:
                if key[0] == "cascade":
                    return _stream(mixed, plans[key], e, queries, new)
                res = plan_search(mixed, plans[key], e.q_new[queries], e.q_old[queries])
                return res.ids, {}
            finally:
                shutil.rmtree(scratch)

        for order_name, order in orders.items():
            for f in FRACTIONS:
                done = np.sort(order[: int(round(f * n))])
                for key in TWO_PART + CASCADE:
                    ids, extra = evaluate(done, key, evalq)
                    r10, nd = recall_at_k(ids, rel[evalq], 10), ndcg_at_k(ids, rel[evalq], 10)
                    rows.append(
                        {
                            "pair": pair,
                            "plan": key[0],
                            "merge": key[1],
                            "order": order_name,
                            "fraction": f,
                            "r10": r10,
                            "ndcg10": nd,
                            "r10_old_old": r_oo,
                            "r10_new_new": r_nn,
                            "gain_vs_new_new": r10 - r_nn,
                            **extra,
                        }
                    )
                    if order_name == "random" and f in (0.0, 0.5, 1.0):
                        pres, _ = evaluate(done, key, probe)
                        probe_curves.setdefault(key, []).append(recall_at_k(pres, rel[probe], 10))
                print(f"  {pair} {order_name} {f:.0%} done", flush=True)
    _, oo_p = search(e.q_old[probe], e.g_old, 10)
    choice = choose_plan(probe_curves, recall_at_k(oo_p, rel[probe], 10))
    summaries = curve_summary(rows)
    return rows + summaries, {"choice": choice, "weight": weight}


def _stream(
    mixed: MixedIndex,
    plan: Plan,
    e: Embedded,
    queries: np.ndarray,
    new: SpaceSearcher,
    batch: int = 8,
) -> tuple[np.ndarray, dict[str, float]]:
    """Queries arrive in small batches; read-through backfill upgrades what they touch."""
    rt = LookupReadThrough(new.store, e.g_new)
    ids, encodes = [], []
    for s in range(0, len(queries), batch):
        q = queries[s : s + batch]
        res = plan_search(mixed, plan, e.q_new[q], e.q_old[q], 10, rt)
        ids.append(res.ids)
        encodes.append(res.encodes)
    per_query = np.concatenate(encodes)
    tenth = max(1, len(per_query) // 10)
    return np.concatenate(ids), {
        "encodes_per_query": float(per_query.mean()),
        "encodes_first10": float(per_query[:tenth].mean()),
        "encodes_last10": float(per_query[-tenth:].mean()),
    }


def _fit_cascade_weight(e: Embedded, probe: np.ndarray, kk: int = 50) -> float:
    """The fusion weight that maximises R@10 of the cascade on the probe queries."""
    from embcompat.index.merge import fuse_z, zscore_rows

    _, cand = search(e.q_old[probe], e.g_old, kk)
    so = np.einsum("qcd,qd->qc", e.g_old[cand], e.q_old[probe])
    sn = np.einsum("qcd,qd->qc", e.g_new[cand], e.q_new[probe])
    zo, zn = zscore_rows(so), zscore_rows(sn)

    def r10(w: float) -> float:
        order = np.argsort(-fuse_z(zo, zn, w), axis=1)[:, :10]
        return recall_at_k(np.take_along_axis(cand, order, 1), e.task.relevant[probe], 10)

    return fit_weight(r10)


def _touched_first(e: Embedded, probe: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Items that probe queries retrieve (old index, top 50) first, most touched first."""
    _, cand = search(e.q_old[probe], e.g_old, 50)
    counts = np.bincount(cand.ravel(), minlength=len(e.g_old))
    tiebreak = rng.random(len(e.g_old))
    return np.lexsort((tiebreak, -counts))


def latency(pair: str, kind: str, repeats: int = 200) -> list[dict[str, Any]]:
    """Per-query median latency at 50 % backfill over a single-version index, same type."""
    e = embedded_pair(pair, 3000, 12000, 0)
    n = len(e.g_old)
    rng = np.random.default_rng(1)
    half = np.sort(rng.permutation(n)[: n // 2])
    paired = rng.permutation(n)[:5000]
    bridge = ProcrustesAdapter.fit(e.g_new[paired], e.g_old[paired])
    out = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        root = Path(tmp)
        single = _space(root, "single", np.arange(n), e.g_new, kind)
        old = _space(root, "old", np.arange(n), e.g_old, kind)
        new = _space(root, "new", half, e.g_new, kind)
        mixed = MixedIndex(old, new, pool=pool)  # as the service searches: side by side
        for p in ("dual", "bridge"):
            plan = Plan(p, "rrf", bridge=bridge)  # type: ignore[arg-type]
            t_single, t_mixed = [], []
            for i in range(repeats):
                qn, qo = e.q_new[i : i + 1], e.q_old[i : i + 1]
                t0 = time.perf_counter()
                single.search(qn, 10)
                t_single.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                plan_search(mixed, plan, qn, qo, 10)
                t_mixed.append(time.perf_counter() - t0)
            ms, mm = np.median(t_single) * 1e3, np.median(t_mixed) * 1e3
            out.append(
                {
                    "pair": pair,
                    "index": kind,
                    "plan": p,
                    "fraction": 0.5,
                    "single_ms": ms,
                    "mixed_ms": mm,
                    "latency_ratio": mm / ms,
                }
            )
    return out


class EncoderReadThrough:
    """Read-through with the real new encoder over the documents' text, as served."""

    def __init__(self, space: SpaceStore, encoder: Any, texts: list[str]) -> None:
        self.space, self.encoder, self.texts = space, encoder, texts

    def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.encoder.encode([self.texts[i] for i in ids])
        self.space.add_missing(ids, vectors)
        return ids, vectors


def cascade_latency(pair: str, kind: str, repeats: int = 100) -> list[dict[str, Any]]:
    """Per query, query encoding included: the cascade (both encoders, on-the-fly encodes
    of candidates within the budget, 16) over a single-version index with the new encoder.
    The query stream is fresh at each fraction, so read-through starts cold."""
    from common import _encoder

    from embcompat.settings import get_settings

    e = embedded_pair(pair, 3000, 12000, 0)
    models = get_settings().resolved_data_dir / "models"
    enc_old, enc_new = (_encoder(name, models) for name in PAIRS[pair])
    n = len(e.g_old)
    order = np.random.default_rng(2).permutation(n)
    out = []
    for f in (0.0, 0.5):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            single = _space(root, "single", np.arange(n), e.g_new, kind)
            old = _space(root, "old", np.arange(n), e.g_old, kind)
            new = _space(root, "new", np.sort(order[: int(f * n)]), e.g_new, kind)
            rt = EncoderReadThrough(new.store, enc_new, e.task.gallery)
            plan = Plan("cascade", "rrf", encode_budget=16)
            t_single, t_cascade, encodes = [], [], []
            for text in e.task.queries[:repeats]:
                t0 = time.perf_counter()
                single.search(enc_new.encode([text]), 10)
                t_single.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                qo, qn = enc_old.encode([text]), enc_new.encode([text])
                res = plan_search(MixedIndex(old, new), plan, qn, qo, 10, rt)
                t_cascade.append(time.perf_counter() - t0)
                encodes.append(int(res.encodes.sum()))
            ms, mc = np.median(t_single) * 1e3, np.median(t_cascade) * 1e3
            out.append(
                {
                    "pair": pair,
                    "index": kind,
                    "plan": "cascade",
                    "fraction": f,
                    "single_ms": ms,
                    "mixed_ms": mc,
                    "latency_ratio": mc / ms,
                    "encodes_per_query": float(np.mean(encodes)),
                    "includes": "query encoding + on-the-fly encodes",
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default=next(iter(PAIRS)), choices=list(PAIRS))
    parser.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--json", help="write the rows as a JSON list")
    parser.add_argument("--plot", help="save the curves as a PNG")
    parser.add_argument("--latency", action="store_true", help="measure latency ratios only")
    args = parser.parse_args()
    if args.latency:
        rows = [r for kind in ("flat", "hnsw") for r in latency(args.pair, kind)]
        rows += cascade_latency(args.pair, "flat")
        columns = ["pair", "index", "plan", "fraction", "single_ms", "mixed_ms", "latency_ratio"]
        print_table(rows, [*columns, "encodes_per_query"])
        write_json(args.json, rows)
        return
    t0 = time.perf_counter()
    rows, info = run(args.pair, args.index)
    curve_rows = [r for r in rows if "fraction" in r and r["order"] == "random"]
    _print_curves(curve_rows)
    summaries = [r for r in rows if "no_regret" in r]
    print()
    print_table(
        summaries,
        [
            "plan",
            "merge",
            "order",
            "no_regret",
            "no_regret_tol",
            "largest_drop",
            "auc",
            "min_r10",
            "min_gain_vs_new_new",
        ],
    )
    print(f"\nchosen plan on the probe half: {info['choice']}; cascade weight {info['weight']:.2f}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    write_json(args.json, rows)
    if args.plot:
        from embcompat.index.curve import plot_curves

        plot_curves([r for r in rows if "fraction" in r], Path(args.plot))
        print(f"wrote {args.plot}")


def _print_curves(rows: list[dict[str, Any]]) -> None:
    keys = sorted({(r["plan"], r["merge"]) for r in rows})
    table = []
    for p, m in keys:
        row: dict[str, Any] = {"plan": p, "merge": m}
        for r in rows:
            if (r["plan"], r["merge"]) == (p, m):
                row[f"{int(r['fraction'] * 100)}%"] = r["r10"]
        table.append(row)
    oo, nn = rows[0]["r10_old_old"], rows[0]["r10_new_new"]
    print(f"\nR@10 (random order); M(old,old) {oo:.3f}, M(new,new) {nn:.3f}")
    print_table(table, ["plan", "merge"] + [f"{int(f * 100)}%" for f in FRACTIONS])


if __name__ == "__main__":
    main()
