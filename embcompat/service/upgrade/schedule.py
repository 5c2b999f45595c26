"""Backfill schedules: spread a large backfill over quiet hours at a bounded rate.

A schedule lives in the upgrade job's params (the DB), not in the beat process: the
Celery beat entry `reconcile` runs every minute and dispatches the chunks that are due
now, so changing a schedule needs no restart, and a lost worker's chunk is due again
once its lease runs out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from embcompat.errors import InvalidInput
from embcompat.kinds import ChunkState
from embcompat.registry.schema import Job, JobChunk
from embcompat.service.context import Context

LEASE = timedelta(minutes=10)  # a queued or running chunk untouched this long is due again


@dataclass(frozen=True)
class BackfillSchedule:
    max_items_per_hour: int | None = None
    window_start_hour: int | None = None  # UTC, inclusive
    window_end_hour: int | None = None  # UTC, exclusive; a window may wrap past midnight

    def __post_init__(self) -> None:
        if self.max_items_per_hour is not None and self.max_items_per_hour < 1:
            raise InvalidInput("max_items_per_hour must be at least 1", field="max_items_per_hour")
        hours = (self.window_start_hour, self.window_end_hour)
        if (hours[0] is None) != (hours[1] is None):
            raise InvalidInput("a window needs both window_start_hour and window_end_hour")
        if any(h is not None and not 0 <= h <= 23 for h in hours):
            raise InvalidInput("window hours are 0..23 (UTC)", field="window_start_hour")

    def open_at(self, now: datetime) -> bool:
        if self.window_start_hour is None or self.window_end_hour is None:
            return True
        start, end, hour = self.window_start_hour, self.window_end_hour, now.hour
        return start <= hour < end if start < end else (hour >= start or hour < end)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _naive(t: datetime) -> datetime:
    """UTC without tzinfo: SQLite returns naive datetimes, PostgreSQL aware ones."""
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def chunks_due(ctx: Context, job_id: int, now: datetime | None = None) -> list[int]:
    """The chunk seqs to dispatch now, marked queued: pending or failed ones, and queued
    or running ones whose lease ran out; within the window and the hourly budget."""
    now = _naive(now or datetime.now(UTC))
    with ctx.session(write=True) as s:
        job = s.get(Job, job_id)
        if job is None:
            return []
        schedule = BackfillSchedule(**job.params.get("schedule", {}))
        if not schedule.open_at(now):
            return []
        chunks = list(
            s.scalars(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.seq))
        )
        budget = None
        if schedule.max_items_per_hour is not None:
            in_flight = sum(
                c.stop - c.start
                for c in chunks
                if c.state in (ChunkState.QUEUED, ChunkState.RUNNING)
                and _naive(c.updated_at) >= now - LEASE
            )
            done_last_hour = sum(
                c.items_done
                for c in chunks
                if c.state == ChunkState.DONE and _naive(c.updated_at) > now - timedelta(hours=1)
            )
            budget = schedule.max_items_per_hour - in_flight - done_last_hour
        due = []
        for c in chunks:
            stale = _naive(c.updated_at) < now - LEASE
            ready = c.state in (ChunkState.PENDING, ChunkState.FAILED) or (
                c.state in (ChunkState.QUEUED, ChunkState.RUNNING) and stale
            )
            if not ready:
                continue
            size = c.stop - c.start
            if budget is not None:
                if size > budget:
                    break
                budget -= size
            c.state = ChunkState.QUEUED
            c.updated_at = now
            due.append(c.seq)
        return due
