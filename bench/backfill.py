"""Do the workers keep up with the encoder? Backfill and map throughput as ratios.

Backfill: a gallery of WordNet documents is upgraded from all-MiniLM-L6-v2 to
all-mpnet-base-v2 by real Celery worker processes (Redis broker); the items/s of the
backfill phase (from entering `backfilling` to `done`, model loading in the workers
included) over the items/s of the bare v2 encoder on the same texts in this process.
Map: the map step (read stored old vectors, transform, write the mapped space) over a
bare numpy affine map of the same arrays.

    python bench/backfill.py [--items 3000] [--workers 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from common import print_table, write_json

from embcompat.adapters.io import load_adapter
from embcompat.datasets import wordnet_task
from embcompat.demo import register_text_pair
from embcompat.registry import versions
from embcompat.registry.schema import JobChunk
from embcompat.service import galleries, migrate, upgrade
from embcompat.service.context import Context
from embcompat.service.upgrade.backfill import MAP_BATCH
from embcompat.service.upgrade.jobs import drop_mapped_space
from embcompat.settings import Settings

REDIS = os.environ.get("EMBCOMPAT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def _setup(root: Path, n: int) -> tuple[Context, list[galleries.ItemIn]]:
    settings = Settings(
        data_dir=root,
        broker_url=REDIS,
        result_backend=REDIS,
        queue=f"embcompat-bench-{uuid.uuid4().hex[:8]}",
        broker_visibility_timeout=600,
    )
    migrate.upgrade(settings.resolved_database_url)
    ctx = Context(settings)
    register_text_pair(ctx, Path(".embcompat/models").resolve())
    task = wordnet_task(n_queries=n // 4, n_gallery=n, seed=11)
    items = [galleries.ItemIn(i, t) for i, t in zip(task.gallery_ids, task.gallery, strict=True)]
    galleries.create_gallery(ctx, "docs", "text", "v1")
    galleries.ingest(ctx, "docs", items)
    return ctx, items


def _bare_rate(ctx: Context, texts: list[str]) -> float:
    with ctx.session() as s:
        v2 = versions.get_version(s, ctx.registry, "text", "v2")
    encoder = ctx.encoder(v2)
    encoder.encode(texts[:64])  # warm-up
    t0 = time.perf_counter()
    encoder.encode(texts, ctx.settings.encode_batch_size)
    return len(texts) / (time.perf_counter() - t0)


def _worker_rate(ctx: Context, workers: int, pairs: int) -> tuple[float, int, float]:
    from embcompat.workers.app import dispatch_upgrade

    s = ctx.settings
    env = {
        **os.environ,
        "EMBCOMPAT_DATA_DIR": str(s.resolved_data_dir),
        "EMBCOMPAT_BROKER_URL": REDIS,
        "EMBCOMPAT_RESULT_BACKEND": REDIS,
        "EMBCOMPAT_QUEUE": s.queue,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "EMBCOMPAT_BROKER_VISIBILITY_TIMEOUT": "600",
    }
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "embcompat.workers.main",
        "worker",
        f"--concurrency={workers}",
        "-Q",
        s.queue,
        "--loglevel=WARNING",
        "--without-mingle",
        "--without-gossip",
    ]
    # the job exists before the workers start, so each process loads v2 at its start
    job = upgrade.start_upgrade(ctx, "docs", "text", "v2", plan="dual", pairs=pairs, chunk_size=500)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        dispatch_upgrade(ctx, job.id)
        while upgrade.get_job(ctx, job.id).state != "backfilling":
            time.sleep(0.1)
        t0, done0 = time.perf_counter(), upgrade.get_job(ctx, job.id).items_done
        while (rec := upgrade.get_job(ctx, job.id)).state != "done":
            if rec.state == "failed":
                raise RuntimeError(rec.error)
            time.sleep(0.1)
        seconds = time.perf_counter() - t0
        return (rec.items_done - done0) / seconds, rec.items_done - done0, seconds
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        import redis

        redis.Redis.from_url(REDIS).delete(s.queue)


def _map_ratio(
    ctx: Context, items: list[galleries.ItemIn], repeats: int = 3
) -> tuple[float, float]:
    """The map step of a mapped upgrade of a gallery of the same items (its own, so the
    backfill's gallery keeps no vector of this job), stopped at the gate and mapped
    `repeats` times from empty, then cancelled."""
    galleries.create_gallery(ctx, "maps", "text", "v1")
    galleries.ingest(ctx, "maps", items)
    job = upgrade.start_upgrade(ctx, "maps", "text", "v2", plan="mapped", override=True,
                                pairs=100, chunk_size=500)  # fmt: skip
    for step in (upgrade.step_pair, upgrade.step_train, upgrade.step_gate):
        step(ctx, job.id)
    with ctx.session() as s:
        old = versions.get_version(s, ctx.registry, "text", "v1")
        new = versions.get_version(s, ctx.registry, "text", "v2")
    mapper = load_adapter(upgrade.job_dir(ctx, job.id) / "mapper")
    snap = galleries.space_store(ctx, "maps", old).snapshot()
    x = snap.rows(np.arange(len(snap)))
    w = getattr(mapper, "weight", np.eye(x.shape[1], new.dim, dtype=np.float32))
    mapped_rates, bare_rates = [], []
    with ctx.session() as s:
        seqs = [c.seq for c in s.query(JobChunk).filter_by(job_id=job.id)]
    per = MAP_BATCH // 500  # the service's batching of 500-item chunks
    batches = [seqs[i : i + per] for i in range(0, len(seqs), per)]
    for _ in range(repeats):
        drop_mapped_space(ctx, job.id)  # each repeat maps into an empty space, in its form
        t0 = time.perf_counter()
        n = sum(upgrade.map_chunks(ctx, job.id, b) for b in batches)
        mapped_rates.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for start in range(0, len(x), 500):  # the same chunking, bare math
            (x[start : start + 500] - x.mean(0)) @ w
        bare_rates.append(len(x) / (time.perf_counter() - t0))
    upgrade.cancel(ctx, job.id)
    return float(np.median(mapped_rates)), float(np.median(bare_rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write {backfill_ratio, map_ratio} and the raw rates")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ctx, gallery = _setup(Path(tmp) / "data", args.items)
        bare = _bare_rate(ctx, [it.text for it in gallery])
        rate, items, seconds = _worker_rate(ctx, args.workers, pairs=100)
        mapped, matmul = _map_ratio(ctx, gallery)
    rows = [
        {
            "measure": "backfill items/s",
            "embcompat": rate,
            "baseline": bare,
            "ratio": rate / bare,
            "baseline_is": "bare v2 encoder, same texts, this process",
        },
        {
            "measure": "map vectors/s",
            "embcompat": mapped,
            "baseline": matmul,
            "ratio": mapped / matmul,
            "baseline_is": "numpy affine map, same arrays",
        },
    ]
    print_table(rows, ["measure", "embcompat", "baseline", "ratio", "baseline_is"])
    print(f"backfill: {items} items in {seconds:.1f}s on {args.workers} worker processes")
    write_json(
        args.json,
        {
            "backfill_ratio": rate / bare,
            "map_ratio": mapped / matmul,
            "backfill_items_per_s": rate,
            "encoder_items_per_s": bare,
            "map_vectors_per_s": mapped,
            "matmul_vectors_per_s": matmul,
        },
    )


if __name__ == "__main__":
    main()
