"""The upgrade curve as users get it: measured through the service's own search, beside
the simulation of bench/upgrade_curve.py at the same fractions; and the cascade's
on-the-fly encode budget as a knob (R@10 and latency, synchronous and asynchronous).

Primary pair of DATA.md (all-MiniLM-L6-v2 → all-mpnet-base-v2), WordNet task (12,000
documents, 3,000 labelled queries: the probe half is given to the upgrade, the curve is
measured on the other half). The service runs the real upgrade: ingest, pairing (1,200
items), fitting, the gate with the probe, then backfill chunks of 1,200 items. After
each chunk the whole data directory is copied and the evaluation queries are streamed
through `search` on the copy (batches of 8, read-through on with the configured budget),
so one fraction's read-through never leaks into the next; "backfill only" is the same
with read-through off. Encoders answer from cached embeddings (the same vectors the
models give), so the run takes minutes; latency is measured with the real v2 encoder.

    python bench/service_curve.py [--json PATH] [--budgets 0 4 8 16 32] [--latency-queries 60]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import embedded_pair, print_table, write_json
from upgrade_curve import LookupReadThrough, _space

from embcompat.adapters.metrics import recall_at_k, search
from embcompat.demo import CachedTextEncoder, register_text_pair
from embcompat.index.merge import fit_weight, fuse_z, zscore_rows
from embcompat.index.plans import MixedIndex, Plan
from embcompat.index.plans import search as plan_search
from embcompat.service import galleries, migrate, upgrade
from embcompat.service import search as service
from embcompat.service.context import Context
from embcompat.settings import Settings

PAIR = "minilm-l6->mpnet"
MODELS = Path(".embcompat/models").resolve()  # shared: not copied with each data dir
CHUNK = 1200
BATCH = 8


_CACHED: dict[str, CachedTextEncoder] = {}  # built once, installed in every copy's context


def _settings(root: Path, **settings: Any) -> Settings:
    """Copies of the data dir keep MLflow artifact paths of the first: trusted too."""
    return Settings(data_dir=root, model_roots=[root.parent], **settings)


def _context(root: Path, e: Any, **settings: Any) -> tuple[Context, dict[str, Any]]:
    """A context on `root` whose encoders answer from the cached embeddings."""
    ctx = Context(_settings(root, **settings))
    migrate.upgrade(ctx.settings.resolved_database_url)
    recs = register_text_pair(ctx, MODELS)
    texts = e.task.gallery + e.task.queries
    for version, g, q in (("v1", e.g_old, e.q_old), ("v2", e.g_new, e.q_new)):
        if version not in _CACHED:
            real = ctx.encoder(recs[version])
            _CACHED[version] = CachedTextEncoder(real, texts, np.vstack([g, q]))
        ctx.install_encoder(recs[version], _CACHED[version])
    return ctx, recs


def _stream(ctx: Context, e: Any, queries: np.ndarray, read_through: bool) -> tuple[float, float]:
    """R@10 of the queries streamed through the service in batches, and encodes/query."""
    found, encodes = [], 0
    for s in range(0, len(queries), BATCH):
        q = queries[s : s + BATCH]
        res = service.search(ctx, "docs", texts=[e.task.queries[i] for i in q], k=10,
                             read_through=read_through)  # fmt: skip
        encodes += res.encodes
        found += [[h.item for h in row] for row in res.hits]
    index = {g: n for n, g in enumerate(e.task.gallery_ids)}
    ranked = np.array([[index[i] for i in row] + [-1] * (10 - len(row)) for row in found])
    return recall_at_k(ranked, e.task.relevant[queries], 10), encodes / len(queries)


def service_curve(
    e: Any, probe: np.ndarray, evalq: np.ndarray, root: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """The real upgrade, measured after pairing and after each backfill chunk."""
    ctx, _ = _context(root / "live", e)
    galleries.create_gallery(ctx, "docs", "text", "v1")
    items = [
        galleries.ItemIn(i, t) for i, t in zip(e.task.gallery_ids, e.task.gallery, strict=True)
    ]
    for s in range(0, len(items), 2000):
        galleries.ingest(ctx, "docs", items[s : s + 2000])
    galleries.publish(ctx, "docs")
    relevant = [e.task.gallery_ids[r] for r in e.task.relevant]
    job = upgrade.start_upgrade(
        ctx, "docs", "text", "v2", pairs=CHUNK, chunk_size=CHUNK,
        probe=[{"text": e.task.queries[i], "relevant": [relevant[i]]} for i in probe],
    )  # fmt: skip
    seqs = upgrade.prepare(ctx, job.id)
    gate = upgrade.get_job(ctx, job.id).report["gate"]
    rows = []
    day_one = root / "day-one"
    for n in range(len(seqs) + 1):
        rec = upgrade.get_job(ctx, job.id)
        snap = root / f"at-{n}"
        ctx.close()  # SQLite flushed: the copy is a consistent state
        shutil.copytree(root / "live", snap)
        if n == 0:
            shutil.copytree(root / "live", day_one)
        ctx, _ = _context(root / "live", e)
        copy, _ = _context(snap, e)
        alone, _ = _stream(copy, e, evalq, read_through=False)
        served, per_query = _stream(copy, e, evalq, read_through=True)
        copy.close()
        shutil.rmtree(snap)
        rows.append({"source": "service", "plan": rec.plan, "merge": gate["probe"]["merge"],
                     "fraction": rec.progress, "r10": served, "r10_backfill_only": alone,
                     "encodes_per_query": per_query})  # fmt: skip
        print(f"  service {rec.progress:4.0%}: served {served:.3f} ({per_query:.1f} encodes/q), "
              f"backfill only {alone:.3f}", flush=True)  # fmt: skip
        if n < len(seqs):
            upgrade.backfill_chunk(ctx, job.id, seqs[n])
    ctx.close()
    return rows, gate, day_one


def simulation(e: Any, probe: np.ndarray, evalq: np.ndarray, fractions: list[float],
               merge: str, root: Path) -> list[dict[str, Any]]:  # fmt: skip
    """bench/upgrade_curve.py's cascade at the same fractions (random items backfilled,
    the same streaming read-through), with the merge the service's gate chose."""
    n = len(e.g_old)
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    weight = 0.5
    if merge == "learned":
        weight = _weight(e, probe)
    plan = Plan("cascade", merge, weight=weight)  # type: ignore[arg-type]
    old = _space(root, "old", np.arange(n), e.g_old, "flat")
    rows = []
    for f in fractions:
        done = np.sort(order[: int(round(f * n))])
        new = _space(root / f"new-{f}", "new", done, e.g_new, "flat")
        rt = LookupReadThrough(new.store, e.g_new)
        ids, encodes = [], 0
        for s in range(0, len(evalq), BATCH):
            q = evalq[s : s + BATCH]
            res = plan_search(MixedIndex(old, new), plan, e.q_new[q], e.q_old[q], 10, rt)
            ids.append(res.ids)
            encodes += int(res.encodes.sum())
        rows.append({"source": "simulation", "plan": "cascade", "merge": merge, "fraction": f,
                     "r10": recall_at_k(np.concatenate(ids), e.task.relevant[evalq], 10),
                     "encodes_per_query": encodes / len(evalq)})  # fmt: skip
    return rows


def _weight(e: Any, probe: np.ndarray, kk: int = 50) -> float:
    cand = np.concatenate([search(e.q_old[probe], e.g_old, kk)[1],
                           search(e.q_new[probe], e.g_new, kk)[1]], axis=1)  # fmt: skip
    so = np.einsum("qcd,qd->qc", e.g_old[cand], e.q_old[probe])
    sn = np.einsum("qcd,qd->qc", e.g_new[cand], e.q_new[probe])
    zo, zn = zscore_rows(so), zscore_rows(sn)
    rel = e.task.relevant[probe]

    def r10(w: float) -> float:
        top = np.take_along_axis(cand, np.argsort(-fuse_z(zo, zn, w), axis=1)[:, :10], 1)
        return recall_at_k(top, rel, 10)

    return fit_weight(r10)


def budget_table(e: Any, evalq: np.ndarray, day_one: Path, root: Path, budgets: list[int],
                 latency_queries: int) -> list[dict[str, Any]]:  # fmt: skip
    """Per budget and mode, on copies of the day-one state: R@10 over the streamed
    evaluation queries (cached encoders) and the median latency of single-query
    searches with the real v2 encoder on the first `latency_queries` of them."""
    rows = []
    for mode in ("sync", "async"):
        for budget in budgets:
            if mode == "async" and budget == 0:
                continue  # nothing to queue
            snap = root / f"budget-{mode}-{budget}"
            shutil.copytree(day_one, snap)
            settings = {"cascade_encode_budget": budget, "cascade_read_through": mode}
            ctx, recs = _context(snap, e, **settings)
            r10, per_query = _stream(ctx, e, evalq, read_through=True)
            ctx.background.submit(lambda: None).result()
            ctx.close()
            shutil.rmtree(snap)
            shutil.copytree(day_one, snap)
            live = Context(_settings(snap, **settings))  # real encoders
            live.encoder(recs["v2"]).encode(["warm up"])
            times = []
            for i in evalq[:latency_queries]:
                t0 = time.perf_counter()
                service.search(live, "docs", texts=[e.task.queries[i]], k=10)
                times.append((time.perf_counter() - t0) * 1e3)
            live.background.submit(lambda: None).result()
            live.close()
            shutil.rmtree(snap)
            rows.append({"mode": mode, "budget": budget, "r10": r10,
                         "encodes_per_query": per_query,
                         "latency_ms": float(np.median(times))})  # fmt: skip
            print(f"  budget {budget} {mode}: R@10 {r10:.3f}, {per_query:.1f} encodes/q, "
                  f"{rows[-1]['latency_ms']:.0f} ms", flush=True)  # fmt: skip
    base = next(r["latency_ms"] for r in rows if r["budget"] == 0)
    for r in rows:
        r["latency_ratio"] = r["latency_ms"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows")
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--latency-queries", type=int, default=60)
    args = parser.parse_args()
    t0 = time.perf_counter()
    e = embedded_pair(PAIR, 3000, 12000, 0)
    qperm = np.random.default_rng(0).permutation(len(e.q_new))
    probe, evalq = qperm[: len(qperm) // 2], qperm[len(qperm) // 2 :]
    r_oo = recall_at_k(search(e.q_old[evalq], e.g_old, 10)[1], e.task.relevant[evalq], 10)
    r_nn = recall_at_k(search(e.q_new[evalq], e.g_new, 10)[1], e.task.relevant[evalq], 10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        served, gate, day_one = service_curve(e, probe, evalq, root)
        fractions = [r["fraction"] for r in served]
        simulated = simulation(e, probe, evalq, fractions, gate["probe"]["merge"], root / "sim")
        budgets = budget_table(e, evalq, day_one, root, args.budgets, args.latency_queries)
    rows = []
    for s, m in zip(served, simulated, strict=True):
        rows += [{**s, "r10_old_old": r_oo, "r10_new_new": r_nn},
                 {**m, "r10_old_old": r_oo, "r10_new_new": r_nn}]  # fmt: skip
    side = [{"fraction": s["fraction"], "service": s["r10"], "simulation": m["r10"],
             "difference": s["r10"] - m["r10"], "service_backfill_only": s["r10_backfill_only"],
             "encodes/q service": s["encodes_per_query"], "encodes/q simulation":
             m["encodes_per_query"]} for s, m in zip(served, simulated, strict=True)]  # fmt: skip
    print(f"gate: {gate['plan']} ({gate['reason']}); M(old,old) {r_oo:.3f}, M(new,new) {r_nn:.3f}")
    print_table(side, list(side[0]))
    print_table(
        budgets, ["mode", "budget", "r10", "encodes_per_query", "latency_ms", "latency_ratio"]
    )
    print(f"{time.perf_counter() - t0:.0f} s")
    write_json(args.json, {"rows": rows, "budgets": budgets, "gate": gate})


if __name__ == "__main__":
    main()
