"""The upgrade job's states, the transitions between them, and the job as a record.

planned → pairing → training → gated → serving_bridge → backfilling → done
(a `mapped` plan maps the whole gallery while gated, and serves only then)
any active state → paused (and back), cancelled, failed; gated (a map under way),
serving/backfilling/failed → rolled_back (serving returns to the old version; nothing
is deleted)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from embcompat.errors import InvalidTransition
from embcompat.kinds import TERMINAL_STATES, JobState
from embcompat.registry.schema import Job, ModelVersion
from embcompat.service.galleries.layout import gallery_row_by_id

S = JobState
RUNNING = [S.PAIRING, S.TRAINING, S.GATED, S.SERVING_BRIDGE, S.BACKFILLING]
TRANSITIONS: dict[JobState, set[JobState]] = {
    S.PLANNED: {S.PAIRING, S.PAUSED, S.CANCELLED, S.FAILED},
    S.PAIRING: {S.TRAINING, S.PAUSED, S.CANCELLED, S.FAILED},
    S.TRAINING: {S.GATED, S.PAUSED, S.CANCELLED, S.FAILED},
    S.GATED: {S.SERVING_BRIDGE, S.PAUSED, S.CANCELLED, S.FAILED, S.ROLLED_BACK},
    S.SERVING_BRIDGE: {S.BACKFILLING, S.PAUSED, S.CANCELLED, S.FAILED, S.ROLLED_BACK},
    S.BACKFILLING: {S.DONE, S.PAUSED, S.CANCELLED, S.FAILED, S.ROLLED_BACK},
    S.PAUSED: {*RUNNING, S.PLANNED, S.CANCELLED, S.ROLLED_BACK},
    S.FAILED: {*RUNNING, S.PLANNED, S.CANCELLED, S.ROLLED_BACK},
    S.DONE: set(),
    S.CANCELLED: set(),
    S.ROLLED_BACK: set(),
}


def transition(job: Job, to: JobState, error: str | None = None) -> None:
    """Move `job` to `to`, or refuse with the moves allowed from where it is."""
    current = JobState(job.state)
    if to not in TRANSITIONS[current]:
        raise InvalidTransition(
            f"upgrade job {job.id} cannot go from {current} to {to}",
            hint=f"allowed from {current}: {', '.join(sorted(TRANSITIONS[current])) or 'nothing'}",
            job=job.id,
        )
    job.state = to
    job.error = error
    if to in TERMINAL_STATES:
        job.finished_at = datetime.now(UTC)


def start_serving(session: Session, job: Job) -> None:
    """From now on the gallery answers searches with the job's plan (mixed versions)."""
    gallery_row_by_id(session, job.gallery_id).plan = job.plan
    transition(job, JobState.SERVING_BRIDGE)


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


def job_record(session: Session, job: Job) -> JobRecord:
    gallery = gallery_row_by_id(session, job.gallery_id)
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
