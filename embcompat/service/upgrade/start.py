"""Planning and starting an upgrade: every refusal happens here, before anything runs."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embcompat.errors import UpgradeInProgress, UpgradeRefused
from embcompat.kinds import JobState, UpgradePlan
from embcompat.registry import versions
from embcompat.registry.jobs import active_upgrade, failed_upgrades
from embcompat.registry.schema import Gallery, Item, Job, JobChunk, ModelVersion
from embcompat.service.context import Context
from embcompat.service.galleries import gallery_lock, get_gallery_row, get_probe, version_record
from embcompat.service.upgrade.fitting import MIN_SAMPLE
from embcompat.service.upgrade.jobs import drop_mapped_space
from embcompat.service.upgrade.schedule import BackfillSchedule
from embcompat.service.upgrade.states import JobRecord, job_record

PLAN_SUMMARIES = {
    UpgradePlan.CASCADE: "day one: old index proposes, new model re-scores; read-through backfill",
    UpgradePlan.BRIDGE: "new queries mapped into the old space until backfilled",
    UpgradePlan.DUAL: "old part searched exactly as before with the old encoder",
    UpgradePlan.BASIS: "one unified space, no query-time adapter",
}


def _validate(
    session: Session, gallery: str, model: str, to_version: str, plan: str
) -> tuple[Gallery, ModelVersion, ModelVersion, int]:
    g = get_gallery_row(session, gallery)
    target = versions.get_version_row(session, model, to_version)
    source = session.get(ModelVersion, g.serving_version_id)
    if source is None:  # the FK forbids it; a clear error all the same
        raise UpgradeRefused(f"gallery {gallery!r} has no serving version")
    if plan not in set(UpgradePlan):
        raise UpgradeRefused(f"unknown plan {plan!r}", hint=f"one of {', '.join(UpgradePlan)}")
    if target.model_id != g.model_id:
        raise UpgradeRefused(
            f"gallery {gallery!r} serves model {source.model.name!r}; {model}:{to_version} is a "
            "version of another model, whose vectors are not comparable",
            hint="register the new version under the same model",
        )
    if target.id == source.id:
        raise UpgradeRefused(f"gallery {gallery!r} already serves {model}:{to_version}")
    count = session.scalar(select(func.count(Item.id)).where(Item.gallery_id == g.id)) or 0
    if count == 0:
        raise UpgradeRefused(f"gallery {gallery!r} is empty: there is nothing to upgrade")
    compatible = (target.tags or {}).get("compatible_with") == f"{model}:{source.version}"
    if not (compatible and plan in (UpgradePlan.BASIS, UpgradePlan.AUTO)):
        _check_pairable(session, g, f"{model}:{to_version}", target.encoder_uri, plan)
    active = active_upgrade(session, g.id)
    if active is not None:
        raise UpgradeInProgress(
            f"gallery {gallery!r} already has upgrade job {active.id} ({active.state})",
            hint="pause, cancel or roll it back first",
            job=active.id,
        )
    return g, source, target, count


def _check_pairable(session: Session, g: Gallery, target: str, encoder_uri: str, plan: str) -> None:
    """Every plan but a declared-compatible `basis` starts by encoding a sample of the
    gallery's stored texts with the new version: refuse now what could never do so."""
    if encoder_uri == "external":
        raise UpgradeRefused(
            f"{target} is external: nothing can encode the gallery's items with it, so "
            f"plan {plan!r} cannot pair, fit or backfill",
            hint="register a version with an encoder, or one trained compatible (basis)",
        )
    with_text = (
        session.scalar(
            select(func.count(Item.id)).where(
                Item.gallery_id == g.id, Item.payload.is_not(None), Item.payload != ""
            )
        )
        or 0
    )
    if with_text < MIN_SAMPLE:
        raise UpgradeRefused(
            f"gallery {g.name!r} has {with_text} items with stored text: plan {plan!r} needs "
            f"at least {MIN_SAMPLE} to pair the two versions and fit adapters",
            hint="ingest items with their text, or train the new version compatible (basis)",
        )


def plan_upgrade(
    ctx: Context,
    gallery: str,
    model: str,
    to_version: str,
    plan: str = UpgradePlan.AUTO,
    sample: int = 32,
) -> dict[str, Any]:
    """A dry run: what would run, what it would cost, from measured encoder throughput."""
    with ctx.session() as s:
        g, source, target, count = _validate(s, gallery, model, to_version, plan)
        payloads = [
            p
            for (p,) in s.execute(select(Item.payload).where(Item.gallery_id == g.id).limit(sample))
        ]
        target_rec = version_record(ctx, s, target.id)
    throughput = None
    if not target_rec.external and payloads:
        encoder = ctx.encoder(target_rec)
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
        "plans": {str(k): v for k, v in PLAN_SUMMARIES.items()},
    }


def start_upgrade(
    ctx: Context,
    gallery: str,
    model: str,
    to_version: str,
    plan: str = UpgradePlan.AUTO,
    pairs: int = 2000,
    chunk_size: int = 1000,
    schedule: BackfillSchedule | None = None,
    probe: list[dict[str, Any]] | None = None,
    override: bool = False,
) -> JobRecord:
    """Create the job (state planned) and its chunk ledger; refuses before anything runs.
    With a `schedule`, the backfill runs only in its window and at its rate. A `probe`
    (queries as {"text", "relevant": [item ids]}) lets the gate measure with labels;
    without one, the gallery's stored probe (`galleries.set_probe`) is used.
    `override`: serve a requested bridge-type plan although nothing labelled shows it
    is no worse than the old model (recorded with a warning that searches carry)."""
    if pairs < 50 or chunk_size < 1:
        raise UpgradeRefused("an upgrade needs at least 50 pairs and chunk_size >= 1")
    stored_probe = None if probe else get_probe(ctx, gallery)
    with gallery_lock(ctx, gallery), ctx.session(write=True) as s:
        g, source, target, count = _validate(s, gallery, model, to_version, plan)
        superseded = failed_upgrades(s, g.id)
        for old in superseded:  # a failed job gives way to the new one, as if cancelled
            old.state, old.finished_at = JobState.CANCELLED, datetime.now(UTC)
            old.error = f"{old.error or 'failed'}; superseded by a new upgrade"
            g.plan = None
        job = Job(
            kind="upgrade",
            gallery_id=g.id,
            from_version_id=source.id,
            to_version_id=target.id,
            state=JobState.PLANNED,
            plan=None,
            items_total=count,
            params={
                "plan": str(plan),
                "pairs": min(pairs, count),
                "chunk_size": chunk_size,
                "schedule": schedule.to_dict() if schedule else {},
                "probe": probe or stored_probe or [],
                "override": override,
            },
            report={},
        )
        s.add(job)
        try:
            s.flush()
        except IntegrityError as exc:  # another start won the race for this gallery
            raise UpgradeInProgress(
                f"gallery {gallery!r} already has an upgrade job starting",
                hint="pause, cancel or roll it back first",
            ) from exc
        ids = [
            i
            for (i,) in s.execute(select(Item.id).where(Item.gallery_id == g.id).order_by(Item.id))
        ]
        for seq, start in enumerate(range(0, len(ids), chunk_size)):
            part = ids[start : start + chunk_size]
            s.add(JobChunk(job_id=job.id, seq=seq, start=part[0], stop=part[-1] + 1))
        s.flush()
        rec = job_record(s, job)
    for old in superseded:
        drop_mapped_space(ctx, old.id)
    return rec
