"""One way to drive a job through its steps, shared by the Celery tasks, the in-process
(embedded) dispatch and the demo. Every step is idempotent, so a runner that stops
anywhere is resumed by running it again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from embcompat.errors import EmbcompatError
from embcompat.service.context import Context
from embcompat.service.upgrade.backfill import (
    backfill_chunk,
    finalize,
    map_batches,
    map_chunks,
    publish_mapped,
    step_start_backfill,
)
from embcompat.service.upgrade.control import fail, get_job
from embcompat.service.upgrade.fitting import step_train
from embcompat.service.upgrade.gate import step_gate
from embcompat.service.upgrade.pairing import step_pair
from embcompat.service.upgrade.states import JobRecord


@contextmanager
def failing_job(ctx: Context, job_id: int, transient_too: bool = True) -> Iterator[None]:
    """Any error inside moves the job to `failed` with its text (and is raised again),
    so no job sits in a running state with nothing running it. `transient_too=False`
    leaves transient errors to the caller's retries (Celery)."""
    try:
        yield
    except EmbcompatError as exc:
        if transient_too or not exc.transient:
            fail(ctx, job_id, f"{exc.code}: {exc.message}")
        raise
    except Exception as exc:
        fail(ctx, job_id, f"internal_error: {type(exc).__name__}: {exc}")
        raise


def prepare(ctx: Context, job_id: int) -> list[int]:
    """pair → train → gate → map (a mapped plan serves only once the whole gallery is
    mapped) → enter backfilling; returns the chunk seqs still to backfill."""
    step_pair(ctx, job_id)
    step_train(ctx, job_id)
    step_gate(ctx, job_id)
    for seqs in map_batches(ctx, job_id):
        map_chunks(ctx, job_id, seqs)
    publish_mapped(ctx, job_id)
    return step_start_backfill(ctx, job_id)


def run_in_process(
    ctx: Context,
    job_id: int,
    on_chunk: Callable[[JobRecord], None] | None = None,
    stop_after: int | None = None,
) -> JobRecord:
    """Run the whole job in this process (the embedded default, and the demo).

    `on_chunk(record)` is called after each backfill chunk; after `stop_after` chunks the
    run returns early (the job stays backfilling and resumes where it stopped)."""
    with failing_job(ctx, job_id):
        for n, seq in enumerate(prepare(ctx, job_id)):
            if stop_after is not None and n >= stop_after:
                return get_job(ctx, job_id)
            backfill_chunk(ctx, job_id, seq)
            if on_chunk is not None:
                on_chunk(get_job(ctx, job_id))
        finalize(ctx, job_id)
    return get_job(ctx, job_id)
