"""The Celery app, configured from settings. No broker configured: tasks run in-process
(`task_always_eager`), so the embedded default needs no server."""

from __future__ import annotations

from typing import Any

from celery import Celery

from embcompat.service import galleries, reports, training, upgrade
from embcompat.service.context import Context
from embcompat.settings import Settings


def create_app(settings: Settings) -> Celery:
    broker = settings.broker_url or "memory://"
    app = Celery("embcompat", broker=broker, backend=settings.result_backend or settings.broker_url)
    app.conf.update(
        task_always_eager=settings.eager_tasks,
        task_eager_propagates=True,
        task_acks_late=True,  # a task killed mid-way is redelivered, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # long tasks: one at a time per process
        task_time_limit=3600,
        task_soft_time_limit=3300,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            "queue_order_strategy": "priority",  # Redis: 0 is served first
            "priority_steps": list(range(10)),
        },
        task_default_priority=5,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        task_default_queue=settings.queue,
        result_expires=24 * 3600,
        beat_schedule={
            "reconcile-upgrades": {"task": "workers.tasks.reconcile", "schedule": 60.0},
        },
        include=["embcompat.workers.tasks"],
    )
    return app


def dispatch_upgrade(ctx: Context, job_id: int) -> str:
    """Hand an upgrade job to the workers; with no broker, run it here and now."""
    if ctx.settings.eager_tasks:
        return upgrade.run_in_process(ctx, job_id).state
    create_app(ctx.settings).send_task("workers.tasks.run_upgrade", args=[job_id])
    return "queued"


def dispatch_report(ctx: Context, model: str, version: str) -> str:
    """Hand a version's registration report to the workers; with no broker, measure it
    here (the API runs it after its answer)."""
    if ctx.settings.eager_tasks:
        return reports.run_report(ctx, model, version)
    create_app(ctx.settings).send_task("workers.tasks.version_report", args=[model, version])
    return "queued"


def dispatch_training(ctx: Context, run_id: int) -> str:
    """Hand a compatible training run to the workers; with no broker, train here (the
    API runs it after its answer), then ask for the new version's report."""
    if ctx.settings.eager_tasks:
        out = training.run_training(ctx, run_id)
        report_registered(ctx, out)
        return str(out["state"])
    create_app(ctx.settings).send_task("workers.tasks.train_compatible", args=[run_id])
    return "queued"


def report_registered(ctx: Context, run: dict[str, Any]) -> None:
    """Registering a version yields its upgrade report: a trained one too."""
    ref = (run.get("result") or {}).get("registered")
    if run.get("state") == "done" and ref:
        model, _, version = ref.partition(":")
        if reports.request_report(ctx, model, version):
            dispatch_report(ctx, model, version)


def dispatch_read_through(ctx: Context, gallery: str, version_id: int, ids: list[int]) -> None:
    """An asynchronous read-through's items, to the workers ahead of backfill chunks."""
    create_app(ctx.settings).send_task(
        "workers.tasks.read_through", args=[gallery, version_id, ids], priority=0
    )


def dispatch_ingest(ctx: Context, gallery: str) -> str:
    """Hand a gallery's staged items to the workers; with no broker, encode them here."""
    if ctx.settings.eager_tasks:
        while galleries.encode_staged(ctx, gallery):
            pass
        galleries.publish(ctx, gallery)
        return "done"
    create_app(ctx.settings).send_task("workers.tasks.ingest", args=[gallery])
    return "queued"
