"""The pairing step: a sample of the gallery encoded with the new version."""

from __future__ import annotations

import numpy as np

from embcompat.kinds import JobState
from embcompat.service.context import Context
from embcompat.service.galleries import encode_and_store, space_store
from embcompat.service.upgrade.jobs import (
    count_upgraded,
    enter,
    job_dir,
    job_row,
    job_versions,
    serves_compatible,
)
from embcompat.service.upgrade.states import transition


def step_pair(ctx: Context, job_id: int) -> None:
    """Encode a sample of the gallery with the new version: the paired sample, which is
    also the first backfill chunk (its vectors are stored, never thrown away)."""
    if not enter(ctx, job_id, JobState.PLANNED, JobState.PAIRING):
        return
    v = job_versions(ctx, job_id)
    with ctx.session() as s:
        n = 0 if serves_compatible(ctx, job_id) else int(job_row(s, job_id).params["pairs"])
    ids = space_store(ctx, v.gallery, v.old).snapshot().ids
    sample = np.sort(
        np.random.default_rng(job_id).choice(ids, size=min(n, len(ids)), replace=False)
    )
    encode_and_store(ctx, v.gallery, v.new, sample)
    folder = job_dir(ctx, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "pairs.npy", sample)
    done, total = count_upgraded(ctx, job_id)
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        job.items_done, job.items_total = done, total
        if job.state == JobState.PAIRING:
            transition(job, JobState.TRAINING)
