"""The demo pipeline on a reduced size: real models, real data, the whole upgrade; an
interruption mid-backfill resumes the same job on the next run."""

from __future__ import annotations

import pytest
from rich.console import Console

from embcompat.demo import GALLERY, run_demo
from embcompat.registry.schema import JobChunk
from embcompat.service import galleries, upgrade
from embcompat.service.context import Context

pytestmark = pytest.mark.slow


def test_demo_interrupted_then_resumed_finishes_without_regret(text_ctx: Context) -> None:
    console = Console(record=True, width=120)
    with pytest.raises(KeyboardInterrupt):
        run_demo(text_ctx, n_queries=60, n_gallery=240, console=console, crash_at=3)
    job = upgrade.latest_job(text_ctx, GALLERY)
    assert job is not None and job.state == "backfilling"
    with text_ctx.session() as s:
        done_before = {c.seq for c in s.query(JobChunk).filter_by(job_id=job.id, state="done")}
    assert 0 < len(done_before) < 20

    summary = run_demo(text_ctx, n_queries=60, n_gallery=240, console=console)
    out = console.export_text()
    assert "resuming upgrade job" in out and "M(old,old)" in out and "M(new,new)" in out
    assert "the gate's measurement" in out and "no-regret" in out  # with the demo's labels
    assert "encodes/query" in out and "backfill only" in out  # the served curve, beside
    assert summary["job"] == job.id, "the second run must resume the same job"
    with text_ctx.session() as s:
        chunks = s.query(JobChunk).filter_by(job_id=job.id).all()
    assert all(c.state == "done" for c in chunks)
    assert all(c.attempts == 1 for c in chunks if c.seq in done_before)
    assert summary["no_step_below_old_old"], summary["curve"]
    assert len(summary["curve_backfill_only"]) == len(summary["curve"])
    assert len(summary["encodes_per_query"]) == len(summary["curve"])
    assert summary["curve"][-1][1] == summary["r10_new_new"]
    if galleries.get_gallery(text_ctx, GALLERY).plan != "cascade":  # v1 retired: v2 alone
        assert summary["r10_new_new"] == summary["r10_new_new_exact"]
    assert (text_ctx.data_dir / "demo" / "upgrade_curve.png").stat().st_size > 10_000
