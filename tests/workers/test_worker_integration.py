"""A real upgrade on real Celery worker processes (Redis broker), killed with SIGKILL in
the middle of the backfill: a new worker finishes the job, every item ends up exactly
once in the new version, and searches issued throughout all succeed. Runs on SQLite and
on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from embcompat.registry import versions
from embcompat.registry.schema import Item, JobChunk
from embcompat.service import galleries, search, upgrade
from embcompat.service.context import Context
from embcompat.settings import Settings
from embcompat.workers.app import dispatch_upgrade
from tests.conftest import REDIS_URL, register_pair, wordnet_items

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "embcompat.workers.main",
        "worker",
        "--concurrency",
        "2",
        "--loglevel",
        "INFO",
        "-Q",
        env["EMBCOMPAT_QUEUE"],
        "--without-mingle",
        "--without-gossip",
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["sqlite", "postgresql"])
def worker_ctx(
    request: pytest.FixtureRequest, text_pair_dir: Path, tmp_path: Path, models_dir: Path
) -> Context:
    import shutil

    data = tmp_path / "data"
    queue = f"embcompat-test-{uuid.uuid4().hex[:8]}"
    common = {
        "broker_url": REDIS_URL,
        "result_backend": REDIS_URL,
        "queue": queue,
        "broker_visibility_timeout": 5,
    }
    if request.param == "sqlite":
        shutil.copytree(text_pair_dir, data)
        return Context(Settings(data_dir=data, **common))
    pg_url = request.getfixturevalue("pg_url")
    from embcompat.service import migrate

    migrate.upgrade(pg_url)
    ctx = Context(Settings(data_dir=data, database_url=pg_url, **common))
    register_pair(ctx, models_dir)
    return ctx


def test_worker_killed_mid_backfill_job_still_finishes_exactly_once(
    worker_ctx: Context, tmp_path: Path
) -> None:
    ctx = worker_ctx
    s = ctx.settings
    env = {
        **os.environ,
        "EMBCOMPAT_DATA_DIR": str(s.resolved_data_dir),
        "EMBCOMPAT_DATABASE_URL": s.resolved_database_url,
        "EMBCOMPAT_BROKER_URL": s.broker_url,
        "EMBCOMPAT_RESULT_BACKEND": s.result_backend,
        "EMBCOMPAT_QUEUE": s.queue,
        "EMBCOMPAT_BROKER_VISIBILITY_TIMEOUT": "5",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    items, queries, _ = wordnet_items(320)
    galleries.create_gallery(ctx, "docs", "text", "v1")
    galleries.ingest(ctx, "docs", items)
    galleries.publish(ctx, "docs")
    job = upgrade.start_upgrade(ctx, "docs", "text", "v2", pairs=60, chunk_size=20)

    log = tmp_path / "worker.log"
    first = _worker(env, log)
    errors: list[BaseException] = []
    searches = 0
    stop = threading.Event()

    def searcher() -> None:
        nonlocal searches
        while not stop.is_set():
            try:
                res = search.search(ctx, "docs", texts=[queries[searches % len(queries)]], k=5)
                assert len(res.hits[0]) == 5
                searches += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(exc)
            time.sleep(0.05)

    thread = threading.Thread(target=searcher, daemon=True)
    thread.start()
    second = None
    try:
        dispatch_upgrade(ctx, job.id)

        def chunks_done() -> int:
            with ctx.session() as db:
                return (
                    db.scalar(
                        select(func.count(JobChunk.id)).where(
                            JobChunk.job_id == job.id, JobChunk.state == "done"
                        )
                    )
                    or 0
                )

        _wait(lambda: chunks_done() >= 3, 240, f"3 chunks done (log: {log})")
        assert upgrade.get_job(ctx, job.id).state == "backfilling"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        left = 16 - chunks_done()
        assert left > 0, "the job finished before the worker was killed"
        second = _worker(env, log)
        _wait(lambda: upgrade.get_job(ctx, job.id).state == "done", 300, f"done (log: {log})")
    finally:
        stop.set()
        thread.join(10)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert not errors, errors[:3]
    assert searches > 0
    with ctx.session() as db:
        v2 = versions.get_version(db, ctx.registry, "text", "v2")
        ids = [i for (i,) in db.execute(select(Item.id))]
    stored = galleries.space_store(ctx, "docs", v2).snapshot().ids
    assert len(stored) == len(np.unique(stored)) == 320
    assert set(stored.tolist()) == set(ids)
    assert galleries.get_gallery(ctx, "docs").serving_version == "v2"
    done = upgrade.get_job(ctx, job.id)
    assert done.items_done == done.items_total == 320 and done.progress == 1.0
