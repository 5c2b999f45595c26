"""Celery tasks over the upgrade steps of `embcompat.service.upgrade`.

Every task is idempotent (the DB is the ledger): a redelivered or duplicated task finds
its step done and returns. Only transient errors are retried, with backoff. Tasks take
ids, never arrays: vectors travel through the vector store.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any

import numpy as np
from celery import Task, shared_task
from celery.signals import worker_process_init
from sqlalchemy import select

from embcompat.errors import EmbcompatError, ServiceUnavailable
from embcompat.kinds import JobState
from embcompat.registry.schema import Job
from embcompat.service import galleries, reports, training, upgrade
from embcompat.service.context import Context

RETRY = {"autoretry_for": (ServiceUnavailable,), "retry_backoff": True, "max_retries": 5}
JOB_TASKS = ("workers.tasks.run_upgrade", "workers.tasks.backfill_chunk")
TRAIN_TIME_LIMIT_S = 48 * 3600


class ContextTask(Task):  # type: ignore[misc]
    """A task instance lives as long as its worker process: it keeps one service
    context, so encoders, stores and searchers stay warm across tasks."""

    @cached_property
    def ctx(self) -> Context:
        return Context()

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A job task that failed for good (retries spent) fails its job, with the error:
        nothing else would move it."""
        if self.name in JOB_TASKS and args:
            with contextlib.suppress(EmbcompatError):
                upgrade.fail(self.ctx, int(args[0]), f"{type(exc).__name__}: {exc}")


@worker_process_init.connect
def warm_encoders(**_: object) -> None:
    """Each worker process loads the encoders of the upgrades in flight before its first
    task, so a chunk's time is encoding, not model loading."""
    with contextlib.suppress(EmbcompatError):  # a failed warm-up must not refuse work
        upgrade.warm_active_encoders(backfill_chunk.ctx)


@shared_task(name="workers.tasks.run_upgrade", base=ContextTask, bind=True, **RETRY)
def run_upgrade(self: ContextTask, job_id: int) -> str:
    """pair → train → gate → map, then one backfill task per chunk due."""
    ctx = self.ctx
    try:
        with upgrade.failing_job(ctx, job_id, transient_too=False):
            upgrade.prepare(ctx, job_id)
            seqs = upgrade.chunks_due(ctx, job_id)  # with a schedule, beat sends the rest
    except EmbcompatError as exc:
        if exc.transient:
            raise  # retried; on_failure fails the job once the retries are spent
        return "failed"
    for seq in seqs:
        backfill_chunk.delay(job_id, seq)
    if upgrade.chunks_left(ctx, job_id) == 0:
        upgrade.finalize(ctx, job_id)
    return upgrade.get_job(ctx, job_id).state


@shared_task(name="workers.tasks.backfill_chunk", base=ContextTask, bind=True, **RETRY)
def backfill_chunk(self: ContextTask, job_id: int, seq: int) -> int:
    """Re-embed one chunk; the task that finishes the last chunk finalizes the job."""
    with upgrade.failing_job(self.ctx, job_id, transient_too=False):
        done = upgrade.backfill_chunk(self.ctx, job_id, seq)
        if upgrade.chunks_left(self.ctx, job_id) == 0:
            upgrade.finalize(self.ctx, job_id)
    return done


@shared_task(name="workers.tasks.ingest", base=ContextTask, bind=True, **RETRY)
def ingest(self: ContextTask, gallery: str, batch: int = 1000) -> int:
    """Encode a gallery's staged items with its serving version, a batch at a time."""
    total = 0
    while done := galleries.encode_staged(self.ctx, gallery, batch):
        total += done
    galleries.publish(self.ctx, gallery)
    return total


@shared_task(name="workers.tasks.version_report", base=ContextTask, bind=True, **RETRY)
def version_report(self: ContextTask, model: str, version: str) -> str:
    """Measure what upgrading each gallery of the model to this version would do."""
    return reports.run_report(self.ctx, model, version)


# Training runs for hours: no app-wide time limit. A copy redelivered while the first
# still trains finds the run's lease held and returns; the beat re-sends lapsed runs.
@shared_task(
    name="workers.tasks.train_compatible", base=ContextTask, bind=True,
    time_limit=TRAIN_TIME_LIMIT_S, soft_time_limit=TRAIN_TIME_LIMIT_S - 300, **RETRY,
)  # fmt: skip
def train_compatible(self: ContextTask, run_id: int) -> str:
    """Fine-tune a compatible version and register it (a redelivered run resumes from
    its last epoch checkpoint; a done one returns), then ask for its upgrade report. A
    run another live worker holds is looked at again a third of a lease later: done by
    then, or taken over if that worker died."""
    from embcompat.workers.app import report_registered

    out = training.run_training(self.ctx, run_id)
    if out["state"] == "running":
        lease = self.ctx.settings.training_lease_s
        raise self.retry(countdown=max(5, lease // 3), max_retries=None)
    report_registered(self.ctx, out)
    return str(out["state"])


@shared_task(name="workers.tasks.read_through", base=ContextTask, bind=True, **RETRY)
def read_through(self: ContextTask, gallery: str, version_id: int, ids: list[int]) -> int:
    """Encode and store the items a search touched (asynchronous read-through): the
    next searches find them in the new space. Idempotent (stored ones are skipped)."""
    with self.ctx.session() as s:
        version = galleries.version_record(self.ctx, s, version_id)
    return len(galleries.encode_and_store(self.ctx, gallery, version, np.array(ids, np.int64)))


@shared_task(name="workers.tasks.reconcile", base=ContextTask, bind=True)
def reconcile(self: ContextTask) -> int:
    """Beat, every minute: dispatch the chunks due now for every backfilling job (their
    schedule's window and rate, and chunks whose worker was lost), the reports of
    versions a workflow marked `candidate` in MLflow directly, and training runs whose
    lease lapsed (a lost dispatch, a killed worker)."""
    with self.ctx.session() as s:
        jobs = list(s.scalars(select(Job.id).where(Job.state == JobState.BACKFILLING)))
    sent = 0
    for run_id in training.lapsed_runs(self.ctx):
        train_compatible.delay(run_id)
        sent += 1
    for model, version in reports.candidates_without_report(self.ctx):
        if reports.request_report(self.ctx, model, version):
            version_report.delay(model, version)
            sent += 1
    for job_id in jobs:
        for seq in upgrade.chunks_due(self.ctx, job_id):
            backfill_chunk.delay(job_id, seq)
            sent += 1
    return sent
