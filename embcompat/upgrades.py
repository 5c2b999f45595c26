"""The upgrade of a gallery from one model version to the next, as a job stored in the DB.

    planned → pairing → training → gated → serving_bridge → backfilling → done
    any active state → paused (and back), cancelled, failed; serving/backfilling/failed →
    rolled_back (serving returns to the old version; nothing is deleted)

Each step is a plain, idempotent function of (context, job id) that the Celery tasks and
the in-process runner call alike. The chunk ledger (`job_chunks`, ranges of item ids)
makes every backfill chunk happen once: a chunk re-run skips items already upgraded
(by an earlier attempt, by the pair sample, or by read-through search).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embcompat.adapters import Adapter as AdapterBase
from embcompat.adapters import BasisAdapter
from embcompat.adapters.io import load_adapter, save_adapter
from embcompat.adapters.metrics import neighbour_recall, search
from embcompat.adapters.select import select_adapter
from embcompat.context import Context
from embcompat.errors import (
    InvalidTransition,
    UnknownGallery,
    UnknownJob,
    UpgradeInProgress,
    UpgradeRefused,
)
from embcompat.galleries import (
    gallery_dir,
    get_gallery_row,
    space_searcher,
    space_store,
    version_record,
)
from embcompat.probe import measure as probe_measure
from embcompat.schedule import BackfillSchedule
from embcompat.index.curve import curve_summary, fit_calibration, plot_curves, proxy_curve
from embcompat.index.merge import Platt
from embcompat.index.store import SpaceStore, open_space
from embcompat.registry import versions
from embcompat.registry.schema import (
    Adapter,
    AdapterStatus,
    ChunkState,
    Gallery,
    Item,
    Job,
    JobChunk,
    JobState,
    ModelVersion,
)

S = JobState
TERMINAL = {S.DONE, S.CANCELLED, S.ROLLED_BACK}
RUNNING = [S.PAIRING, S.TRAINING, S.GATED, S.SERVING_BRIDGE, S.BACKFILLING]
TRANSITIONS: dict[JobState, set[JobState]] = {
    S.PLANNED: {S.PAIRING, S.PAUSED, S.CANCELLED, S.FAILED},
    S.PAIRING: {S.TRAINING, S.PAUSED, S.CANCELLED, S.FAILED},
    S.TRAINING: {S.GATED, S.PAUSED, S.CANCELLED, S.FAILED},
    S.GATED: {S.SERVING_BRIDGE, S.PAUSED, S.CANCELLED, S.FAILED},
    S.SERVING_BRIDGE: {S.BACKFILLING, S.PAUSED, S.CANCELLED, S.FAILED, S.ROLLED_BACK},
    S.BACKFILLING: {S.DONE, S.PAUSED, S.CANCELLED, S.FAILED, S.ROLLED_BACK},
    S.PAUSED: {*RUNNING, S.PLANNED, S.CANCELLED, S.ROLLED_BACK},
    S.FAILED: {*RUNNING, S.PLANNED, S.CANCELLED, S.ROLLED_BACK},
    S.DONE: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}
SERVING_STATES = {S.SERVING_BRIDGE, S.BACKFILLING}
PLANS = ("auto", "cascade", "bridge", "mapped", "dual", "basis", "backfill")


@dataclass(frozen=True)
class JobRecord:
    id: int
    gallery: str
    state: str
    plan: str | None
    from_version: str | None
    to_version: str | None
    items_total: int
    items_done: int
    progress: float
    rate_per_s: float | None
    eta_s: float | None
    report: dict[str, Any]
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def active_job_row(session: Session, gallery_id: int) -> Job | None:
    return session.scalars(
        select(Job).where(
            Job.gallery_id == gallery_id,
            Job.kind == "upgrade",
            Job.state.not_in([s.value for s in TERMINAL]),
        )
    ).first()


def last_done_job_row(session: Session, gallery_id: int) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.gallery_id == gallery_id, Job.kind == "upgrade", Job.state == S.DONE)
        .order_by(Job.id.desc())
    ).first()


def _job(session: Session, job_id: int, lock: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id)
    if lock and session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    job = session.scalars(query).one_or_none()
    if job is None:
        raise UnknownJob(f"no upgrade job {job_id}", job=job_id)
    return job


def transition(job: Job, to: JobState, error: str | None = None) -> None:
    current = JobState(job.state)
    if to not in TRANSITIONS[current]:
        raise InvalidTransition(
            f"upgrade job {job.id} cannot go from {current} to {to}",
            hint=f"allowed from {current}: {', '.join(sorted(TRANSITIONS[current])) or 'nothing'}",
            job=job.id,
        )
    job.state = to
    job.error = error
    if to in TERMINAL:
        job.finished_at = datetime.now(UTC)


def job_dir(ctx: Context, job_id: int) -> Path:
    return ctx.data_dir / "jobs" / str(job_id)


def record(session: Session, job: Job) -> JobRecord:
    gallery = get_gallery_row_by_id(session, job.gallery_id)
    frm = session.get(ModelVersion, job.from_version_id) if job.from_version_id else None
    to = session.get(ModelVersion, job.to_version_id) if job.to_version_id else None
    rate = eta = None
    if job.started_at and job.items_done:
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
        elapsed = (datetime.now(UTC) - started).total_seconds()
        rate = job.items_done / max(elapsed, 1e-6)
        eta = max(job.items_total - job.items_done, 0) / rate if rate else None
    return JobRecord(
        id=job.id,
        gallery=gallery.name,
        state=job.state,
        plan=job.plan,
        from_version=frm.version if frm else None,
        to_version=to.version if to else None,
        items_total=job.items_total,
        items_done=job.items_done,
        progress=job.items_done / job.items_total if job.items_total else 0.0,
        rate_per_s=rate,
        eta_s=eta,
        report=dict(job.report or {}),
        error=job.error,
    )


def get_gallery_row_by_id(session: Session, gallery_id: int | None) -> Gallery:
    row = session.get(Gallery, gallery_id)
    if row is None:
        raise UnknownGallery(f"gallery {gallery_id} is gone", gallery=gallery_id)
    return row


# -- planning and starting ---------------------------------------------------------------


def _validate(
    session: Session, ctx: Context, gallery: str, model: str, to_version: str, plan: str
) -> tuple[Any, ModelVersion, ModelVersion, int]:
    g = get_gallery_row(session, gallery)
    target = versions.get_version_row(session, model, to_version)
    source = session.get(ModelVersion, g.serving_version_id)
    if source is None:  # the FK forbids it; a clear error all the same
        raise UpgradeRefused(f"gallery {gallery!r} has no serving version")
    if plan not in PLANS:
        raise UpgradeRefused(f"unknown plan {plan!r}", hint=f"one of {', '.join(PLANS)}")
    if target.model_id != g.model_id:
        raise UpgradeRefused(
            f"gallery {gallery!r} serves model {source.model.name!r}; {model}:{to_version} is a "
            "version of another model, whose vectors are not comparable",
            hint="register the new version under the same model",
        )
    if target.id == source.id:
        raise UpgradeRefused(f"gallery {gallery!r} already serves {model}:{to_version}")
    if target.encoder_uri == "external" and plan in ("backfill", "cascade", "auto"):
        raise UpgradeRefused(
            f"{model}:{to_version} is external: nothing can re-embed the gallery with it, so "
            f"plan {plan!r} cannot run",
            hint="map stored vectors through an adapter, or register a version with an encoder",
        )
    count = session.scalar(select(func.count(Item.id)).where(Item.gallery_id == g.id)) or 0
    if count == 0:
        raise UpgradeRefused(f"gallery {gallery!r} is empty: there is nothing to upgrade")
    active = active_job_row(session, g.id)
    if active is not None:
        raise UpgradeInProgress(
            f"gallery {gallery!r} already has upgrade job {active.id} ({active.state})",
            hint="pause, cancel or roll it back first",
            job=active.id,
        )
    return g, source, target, count


def plan_upgrade(
    ctx: Context, gallery: str, model: str, to_version: str, plan: str = "auto", sample: int = 32
) -> dict[str, Any]:
    """A dry run: what would run, what it would cost, from measured encoder throughput."""
    with ctx.session() as s:
        g, source, target, count = _validate(s, ctx, gallery, model, to_version, plan)
        payloads = [
            p
            for (p,) in s.execute(select(Item.payload).where(Item.gallery_id == g.id).limit(sample))
        ]
        target_rec = version_record(ctx, s, target.id)
    throughput = None
    if not target_rec.external and payloads:
        encoder = versions.load_encoder(ctx.registry, target_rec)
        encoder.encode(payloads[:2])  # warm-up
        t0 = time.perf_counter()
        encoder.encode(payloads, ctx.settings.encode_batch_size)
        throughput = len(payloads) / max(time.perf_counter() - t0, 1e-9)
    return {
        "gallery": gallery,
        "from": source.version,
        "to": to_version,
        "plan": plan,
        "items_to_reembed": count,
        "encoder_items_per_s": throughput,
        "projected_backfill_s": count / throughput if throughput else None,
        "plans": {
            "cascade": "day one: old index proposes, new model re-scores; read-through backfill",
            "bridge": "new queries mapped into the old space until backfilled",
            "dual": "old part searched exactly as before with the old encoder",
            "basis": "one unified space, no query-time adapter",
        },
    }


def start_upgrade(
    ctx: Context,
    gallery: str,
    model: str,
    to_version: str,
    plan: str = "auto",
    pairs: int = 2000,
    chunk_size: int = 1000,
    schedule: BackfillSchedule | None = None,
    probe: list[dict[str, Any]] | None = None,
) -> JobRecord:
    """Create the job (state planned) and its chunk ledger; refuses before anything runs.
    With a `schedule`, the backfill runs only in its window and at its rate. A `probe`
    (queries as {"text", "relevant": [item ids]}) lets the gate measure with labels."""
    if pairs < 50 or chunk_size < 1:
        raise UpgradeRefused("an upgrade needs at least 50 pairs and chunk_size >= 1")
    with ctx.session() as s:
        g, source, target, count = _validate(s, ctx, gallery, model, to_version, plan)
        job = Job(
            kind="upgrade",
            gallery_id=g.id,
            from_version_id=source.id,
            to_version_id=target.id,
            state=S.PLANNED,
            plan=None,
            items_total=count,
            params={
                "plan": plan,
                "pairs": min(pairs, count),
                "chunk_size": chunk_size,
                "schedule": schedule.to_dict() if schedule else {},
                "probe": probe or [],
            },
            report={},
        )
        s.add(job)
        s.flush()
        ids = [
            i
            for (i,) in s.execute(select(Item.id).where(Item.gallery_id == g.id).order_by(Item.id))
        ]
        for seq, start in enumerate(range(0, len(ids), chunk_size)):
            part = ids[start : start + chunk_size]
            s.add(JobChunk(job_id=job.id, seq=seq, start=part[0], stop=part[-1] + 1))
        s.flush()
        return record(s, job)


# -- steps (idempotent; each commits its own transition) --------------------------------


def _versions(ctx: Context, job_id: int) -> tuple[Any, Any, str, str]:
    with ctx.session() as s:
        job = _job(s, job_id)
        g = get_gallery_row_by_id(s, job.gallery_id)
        return (
            version_record(ctx, s, job.from_version_id),
            version_record(ctx, s, job.to_version_id),
            g.name,
            g.index_kind,
        )


def declared_compatible(old: Any, new: Any) -> bool:
    """The new version was trained to be compatible with the old one (BCT, BT², OCA,
    d-Simplex: `training/`): its `compatible_with` tag names the old version, and its
    first old.dim coordinates live in the old space."""
    return new.tags.get("compatible_with") == old.ref and new.dim >= old.dim


def _serves_compatible(ctx: Context, job_id: int) -> bool:
    """Plan `basis` (or `auto`) to a declared-compatible version: served at once with
    old vectors zero-padded and no adapter, so nothing is paired, fitted or re-embedded."""
    old, new, _, _ = _versions(ctx, job_id)
    with ctx.session() as s:
        requested = _job(s, job_id).params["plan"]
    return requested in ("basis", "auto") and declared_compatible(old, new)


def _enter(ctx: Context, job_id: int, expected: JobState, to: JobState) -> bool:
    """Move the job from `expected` to `to`; False when it is elsewhere (already past
    this step, paused or cancelled), so a re-delivered task does nothing."""
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        if job.state != expected:
            return False
        if job.started_at is None:
            job.started_at = datetime.now(UTC)
        transition(job, to)
        return True


def encode_and_store(ctx: Context, gallery: str, version: Any, item_ids: np.ndarray) -> np.ndarray:
    """Encode these items' payloads with `version`, store the vectors that are missing,
    and mark them upgraded; returns the ids this call stored (others were already there)."""
    store = space_store(ctx, gallery, version)
    _, have = store.get(item_ids)
    todo = item_ids[~have]
    if len(todo) == 0:
        return todo
    with ctx.session() as s:
        rows = {r.id: r.payload for r in s.scalars(select(Item).where(Item.id.in_(todo.tolist())))}
    todo = np.array([i for i in todo if rows.get(int(i))], np.int64)
    if len(todo) == 0:
        return todo
    encoder = versions.load_encoder(ctx.registry, version)
    vectors = encoder.encode([rows[int(i)] for i in todo], ctx.settings.encode_batch_size)
    added = store.add_missing(todo, vectors)
    if len(added):
        with ctx.session() as s:
            for row in s.scalars(select(Item).where(Item.id.in_(added.tolist()))):
                row.vector_version_id = version.id
    return added


def step_pair(ctx: Context, job_id: int) -> None:
    """Encode a sample of the gallery with the new version: the paired sample, which is
    also the first backfill chunk (its vectors are stored, never thrown away)."""
    if not _enter(ctx, job_id, S.PLANNED, S.PAIRING):
        return
    old, new, gallery, _ = _versions(ctx, job_id)
    with ctx.session() as s:
        job = _job(s, job_id)
        n = 0 if _serves_compatible(ctx, job_id) else int(job.params["pairs"])
    ids = space_store(ctx, gallery, old).snapshot().ids
    sample = np.sort(
        np.random.default_rng(job_id).choice(ids, size=min(n, len(ids)), replace=False)
    )
    encode_and_store(ctx, gallery, new, sample)
    folder = job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "pairs.npy", sample)
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        job.items_done = _count_upgraded(s, job)
        if job.state == S.PAIRING:
            transition(job, S.TRAINING)


def _count_upgraded(session: Session, job: Job) -> int:
    return (
        session.scalar(
            select(func.count(Item.id)).where(
                Item.gallery_id == job.gallery_id, Item.vector_version_id == job.to_version_id
            )
        )
        or 0
    )


def _paired_vectors(ctx: Context, job_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, old vectors, new vectors) of the paired sample, rows aligned."""
    old, new, gallery, _ = _versions(ctx, job_id)
    ids = np.load(job_dir(ctx, job_id) / "pairs.npy")
    x_old, f_old = space_store(ctx, gallery, old).get(ids)
    x_new, f_new = space_store(ctx, gallery, new).get(ids)
    both = f_old & f_new
    return ids[both], x_old[both], x_new[both]


def step_train(ctx: Context, job_id: int) -> None:
    """Fit the query-side bridge and the gallery-side mapper (auto selection), the basis
    and the score calibration on 80 % of the pairs; save each adapter to the job folder
    with its upgrade curve on the held-out 20 %, and log and register each in MLflow."""
    with ctx.session() as s:
        if _job(s, job_id).state != S.TRAINING:
            return
    old, new, gallery, _ = _versions(ctx, job_id)
    if _serves_compatible(ctx, job_id):
        folder = job_dir(ctx, job_id)
        save_adapter(BasisAdapter.identity(new.dim, old.dim), folder / "basis", new.ref, old.ref)
        with ctx.session() as s:
            job = _job(s, job_id, lock=True)
            job.report = {**job.report, "bridge": {"kind": "none", "compatible_by": new.tags}}
            if job.state == S.TRAINING:
                transition(job, S.GATED)
        return
    ids, x_old, x_new = _paired_vectors(ctx, job_id)
    cut = int(0.8 * len(x_old))
    fit_old, fit_new = x_old[:cut], x_new[:cut]
    selection = select_adapter(
        fit_new, fit_old, "query: new->old", fit_kwargs={"residual_mlp": {"max_steps": 200}}
    )
    folder = job_dir(ctx, job_id)
    mapper = select_adapter(fit_old, fit_new, "gallery: old->new", kinds=("procrustes", "affine"))
    calibration = fit_calibration(
        fit_old, fit_new, selection.adapter, mapper.adapter, n_queries=500
    )
    (folder / "calibration.json").write_text(
        json.dumps({k: {"a": v.a, "b": v.b} for k, v in calibration.items()})
    )
    fitted: list[tuple[str, str, AdapterBase, Any, Any, dict[str, float]]] = [
        ("bridge", "bridge", selection.adapter, new, old,
         {f"proxy_r10_{k}": v for k, v in selection.scores.items()}),
        ("mapper", "mapped", mapper.adapter, old, new,
         {f"proxy_r10_{k}": v for k, v in mapper.scores.items()}),
    ]  # fmt: skip
    if new.dim >= old.dim:
        fitted.append(("basis", "basis", BasisAdapter.fit(fit_new, fit_old), new, old, {}))
    pairs_hash = hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16]
    logged: dict[str, dict[str, Any]] = {}
    for name, plan, adapter, source, target, metrics in fitted:
        save_adapter(adapter, folder / name, source=source.ref, target=target.ref)
        curve = proxy_curve(x_old[cut:], x_new[cut:], plan, adapter, calibration)
        plot_curves(curve, folder / f"{name}-curve.png")
        (summary,) = curve_summary([{**r, "pair": ""} for r in curve])
        metrics = {**metrics, "curve_auc": summary["auc"], "curve_min_r10": summary["min_r10"]}
        uri = _log_adapter(ctx, folder, name, adapter, source, target, metrics, pairs_hash)
        logged[name] = {"kind": adapter.kind, "uri": uri, "metrics": metrics}
    with ctx.session() as s:
        for name, _, adapter, source, target, _ in fitted:
            s.add(
                Adapter(
                    from_version_id=source.id,
                    to_version_id=target.id,
                    kind=adapter.kind,
                    direction=adapter.direction,
                    mlflow_model_uri=logged[name]["uri"],
                    metrics=logged[name]["metrics"],
                    status=AdapterStatus.TRAINED,
                )
            )
        job = _job(s, job_id, lock=True)
        job.report = {
            **job.report,
            "bridge": {
                "kind": selection.kind,
                "scores": selection.scores,
                "mlflow_uri": logged["bridge"]["uri"],
            },
            "adapters": logged,
        }
        if job.state == S.TRAINING:
            transition(job, S.GATED)


def _log_adapter(
    ctx: Context,
    folder: Path,
    name: str,
    adapter: AdapterBase,
    source: Any,
    target: Any,
    metrics: dict[str, float],
    pairs_hash: str,
) -> str:
    """Log one adapter folder and its upgrade-curve plot to MLflow with its metrics, and
    register it as a model version tagged from/to/direction/pairs hash."""
    tags = {
        "from": source.ref,
        "to": target.ref,
        "direction": adapter.direction,
        "kind": adapter.kind,
        "pairs_hash": pairs_hash,
    }
    return ctx.registry.log_folder_version(
        f"{source.model}-{name}", folder / name, tags, metrics, (folder / f"{name}-curve.png",)
    )


def step_gate(ctx: Context, job_id: int) -> None:
    """Measure on the held-out 20 % of the pairs and choose the serving plan.

    Label-free truth: the new model's own top-10 among the held-out items. The bridge is
    refused when it recovers less of it than the old model does on its own (M(new,old)
    below M(old,old)); a requested plan that needs a refused bridge falls back to `dual`."""
    with ctx.session() as s:
        job = _job(s, job_id)
        if job.state != S.GATED:
            return
        requested = job.params["plan"]
    old, new, gallery, _ = _versions(ctx, job_id)
    if _serves_compatible(ctx, job_id):
        reason = (
            f"{new.ref} was trained compatible with {old.ref} "
            f"(method {new.tags.get('method', '?')}): old vectors are served zero-padded, "
            "with no adapter and nothing re-embedded"
        )
        _serve(ctx, job_id, "basis", {"plan": "basis", "reason": reason})
        return
    ids, x_old, x_new = _paired_vectors(ctx, job_id)
    h_old, h_new = x_old[int(0.8 * len(x_old)) :], x_new[int(0.8 * len(x_new)) :]
    bridge = load_adapter(job_dir(ctx, job_id) / "bridge", source=new.ref, target=old.ref)
    truth = search(h_new, h_new, 11)[1][:, 1:]
    old_old = neighbour_recall(search(h_old, h_old, 11)[1][:, 1:], truth)
    new_old = neighbour_recall(search(bridge.transform(h_new), h_old, 11)[1][:, 1:], truth)
    bridge_ok = new_old >= old_old
    both_encoders = not old.external and not new.external
    if requested == "auto":
        plan = "cascade" if both_encoders else ("bridge" if bridge_ok else "dual")
        reason = (
            "both encoders are available: the cascade fuses them from day one"
            if both_encoders
            else "chosen by the gate's measurement"
        )
    elif requested == "bridge" and not bridge_ok:
        plan, reason = "dual", "the bridge would search worse than staying on the old model"
    else:
        plan, reason = requested, "requested"
    if plan in ("dual", "cascade") and old.external:
        plan, reason = "bridge", f"{old.ref} is external: queries cannot be encoded by it"
    labelled = _measure_probe(ctx, job_id, old, new, ids, x_old, x_new) if both_encoders else None
    if labelled and labelled.get("downgrade"):
        fail(
            ctx,
            job_id,
            f"upgrade refused: a downgrade on the labelled probe (M(new,new) "
            f"{labelled['r10_new_new']:.3f} < M(old,old) {labelled['r10_old_old']:.3f})",
        )
        with ctx.session() as s:
            job = _job(s, job_id)
            job.report = {
                **job.report,
                "gate": {"probe": labelled, "plan": None, "reason": "downgrade: not worth running"},
            }
        return
    if labelled and plan == "cascade" and labelled.get("capped"):
        reason += (
            f"; the old model's recall@{labelled['cascade_k']} caps the cascade below "
            "v2 alone: backfill soon, items queries touch first (read-through)"
        )
    gate = {
        "proxy_r10_old_old": old_old,
        "proxy_r10_new_old": new_old,
        "bridge_accepted": bridge_ok,
        "plan": plan,
        "reason": reason,
        "held_out_pairs": len(h_old),
        **({"probe": labelled} if labelled else {}),
    }
    with ctx.session() as s:
        adapter = s.scalars(
            select(Adapter)
            .where(
                Adapter.from_version_id == new.id,
                Adapter.to_version_id == old.id,
                Adapter.direction == "query: new->old",
            )
            .order_by(Adapter.id.desc())
        ).first()
        if adapter is not None:
            adapter.status = AdapterStatus.ACCEPTED if bridge_ok else AdapterStatus.REFUSED
            adapter.metrics = {**adapter.metrics, **gate}
    _serve(ctx, job_id, plan if plan != "backfill" else "dual", gate)


def _serve(ctx: Context, job_id: int, plan: str, gate: dict[str, Any]) -> None:
    """Record the gate's verdict and start serving the mixed gallery with `plan`."""
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        job.report = {**job.report, "gate": gate}
        if job.state == S.GATED:
            job.plan = plan
            get_gallery_row_by_id(s, job.gallery_id).plan = plan
            transition(job, S.SERVING_BRIDGE)


def _measure_probe(
    ctx: Context,
    job_id: int,
    old: Any,
    new: Any,
    ids: np.ndarray,
    x_old: np.ndarray,
    x_new: np.ndarray,
) -> dict[str, Any] | None:
    with ctx.session() as s:
        job = _job(s, job_id)
        probe, gallery_id, total = job.params.get("probe") or [], job.gallery_id, job.items_total
    if not probe or gallery_id is None:
        return None
    return probe_measure(ctx, gallery_id, probe, ids, x_old, x_new, old, new, total)


def map_chunks_needed(ctx: Context, job_id: int) -> list[int]:
    """The chunks to map before serving, when the job serves the `mapped` plan."""
    with ctx.session() as s:
        job = _job(s, job_id)
        if job.plan != "mapped" or job.state != S.SERVING_BRIDGE:
            return []
        return [c.seq for c in s.scalars(select(JobChunk).where(JobChunk.job_id == job_id))]


def step_start_backfill(ctx: Context, job_id: int) -> list[int]:
    """Enter backfilling; returns the chunk seqs still to do (for dispatch)."""
    _enter(ctx, job_id, S.SERVING_BRIDGE, S.BACKFILLING)
    with ctx.session() as s:
        if _job(s, job_id).state != S.BACKFILLING:
            return []
        return [
            c.seq
            for c in s.scalars(
                select(JobChunk)
                .where(JobChunk.job_id == job_id, JobChunk.state != ChunkState.DONE)
                .order_by(JobChunk.seq)
            )
        ]


def backfill_chunk(ctx: Context, job_id: int, seq: int) -> int:
    """Re-embed one chunk's items with the new version; done exactly once per chunk.
    Returns how many items this call upgraded."""
    with ctx.session() as s:
        job = _job(s, job_id)
        chunk = s.scalars(
            select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq == seq)
        ).one()
        if chunk.state == ChunkState.DONE or job.state != S.BACKFILLING:
            return 0
        chunk.state, chunk.attempts = ChunkState.RUNNING, chunk.attempts + 1
        lo, hi = chunk.start, chunk.stop
        ids = np.array(
            [
                i
                for (i,) in s.execute(
                    select(Item.id).where(
                        Item.gallery_id == job.gallery_id, Item.id >= lo, Item.id < hi
                    )
                )
            ],
            np.int64,
        )
    _, new, gallery, _ = _versions(ctx, job_id)
    try:
        added = encode_and_store(ctx, gallery, new, ids)
    except Exception as exc:
        with ctx.session() as s:
            c = s.scalars(
                select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq == seq)
            ).one()
            c.state, c.error = ChunkState.FAILED, repr(exc)[:2000]
        raise
    with ctx.session() as s:
        c = s.scalars(select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq == seq)).one()
        c.state, c.items_done, c.error = ChunkState.DONE, len(ids), None
        job = _job(s, job_id, lock=True)
        job.items_done = _count_upgraded(s, job)
    return len(added)


def mapped_store(ctx: Context, gallery: str, old: Any, new: Any) -> SpaceStore:
    """Old vectors mapped into the new space: a space of its own, `v<old>-to-<new>`."""
    root = gallery_dir(ctx, gallery) / "vectors" / f"v{old.id}-to-{new.id}"
    return open_space(root, new.dim)


def map_chunk(ctx: Context, job_id: int, seq: int) -> int:
    """Push one chunk's stored old vectors through the gallery-side adapter into the
    mapped space (idempotent: ids already mapped are skipped). Returns vectors mapped."""
    old, new, gallery, _ = _versions(ctx, job_id)
    with ctx.session() as s:
        job = _job(s, job_id)
        chunk = s.scalars(
            select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq == seq)
        ).one()
        ids = np.array(
            [
                i
                for (i,) in s.execute(
                    select(Item.id).where(
                        Item.gallery_id == job.gallery_id,
                        Item.id >= chunk.start,
                        Item.id < chunk.stop,
                    )
                )
            ],
            np.int64,
        )
    mapper = load_adapter(job_dir(ctx, job_id) / "mapper", source=old.ref, target=new.ref)
    vectors, found = space_store(ctx, gallery, old).get(ids)
    return len(
        mapped_store(ctx, gallery, old, new).add_missing(
            ids[found], mapper.transform(vectors[found])
        )
    )


def chunks_left(ctx: Context, job_id: int) -> int:
    with ctx.session() as s:
        return (
            s.scalar(
                select(func.count(JobChunk.id)).where(
                    JobChunk.job_id == job_id, JobChunk.state != ChunkState.DONE
                )
            )
            or 0
        )


def finalize(ctx: Context, job_id: int) -> bool:
    """When every chunk is done: publish the new space's index, serve the new version
    (MLflow `serving` alias), retire the bridge. Idempotent; False if not ready."""
    if chunks_left(ctx, job_id):
        return False
    old, new, gallery, kind = _versions(ctx, job_id)
    with ctx.session() as s:
        if _job(s, job_id).state != S.BACKFILLING:
            return False
    searcher = space_searcher(ctx, gallery, new, kind)
    searcher.generations.publish(searcher.store)
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        if job.state != S.BACKFILLING:
            return False
        g = get_gallery_row_by_id(s, job.gallery_id)
        labelled = job.report.get("gate", {}).get("probe") or {}
        keep = job.plan == "cascade" and bool(labelled.get("keep_old_at_100"))
        job.report = {
            **job.report,
            "finalize": {
                "keep_old": keep,
                "fusion_gain": labelled.get("fusion_gain"),
                "reason": (
                    "the labelled probe measured a fusion gain worth keeping v1's vectors "
                    "and encoder"
                    if keep
                    else "v1 retired: no labelled probe measured a fusion gain worth keeping it"
                    if not labelled.get("r10_new_new")
                    else "v1 retired: the fusion gain on the probe is under one point"
                ),
            },
        }
        g.serving_version_id, g.plan = new.id, "cascade" if keep else None
        job.items_done = _count_upgraded(s, job)
        versions.promote(s, ctx.registry, new.model, new.version, "serving")
        transition(job, S.DONE)
    return True


def warm_active_encoders(ctx: Context) -> int:
    """Load the new version's encoder of every upgrade that has not ended; returns how many."""
    with ctx.session() as s:
        rows = s.scalars(
            select(Job).where(Job.kind == "upgrade", Job.state.not_in([t.value for t in TERMINAL]))
        ).all()
        targets = {r.to_version_id for r in rows if r.to_version_id is not None}
        records = [version_record(ctx, s, v) for v in targets]
    for rec in records:
        if not rec.external:
            versions.load_encoder(ctx.registry, rec)
    return len(records)


# -- control ---------------------------------------------------------------------------


def get_job(ctx: Context, job_id: int) -> JobRecord:
    with ctx.session() as s:
        return record(s, _job(s, job_id))


def latest_job(ctx: Context, gallery: str) -> JobRecord | None:
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        job = s.scalars(select(Job).where(Job.gallery_id == g.id).order_by(Job.id.desc())).first()
        return record(s, job) if job else None


def pause(ctx: Context, job_id: int) -> JobRecord:
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        resume_to = job.state
        transition(job, S.PAUSED)
        job.params = {**job.params, "resume_to": resume_to}
        return record(s, job)


def resume(ctx: Context, job_id: int) -> JobRecord:
    """Back to where it paused (or failed); stale running chunks are re-queued."""
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        target = JobState(job.params.get("resume_to") or S.PLANNED)
        if job.state == S.FAILED and target == S.PLANNED:
            target = S.BACKFILLING if job.plan else S.PLANNED
        transition(job, target)
        for c in s.scalars(
            select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.state != ChunkState.DONE)
        ):
            c.state = ChunkState.PENDING
        return record(s, job)


def cancel(ctx: Context, job_id: int) -> JobRecord:
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        transition(job, S.CANCELLED)
        get_gallery_row_by_id(s, job.gallery_id).plan = None
        return record(s, job)


def rollback(ctx: Context, job_id: int) -> JobRecord:
    """Serving returns to the old version at once; the new vectors stay on disk."""
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        transition(job, S.ROLLED_BACK)
        g = get_gallery_row_by_id(s, job.gallery_id)
        if job.from_version_id is not None:
            g.serving_version_id = job.from_version_id
        g.plan = None
        return record(s, job)


def fail(ctx: Context, job_id: int, error: str) -> None:
    with ctx.session() as s:
        job = _job(s, job_id, lock=True)
        if JobState(job.state) not in TERMINAL and S.FAILED in TRANSITIONS[JobState(job.state)]:
            job.params = {**job.params, "resume_to": job.state}
            transition(job, S.FAILED, error=error[:4000])


def load_platt(ctx: Context, job_id: int) -> dict[str, Platt]:
    path = job_dir(ctx, job_id) / "calibration.json"
    if not path.exists():
        return {}
    return {k: Platt(**v) for k, v in json.loads(path.read_text()).items()}


def run_in_process(
    ctx: Context, job_id: int, on_chunk: Any = None, stop_after: int | None = None
) -> JobRecord:
    """Run the whole job in this process (the embedded default, and the demo).

    `on_chunk(record)` is called after each backfill chunk; `stop_after` chunks, the run
    returns early (the job stays backfilling and resumes where it stopped)."""
    step_pair(ctx, job_id)
    step_train(ctx, job_id)
    step_gate(ctx, job_id)
    for seq in map_chunks_needed(ctx, job_id):
        map_chunk(ctx, job_id, seq)
    for n, seq in enumerate(step_start_backfill(ctx, job_id)):
        if stop_after is not None and n >= stop_after:
            return get_job(ctx, job_id)
        backfill_chunk(ctx, job_id, seq)
        if on_chunk is not None:
            on_chunk(get_job(ctx, job_id))
    finalize(ctx, job_id)
    return get_job(ctx, job_id)
