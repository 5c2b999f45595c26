"""Operators' control of a job: look it up, pause, resume, cancel, roll back, fail."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from embcompat.errors import UpgradeInProgress
from embcompat.kinds import TERMINAL_STATES, ChunkState, JobState
from embcompat.registry.schema import Job, JobChunk
from embcompat.service.context import Context
from embcompat.service.galleries import get_gallery_row
from embcompat.service.galleries.layout import gallery_row_by_id
from embcompat.service.upgrade.jobs import drop_mapped_space, job_row
from embcompat.service.upgrade.states import TRANSITIONS, JobRecord, job_record, transition


def get_job(ctx: Context, job_id: int) -> JobRecord:
    with ctx.session() as s:
        return job_record(s, job_row(s, job_id))


def latest_job(ctx: Context, gallery: str) -> JobRecord | None:
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        job = s.scalars(select(Job).where(Job.gallery_id == g.id).order_by(Job.id.desc())).first()
        return job_record(s, job) if job else None


def pause(ctx: Context, job_id: int) -> JobRecord:
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        resume_to = job.state
        transition(job, JobState.PAUSED)
        job.params = {**job.params, "resume_to": resume_to}
        return job_record(s, job)


def resume(ctx: Context, job_id: int) -> JobRecord:
    """Back to where it paused (or failed); stale running chunks are re-queued."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        target = JobState(job.params.get("resume_to") or JobState.PLANNED)
        if job.state == JobState.FAILED and target == JobState.PLANNED:
            target = JobState.BACKFILLING if job.plan else JobState.PLANNED
        transition(job, target)
        for c in s.scalars(
            select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.state != ChunkState.DONE)
        ):
            c.state = ChunkState.PENDING
        try:
            s.flush()
        except IntegrityError as exc:  # the gallery started another upgrade meanwhile
            raise UpgradeInProgress(
                f"upgrade job {job_id} cannot resume: its gallery has another active upgrade",
                hint="cancel one of the two",
                job=job_id,
            ) from exc
        return job_record(s, job)


def cancel(ctx: Context, job_id: int) -> JobRecord:
    """Stop the job for good; the gallery serves its old version alone. Vectors the job
    stored in the new version's space stay (each records the content it was computed
    from, so a later upgrade reuses only those still current); its mapped space goes."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        transition(job, JobState.CANCELLED)
        gallery_row_by_id(s, job.gallery_id).plan = None
        rec = job_record(s, job)
    drop_mapped_space(ctx, job_id)
    return rec


def rollback(ctx: Context, job_id: int) -> JobRecord:
    """Serving returns to the old version at once; the new vectors stay on disk."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        transition(job, JobState.ROLLED_BACK)
        g = gallery_row_by_id(s, job.gallery_id)
        if job.from_version_id is not None:
            g.serving_version_id = job.from_version_id
        g.plan = None
        rec = job_record(s, job)
    drop_mapped_space(ctx, job_id)
    return rec


# what an operator can do to a job, by the name the API and the CLI use
CONTROLS = {"pause": pause, "resume": resume, "cancel": cancel, "rollback": rollback}


def fail(ctx: Context, job_id: int, error: str) -> None:
    """Move the job to `failed` with the error text (resume continues where it was)."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        state = JobState(job.state)
        if state not in TERMINAL_STATES and JobState.FAILED in TRANSITIONS[state]:
            job.params = {**job.params, "resume_to": job.state}
            transition(job, JobState.FAILED, error=error[:4000])
