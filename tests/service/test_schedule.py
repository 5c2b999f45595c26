"""Backfill schedules from the DB: the window, the hourly budget, and lost chunks' leases."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from embcompat.errors import InvalidInput
from embcompat.registry import versions
from embcompat.registry.schema import JobChunk
from embcompat.service import galleries, upgrade
from embcompat.service.context import Context
from embcompat.service.upgrade.schedule import BackfillSchedule, chunks_due


def test_windows_wrap_past_midnight_and_bad_schedules_are_refused() -> None:
    night = BackfillSchedule(window_start_hour=22, window_end_hour=5)
    assert night.open_at(datetime(2026, 1, 1, 23)) and night.open_at(datetime(2026, 1, 1, 4))
    assert not night.open_at(datetime(2026, 1, 1, 12))
    assert BackfillSchedule().open_at(datetime(2026, 1, 1, 12))
    with pytest.raises(InvalidInput, match="both window_start_hour and window_end_hour"):
        BackfillSchedule(window_start_hour=1)
    with pytest.raises(InvalidInput, match="at least 1"):
        BackfillSchedule(max_items_per_hour=0)


def test_due_chunks_respect_window_budget_and_leases(ctx: Context, models_dir) -> None:
    with ctx.session() as s:
        for v in ("a", "b"):
            versions.register_version(
                s,
                ctx.registry,
                model="m",
                version=v,
                dim=2,
                source="external",
                models_dir=models_dir,
            )
    galleries.create_gallery(ctx, "g", "m", "a")
    galleries.ingest(ctx, "g", [galleries.ItemIn(f"i{i}", vector=[1.0, i]) for i in range(100)])
    schedule = BackfillSchedule(max_items_per_hour=30, window_start_hour=1, window_end_hour=5)
    job = upgrade.start_upgrade(
        ctx, "g", "m", "b", plan="bridge", pairs=50, chunk_size=10, schedule=schedule
    )
    night = datetime(2026, 1, 1, 2, 0)
    assert chunks_due(ctx, job.id, datetime(2026, 1, 1, 12, 0)) == []  # outside the window
    assert chunks_due(ctx, job.id, night) == [0, 1, 2]  # 30 items per hour
    assert chunks_due(ctx, job.id, night + timedelta(minutes=1)) == []  # budget spent
    with ctx.session() as s:
        for c in s.query(JobChunk).filter_by(job_id=job.id).filter(JobChunk.seq < 2):
            c.state, c.items_done = "done", 10
            c.updated_at = night + timedelta(seconds=30)  # a new value, so onupdate keeps it
    # chunk 2 was queued at `night` and never started: its lease runs out after 10 minutes
    assert chunks_due(ctx, job.id, night + timedelta(minutes=5)) == []
    later = night + timedelta(minutes=61)
    assert chunks_due(ctx, job.id, later) == [2, 3, 4]
