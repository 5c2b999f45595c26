"""Backfill schedules from the DB: the window, the hourly budget, and lost chunks' leases."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from embcompat.errors import InvalidInput
from embcompat.registry.schema import JobChunk
from embcompat.service import galleries, upgrade
from embcompat.service.context import Context
from embcompat.service.upgrade.schedule import BackfillSchedule, chunks_due
from embcompat.settings import Settings


def test_windows_wrap_past_midnight_and_bad_schedules_are_refused() -> None:
    night = BackfillSchedule(window_start_hour=22, window_end_hour=5)
    assert night.open_at(datetime(2026, 1, 1, 23)) and night.open_at(datetime(2026, 1, 1, 4))
    assert not night.open_at(datetime(2026, 1, 1, 12))
    assert BackfillSchedule().open_at(datetime(2026, 1, 1, 12))
    with pytest.raises(InvalidInput, match="both window_start_hour and window_end_hour"):
        BackfillSchedule(window_start_hour=1)
    with pytest.raises(InvalidInput, match="at least 1"):
        BackfillSchedule(max_items_per_hour=0)


def test_due_chunks_respect_window_budget_and_leases(hash_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(hash_dir, tmp_path / "data")
    ctx = Context(Settings(data_dir=tmp_path / "data"))
    galleries.create_gallery(ctx, "g", "hash", "v1")
    galleries.ingest(ctx, "g", [galleries.ItemIn(f"i{i}", f"w{i % 9} u{i}") for i in range(100)])
    schedule = BackfillSchedule(max_items_per_hour=30, window_start_hour=1, window_end_hour=5)
    job = upgrade.start_upgrade(
        ctx, "g", "hash", "v2", plan="dual", pairs=50, chunk_size=10, schedule=schedule
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
