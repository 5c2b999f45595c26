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


def test_a_training_run_killed_mid_way_resumes_on_another_worker(
    text_pair_dir: Path, tmp_path: Path
) -> None:
    """`train_compatible` on a real worker, SIGKILLed once its first epoch is
    checkpointed: the redelivered task finds the run's lease still held, looks again
    once it lapsed, resumes from that checkpoint on a new worker and registers the
    version exactly once."""
    import shutil

    from embcompat.datasets import wordnet_pairs
    from embcompat.service import training
    from embcompat.workers.app import dispatch_training

    data = tmp_path / "data"
    shutil.copytree(text_pair_dir, data)
    queue = f"embcompat-test-{uuid.uuid4().hex[:8]}"
    ctx = Context(Settings(data_dir=data, broker_url=REDIS_URL, result_backend=REDIS_URL,
                           queue=queue, broker_visibility_timeout=5,
                           training_lease_s=20))  # fmt: skip
    env = {
        **os.environ, "EMBCOMPAT_DATA_DIR": str(data), "EMBCOMPAT_BROKER_URL": REDIS_URL,
        "EMBCOMPAT_RESULT_BACKEND": REDIS_URL, "EMBCOMPAT_QUEUE": queue,
        "EMBCOMPAT_BROKER_VISIBILITY_TIMEOUT": "5", "HF_HUB_OFFLINE": "1",
        "EMBCOMPAT_TRAINING_LEASE_S": "20",  # the killed worker's lease lapses in 20 s
    }  # fmt: skip
    run_id = training.request_training(
        ctx, old="text:v1", version="v1c", pairs=wordnet_pairs([], 128, seed=3),
        method="bct", epochs=2, batch_size=16,
    )  # fmt: skip
    checkpoints = data / "training" / str(run_id) / "checkpoints"

    def complete_checkpoint() -> bool:
        return any((p / "trainer_state.json").exists() for p in checkpoints.glob("checkpoint-*"))

    log = tmp_path / "worker.log"
    first = _worker(env, log)
    second = None
    try:
        dispatch_training(ctx, run_id)
        _wait(complete_checkpoint, 600, "the first epoch's checkpoint")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        killed_at = max(
            (p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
            key=lambda p: int(p.name.split("-")[1]),
        ).name
        assert training.get_training(ctx, run_id)["state"] == "running"
        second = _worker(env, log)
        _wait(lambda: training.get_training(ctx, run_id)["state"] in ("done", "failed"), 900,
              "the resumed run")  # fmt: skip
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    run = training.get_training(ctx, run_id)
    assert run["state"] == "done", (run, log.read_text()[-3000:])
    assert run["result"]["resumed_from"] == killed_at, run["result"]
    epochs = [h["epoch"] for h in run["result"]["heldout"]]
    assert epochs[0] == 1.0 and len(epochs) >= 2  # the first epoch's evaluation survived
    with ctx.session() as s:
        assert [v.version for v in versions.list_versions(s, ctx.registry, "text")].count(
            "v1c"
        ) == 1
    ctx.close()
