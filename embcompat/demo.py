"""`embcompat demo`: a whole real upgrade on the embedded defaults, told step by step.

WordNet retrieval task (DATA.md), v1 = all-MiniLM-L6-v2, v2 = all-mpnet-base-v2, both
shipped in PyPI packages. Every step goes through the service layer the API uses. Vectors
are computed once into the same cache the benchmarks use, so the figures match theirs;
an interrupted run (Ctrl-C) resumes its upgrade job where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from embcompat.adapters.io import load_adapter
from embcompat.adapters.metrics import recall_at_k, search
from embcompat.arrays import FloatArray
from embcompat.datasets import cached_encode, wordnet_task
from embcompat.errors import DuplicateVersion
from embcompat.kinds import SERVING_STATES, TERMINAL_STATES, JobState, SourceKind
from embcompat.registry import versions
from embcompat.registry.encoders import Encoder
from embcompat.registry.shipped import MINILM_L6, MPNET
from embcompat.service import galleries, migrate, upgrade
from embcompat.service import search as service_search
from embcompat.service.context import Context

GALLERY = "wordnet"
PREPARING = (JobState.PLANNED, JobState.PAIRING, JobState.TRAINING, JobState.GATED)
MODELS = (("v1", MINILM_L6, 384), ("v2", MPNET, 768))


class CachedTextEncoder:
    """An encoder that answers texts it has already seen from memory (the same vectors
    its model gave) and encodes the rest with the model."""

    def __init__(self, encoder: Encoder, texts: Sequence[str], vectors: FloatArray) -> None:
        self.encoder, self.dim = encoder, encoder.dim
        self.table = {t: v for t, v in zip(texts, vectors, strict=True)}

    def encode(self, items: Sequence[Any], batch_size: int = 64) -> FloatArray:
        missing = [t for t in dict.fromkeys(items) if t not in self.table]
        if missing:
            self.table.update(zip(missing, self.encoder.encode(missing, batch_size), strict=True))
        if not items:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.table[t] for t in items]).astype(np.float32)


def register_text_pair(
    ctx: Context, models_dir: Path | None = None, say: Any = None
) -> dict[str, Any]:
    """text:v1 = all-MiniLM-L6-v2 (384) serving, text:v2 = all-mpnet-base-v2 (768), its
    child; idempotent. Returns the two version records."""
    records = {}
    say = say or (lambda _msg: None)
    with ctx.session() as s:
        for version, shipped, dim in MODELS:
            try:
                versions.register_version(
                    s,
                    ctx.registry,
                    model="text",
                    version=version,
                    dim=dim,
                    source=SourceKind.SHIPPED,
                    location=shipped,
                    models_dir=models_dir or ctx.models_dir,
                    policy=ctx.model_policy,
                    parent="v1" if version == "v2" else None,
                )
                say(f"registered text:{version} ({shipped}, dim {dim}) in MLflow")
            except DuplicateVersion:
                say(f"text:{version} already registered")
            records[version] = versions.get_version(s, ctx.registry, "text", version)
        if versions.serving_version(s, ctx.registry, "text") is None:
            versions.promote(s, ctx.registry, "text", "v1", "serving")
    return records


def _recall(
    ctx: Context,
    q_new: FloatArray,
    q_old: FloatArray,
    relevant: list[str],
    read_through: bool = True,
) -> tuple[float, str, float]:
    """R@10 of the gallery as it is served now, through the service's search, its plan
    and the read-through's on-the-fly encodes per query."""
    found, plan, encodes = [], "single", 0
    for start in range(0, len(q_new), 250):
        sl = slice(start, start + 250)
        rec = galleries.get_gallery(ctx, GALLERY)
        serving_new = rec.serving_version == "v2"
        job = upgrade.latest_job(ctx, GALLERY)
        mixed = job is not None and job.state in SERVING_STATES
        new_side = mixed or serving_new
        res = service_search.search(
            ctx,
            GALLERY,
            vectors=q_new[sl] if new_side else q_old[sl],
            old_vectors=q_old[sl] if new_side else None,  # a kept cascade fuses both
            read_through=read_through,
            k=10,
        )
        plan, encodes = res.plan, encodes + res.encodes
        found += [
            rel in {h.item for h in hits} for hits, rel in zip(res.hits, relevant[sl], strict=True)
        ]
    return float(np.mean(found)), plan, encodes / max(len(q_new), 1)


def run_demo(
    ctx: Context,
    n_queries: int = 3000,
    n_gallery: int = 12000,
    console: Console | None = None,
    crash_at: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the demo upgrade; returns the figures it printed.

    `crash_at`: raise KeyboardInterrupt after that many backfill chunks (as a Ctrl-C
    would), so a test can interrupt the demo and check that the next run resumes."""
    console = console or Console()
    migrate.upgrade(ctx.settings.resolved_database_url)
    console.rule("1. register v1 and v2 in the MLflow model registry")
    recs = register_text_pair(ctx, say=console.print)
    task = wordnet_task(n_queries, n_gallery)
    cache = ctx.data_dir / "cache" / "embeddings"
    vecs: dict[str, dict[str, FloatArray]] = {}
    cached: dict[str, CachedTextEncoder] = {}
    for version, shipped, _ in MODELS:
        encoder = ctx.encoder(recs[version])
        with console.status(
            f"encoding {len(task.gallery)} documents and {len(task.queries)} queries "
            f"with {shipped} (once; cached)"
        ):
            g = cached_encode(shipped, task.gallery, partial(encoder.encode, batch_size=32), cache)
            q = cached_encode(shipped, task.queries, partial(encoder.encode, batch_size=32), cache)
        vecs[version] = {"g": g, "q": q}
        cached[version] = CachedTextEncoder(encoder, task.gallery + task.queries, np.vstack([g, q]))
    # v2 answers from the cache only after the plan has timed its real encoder
    ctx.install_encoder(recs["v1"], cached["v1"])
    relevant = [task.gallery_ids[r] for r in task.relevant]
    q_old, q_new = vecs["v1"]["q"], vecs["v2"]["q"]

    console.rule("2. a real gallery, served by v1")
    if GALLERY not in {g.name for g in galleries.list_galleries(ctx)}:
        galleries.create_gallery(ctx, GALLERY, "text", "v1")
    job = upgrade.latest_job(ctx, GALLERY)
    if job is None:
        items = [
            galleries.ItemIn(i, t) for i, t in zip(task.gallery_ids, task.gallery, strict=True)
        ]
        with _progress(console) as bar:
            t = bar.add_task("ingest", total=len(items))
            for start in range(0, len(items), 1000):
                galleries.ingest(ctx, GALLERY, items[start : start + 1000])
                bar.advance(t, len(items[start : start + 1000]))
        galleries.publish(ctx, GALLERY)
    r_oo = recall_at_k(search(q_old, vecs["v1"]["g"], 10)[1], task.relevant, 10)
    r_nn = recall_at_k(search(q_new, vecs["v2"]["g"], 10)[1], task.relevant, 10)
    if job is None or job.state in PREPARING:
        served, _, _ = _recall(ctx, q_new, q_old, relevant)
        console.print(f"M(old,old) = R@10 {served:.3f} on {len(relevant)} labelled queries")

    console.rule("3. plan, pair, train, gate")
    if job is not None and job.state == JobState.DONE:
        summary = json.loads((ctx.data_dir / "demo" / "summary.json").read_text())
        console.print(
            f"this gallery was upgraded already by job {job.id}: M(new,new) "
            f"{summary['r10_new_new']:.3f}; remove {ctx.data_dir} to run it again"
        )
        return summary  # type: ignore[no-any-return]
    if job is None or job.state in TERMINAL_STATES:
        plan = upgrade.plan_upgrade(ctx, GALLERY, "text", "v2")
        table = Table("items to re-embed", "v2 encoder items/s", "projected backfill", "plans")
        table.add_row(
            str(plan["items_to_reembed"]),
            f"{plan['encoder_items_per_s']:.0f}",
            f"{plan['projected_backfill_s'] / 60:.1f} min",
            ", ".join(plan["plans"]),
        )
        console.print(table)
        ctx.install_encoder(recs["v2"], cached["v2"])
        probe = [{"text": q, "relevant": [r]} for q, r in zip(task.queries, relevant, strict=True)]
        job = upgrade.start_upgrade(
            ctx,
            GALLERY,
            "text",
            "v2",
            pairs=min(2000, n_gallery // 3),
            chunk_size=max(1, n_gallery // 20),
            probe=probe,  # the demo's labels: the gate measures every plan with them
        )
    else:
        console.print(
            f"resuming upgrade job {job.id} ({job.state}, {job.items_done}/{job.items_total})"
        )
    upgrade.prepare(ctx, job.id)
    job = upgrade.get_job(ctx, job.id)
    _compat_table(ctx, job, q_new, vecs["v1"]["g"], task.relevant, r_oo, r_nn, console)

    console.rule(f"4. serve v2 at once ({job.plan}) and backfill")
    # served: every labelled query through the service's search as users send them,
    # read-through on (candidates missing a v2 vector are encoded and stored on the way:
    # this traffic moves items to v2 too, so the next mark comes sooner); backfill only:
    # the same queries with read-through off, first, what the backfill alone has moved
    curve: list[tuple[float, float]] = []
    backfill_only: list[tuple[float, float]] = []
    encodes: list[float] = []
    marks = {"next": 0.0, "chunks": 0}
    with _progress(console) as bar:
        t = bar.add_task("backfill", total=job.items_total, completed=job.items_done)

        def measure(rec: upgrade.JobRecord) -> None:
            bar.update(t, completed=rec.items_done)
            if rec.progress + 1e-9 >= marks["next"]:
                alone, _, _ = _recall(ctx, q_new, q_old, relevant, read_through=False)
                served, plan_name, per_query = _recall(ctx, q_new, q_old, relevant)
                curve.append((rec.progress, served))
                backfill_only.append((rec.progress, alone))
                encodes.append(per_query)
                bar.console.print(
                    f"  backfilled {rec.progress:4.0%}  served R@10 {served:.3f} "
                    f"({plan_name}, {per_query:.1f} encodes/query)  backfill only {alone:.3f}"
                )
                marks["next"] = (int(rec.progress * 5 + 1e-9) + 1) / 5

        def after_chunk(rec: upgrade.JobRecord) -> None:
            measure(rec)
            marks["chunks"] += 1
            if crash_at is not None and marks["chunks"] >= crash_at:
                raise KeyboardInterrupt

        measure(job)
        upgrade.run_in_process(ctx, job.id, on_chunk=after_chunk)

    console.rule("5. done")
    job = upgrade.get_job(ctx, job.id)
    final, _, _ = _recall(ctx, q_new, q_old, relevant)
    curve.append((1.0, final))
    backfill_only.append((1.0, final))
    encodes.append(0.0)
    if galleries.get_gallery(ctx, GALLERY).plan == "cascade":  # the probe: fusion still helps
        console.print(f"M(old,old) {r_oo:.3f}   served at 100 %: {final:.3f} (v2 with v1 kept "
                      "in the cascade: the probe showed the fusion beats v2 alone)")  # fmt: skip
    else:
        console.print(f"M(old,old) {r_oo:.3f}   M(new,new) {final:.3f} (v1 retired, v2 serving)")
    console.print(
        f"(exact search with v2 over the same data, as bench/compat.py measures: {r_nn:.3f})"
    )
    summary = _report(ctx, job, curve, backfill_only, encodes, r_oo, final, console)
    return {**summary, "r10_new_new_exact": r_nn}


def _progress(console: Console) -> Progress:
    """Progress bars on the demo's console (what it prints is one record)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _compat_table(
    ctx: Context,
    job: upgrade.JobRecord,
    q_new: FloatArray,
    g_old: FloatArray,
    relevant: Any,
    r_oo: float,
    r_nn: float,
    console: Console,
) -> None:
    bridge = job.report.get("bridge", {})
    gate = job.report.get("gate", {})
    table = Table("adapter (query: new->old)", "proxy R@10 on held-out pairs", "chosen")
    for kind, score in sorted(bridge.get("scores", {}).items(), key=lambda kv: -kv[1]):
        table.add_row(kind, f"{score:.3f}", "yes" if kind == bridge.get("kind") else "")
    console.print(table)
    adapter = load_adapter(upgrade.job_dir(ctx, job.id) / "bridge")
    r_no = recall_at_k(search(adapter.transform(q_new), g_old, 10)[1], relevant, 10)
    labelled = Table("M(old,old)", "M(new,new)", "M(new,old) via bridge", "retention", "ECC")
    labelled.add_row(
        f"{r_oo:.3f}",
        f"{r_nn:.3f}",
        f"{r_no:.3f}",
        f"{r_no / r_nn:.2f}",
        "pass" if r_no > r_oo else "fail",
    )
    console.print(labelled)
    plans = (gate.get("probe") or {}).get("plans") or {}
    if plans:
        measured = Table(
            "plan (gate, demo's labels)", "R@10 day one", "at 100 %", "lowest",
            "queries won / lost vs v1", "no-regret", title="the gate's measurement",
        )  # fmt: skip
        for name, p in sorted(plans.items(), key=lambda kv: -kv[1]["lowest"]):
            measured.add_row(
                name, f"{p['r10_day_one']:.3f}", f"{p['r10_final']:.3f}", f"{p['lowest']:.3f}",
                f"{p['queries_won']} / {p['queries_lost']}", "yes" if p["no_regret"] else "no",
            )  # fmt: skip
        console.print(measured)
    console.print(
        f"label-free check (advice only): proxy M(new,old) "
        f"{gate.get('proxy_r10_new_old', 0):.3f} vs M(old,old) "
        f"{gate.get('proxy_r10_old_old', 0):.3f}"
    )
    console.print(f"gate: plan [bold]{job.plan}[/bold]: {gate.get('reason')}")


def _report(
    ctx: Context,
    job: upgrade.JobRecord,
    curve: list[tuple[float, float]],
    backfill_only: list[tuple[float, float]],
    encodes: list[float],
    r_oo: float,
    final: float,
    console: Console,
) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ctx.data_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    png = out / "upgrade_curve.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*curve, strict=True), marker="o", label=f"served ({job.plan}, read-through)")
    ax.plot(*zip(*backfill_only, strict=True), marker=".", ls="--", label="backfill only")
    ax.axhline(r_oo, color="k", ls="--", lw=1, label="M(old,old)")
    ax.axhline(final, color="k", ls=":", lw=1, label="M(new,new)")
    ax.set(xlabel="backfill fraction", ylabel="R@10", title="embcompat demo: upgrade curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    summary = {
        "job": job.id,
        "plan": job.plan,
        "r10_old_old": r_oo,
        "r10_new_new": final,
        "curve": curve,
        "curve_backfill_only": backfill_only,
        "encodes_per_query": encodes,
        "no_step_below_old_old": all(r >= r_oo for _, r in curve),
    }
    with ctx.registry.run("demo upgrade curve", {"job": str(job.id), "plan": str(job.plan)}):
        for i, ((fraction, r10), (_, alone)) in enumerate(zip(curve, backfill_only, strict=True)):
            ctx.registry.mlflow.log_metric("r10", r10, step=i)
            ctx.registry.mlflow.log_metric("r10_backfill_only", alone, step=i)
            ctx.registry.mlflow.log_metric("encodes_per_query", encodes[i], step=i)
            ctx.registry.mlflow.log_metric("fraction", fraction, step=i)
        ctx.registry.mlflow.log_artifact(str(png))
        ctx.registry.mlflow.log_dict(summary, "summary.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"plot: {png}")
    console.print(
        f"MLflow store: {ctx.settings.resolved_mlflow_uri} (experiment "
        f"'{ctx.settings.mlflow_experiment}', run 'demo upgrade curve')"
    )
    console.print(
        f"open it: .venv/bin/mlflow ui --backend-store-uri {ctx.settings.resolved_mlflow_uri}"
    )
    return summary
