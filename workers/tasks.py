"""Celery tasks over the upgrade steps of `embcompat.upgrades`.

Every task is idempotent (the DB is the ledger): a redelivered or duplicated task finds
its step done and returns. Only transient errors are retried, with backoff.
"""

from __future__ import annotations

import contextlib

from celery import shared_task
from celery.signals import worker_process_init
from sqlalchemy import select

from embcompat import galleries, upgrades
from embcompat.context import Context
from embcompat.errors import EmbcompatError, ServiceUnavailable
from embcompat.schedule import chunks_due
from embcompat.registry.schema import Job, JobState

RETRY = {"autoretry_for": (ServiceUnavailable,), "retry_backoff": True, "max_retries": 5}


@worker_process_init.connect
def warm_encoders(**_: object) -> None:
    """Each worker process loads the encoders of the upgrades in flight before its first
    task, so a chunk's time is encoding, not model loading."""
    with contextlib.suppress(EmbcompatError):  # a failed warm-up must not refuse work
        upgrades.warm_active_encoders(Context())


@shared_task(name="workers.tasks.run_upgrade", **RETRY)
def run_upgrade(job_id: int) -> str:
    """pair → train → gate, then one backfill task per pending chunk."""
    ctx = Context()
    try:
        upgrades.step_pair(ctx, job_id)
        upgrades.step_train(ctx, job_id)
        upgrades.step_gate(ctx, job_id)
        for seq in upgrades.map_chunks_needed(ctx, job_id):
            upgrades.map_chunk(ctx, job_id, seq)  # the mapped space must be whole to serve
        upgrades.step_start_backfill(ctx, job_id)
        seqs = chunks_due(ctx, job_id)  # with a schedule, beat's reconcile sends the rest
    except EmbcompatError as exc:
        if exc.transient:
            raise
        upgrades.fail(ctx, job_id, f"{exc.code}: {exc.message}")
        return "failed"
    for seq in seqs:
        backfill_chunk.delay(job_id, seq)
    if upgrades.chunks_left(ctx, job_id) == 0:
        upgrades.finalize(ctx, job_id)
    return upgrades.get_job(ctx, job_id).state


@shared_task(name="workers.tasks.backfill_chunk", **RETRY)
def backfill_chunk(job_id: int, seq: int) -> int:
    """Re-embed one chunk; the task that finishes the last chunk finalizes the job."""
    ctx = Context()
    done = upgrades.backfill_chunk(ctx, job_id, seq)
    if upgrades.chunks_left(ctx, job_id) == 0:
        upgrades.finalize(ctx, job_id)
    return done


@shared_task(name="workers.tasks.ingest", **RETRY)
def ingest(gallery: str, batch: int = 1000) -> int:
    """Encode a gallery's staged items with its serving version, a batch at a time."""
    ctx = Context()
    total = 0
    while done := galleries.encode_staged(ctx, gallery, batch):
        total += done
    galleries.publish(ctx, gallery)
    return total


@shared_task(name="workers.tasks.map_chunk", **RETRY)
def map_chunk(job_id: int, seq: int) -> int:
    """Map one chunk of stored old vectors into the new space (gallery-side adapter)."""
    return upgrades.map_chunk(Context(), job_id, seq)


@shared_task(name="workers.tasks.resume_upgrade")
def resume_upgrade(job_id: int) -> str:
    """After resume (or a lost worker): continue the steps and re-dispatch chunks."""
    return run_upgrade(job_id)


@shared_task(name="workers.tasks.reconcile")
def reconcile() -> int:
    """Beat, every minute: dispatch the chunks due now for every backfilling job (their
    schedule's window and rate, and chunks whose worker was lost)."""
    ctx = Context()
    with ctx.session() as s:
        jobs = list(s.scalars(select(Job.id).where(Job.state == JobState.BACKFILLING)))
    sent = 0
    for job_id in jobs:
        for seq in chunks_due(ctx, job_id):
            backfill_chunk.delay(job_id, seq)
            sent += 1
    return sent
