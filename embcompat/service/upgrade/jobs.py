"""What every step of an upgrade reads: the job row, its versions, its folder (paired
sample, adapters, calibration) and the adapters in it, loaded once per context."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embcompat.adapters.base import Adapter
from embcompat.adapters.io import load_adapter
from embcompat.adapters.linear import LinearMap
from embcompat.arrays import FloatArray, IdArray
from embcompat.errors import UnknownJob, UnknownSpace
from embcompat.index.faiss_index import SpaceSearcher
from embcompat.index.folded import FoldedSearcher
from embcompat.index.merge import Platt
from embcompat.kinds import JobState, UpgradePlan
from embcompat.registry.db import row_lock
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item, Job
from embcompat.service.context import Context
from embcompat.service.galleries import (
    gallery_lock,
    known_version,
    mapped_searcher,
    mapped_store,
    space_searcher,
    space_store,
)
from embcompat.service.galleries.layout import (
    gallery_dir,
    gallery_row_by_id,
    mapped_dim,
    mapped_space_name,
)
from embcompat.service.upgrade.states import transition


def job_row(session: Session, job_id: int, lock: bool = False) -> Job:
    """The job's row; `lock` takes a row lock where the database has them (PostgreSQL)."""
    query = select(Job).where(Job.id == job_id)
    job = session.scalars(row_lock(query, session) if lock else query).one_or_none()
    if job is None:
        raise UnknownJob(f"no upgrade job {job_id}", job=job_id)
    return job


def job_dir(ctx: Context, job_id: int) -> Path:
    return ctx.data_dir / "jobs" / str(job_id)


@dataclass(frozen=True)
class JobVersions:
    old: ModelVersionRecord
    new: ModelVersionRecord
    gallery: str
    index_kind: str


def job_versions(ctx: Context, job_id: int) -> JobVersions:
    with ctx.session() as s:
        job = job_row(s, job_id)
        g = gallery_row_by_id(s, job.gallery_id)
        return JobVersions(
            known_version(ctx, s, job.from_version_id),
            known_version(ctx, s, job.to_version_id),
            g.name,
            g.index_kind,
        )


def enter(ctx: Context, job_id: int, expected: JobState, to: JobState) -> bool:
    """Move the job from `expected` to `to`, or find it in `to` already (resumed in the
    middle of this step: the step runs again, it is idempotent); False when it is
    elsewhere (past this step, paused, cancelled), so a re-delivered task does nothing."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        if job.state == to:
            return True
        if job.state != expected:
            return False
        if job.started_at is None:
            job.started_at = datetime.now(UTC)
        transition(job, to)
        return True


def count_upgraded(ctx: Context, job_id: int) -> tuple[int, int]:
    """(items in the new version's space, items in the gallery): the job's progress as
    a search sees it, never above 100 % (items ingested mid-upgrade count in both).
    Read before a writing transaction opens, never inside one."""
    v = job_versions(ctx, job_id)
    with ctx.session() as s:
        gallery_id = job_row(s, job_id).gallery_id
        total = s.scalar(select(func.count(Item.id)).where(Item.gallery_id == gallery_id)) or 0
    return min(len(space_store(ctx, v.gallery, v.new)), total), total


def declared_compatible(old: ModelVersionRecord, new: ModelVersionRecord) -> bool:
    """The new version was trained to be compatible with the old one (BCT, BT², OCA,
    d-Simplex: `training/`): its `compatible_with` tag names the old version, and its
    first old.dim coordinates live in the old space."""
    return new.tags.get("compatible_with") == old.ref and new.dim >= old.dim


def serves_compatible(ctx: Context, job_id: int) -> bool:
    """Plan `basis` (or `auto`) to a declared-compatible version: served at once with
    old vectors zero-padded and no adapter, so nothing is paired, fitted or re-embedded."""
    v = job_versions(ctx, job_id)
    with ctx.session() as s:
        requested = job_row(s, job_id).params["plan"]
    return requested in (UpgradePlan.BASIS, UpgradePlan.AUTO) and declared_compatible(v.old, v.new)


def paired_vectors(ctx: Context, job_id: int) -> tuple[IdArray, FloatArray, FloatArray]:
    """(ids, old vectors, new vectors) of the paired sample, rows aligned."""
    v = job_versions(ctx, job_id)
    ids = np.load(job_dir(ctx, job_id) / "pairs.npy")
    x_old, f_old = space_store(ctx, v.gallery, v.old).get(ids)
    x_new, f_new = space_store(ctx, v.gallery, v.new).get(ids)
    both = f_old & f_new
    return ids[both], x_old[both], x_new[both]


def job_adapter(
    ctx: Context, job_id: int, name: str, source: ModelVersionRecord, target: ModelVersionRecord
) -> Adapter:
    """An adapter the job fitted (`bridge`, `mapper`, `basis`), loaded and checksummed
    once per context: the folder is written once, before the job serves."""
    folder = job_dir(ctx, job_id) / name
    return ctx.cached(
        "adapter", (folder, source.ref, target.ref),
        lambda: load_adapter(folder, source=source.ref, target=target.ref),
    )  # fmt: skip


def folded_mapper(ctx: Context, job_id: int, v: JobVersions) -> LinearMap | None:
    """The job's mapper when its mapped space is folded (`index.folded`: a linear mapper
    over an inner-product old space stores one scale per item and is searched through
    the old index), else None (the mapped vectors are written). A mapped space already
    on disk keeps the form it was written in."""
    mapper = job_adapter(ctx, job_id, "mapper", v.old, v.new)
    if not isinstance(mapper, LinearMap) or v.old.metric == "l2":
        return None
    on_disk = mapped_dim(ctx, v.gallery, v.old, v.new, job_id)
    return mapper if on_disk in (None, 1) else None


def mapped_side(ctx: Context, job_id: int, v: JobVersions) -> SpaceSearcher | FoldedSearcher | None:
    """What the mapped plan searches for the items not yet upgraded: the folded old
    index, or the written mapped space's own searcher. None when the space is not on
    disk: the job ended, and dropped it, after the search read the job's state (or,
    while the job serves, the space was lost)."""
    try:
        mapper = folded_mapper(ctx, job_id, v)
        if mapper is None:
            return mapped_searcher(ctx, v.gallery, v.old, v.new, job_id, v.index_kind, create=False)
        scales = mapped_store(ctx, v.gallery, v.old, v.new, job_id, folded=True, create=False)
    except UnknownSpace:
        return None
    old = space_searcher(ctx, v.gallery, v.old, v.index_kind)
    return ctx.current(
        "folded", job_id, (old, scales, mapper), lambda _: FoldedSearcher(old, mapper, scales)
    )


def load_platt(ctx: Context, job_id: int) -> dict[str, Platt]:
    """The job's score calibration per search path (empty before fitting; kept once
    written, since fitting writes it once)."""
    path = job_dir(ctx, job_id) / "calibration.json"
    if not path.exists():
        return {}
    return ctx.cached(
        "calibration", path,
        lambda: {k: Platt(**v) for k, v in json.loads(path.read_text()).items()},
    )  # fmt: skip


def drop_mapped_space(ctx: Context, job_id: int) -> None:
    """An ended job's mapped space serves nobody again: remove it from disk."""
    v = job_versions(ctx, job_id)
    name = mapped_space_name(v.old, v.new, job_id)
    with gallery_lock(ctx, v.gallery):  # renamed away first: no writer sees half of it
        for kind in ("vectors", "indexes"):
            root = gallery_dir(ctx, v.gallery) / kind / name
            ctx.spaces.forget(root)
            if root.exists():
                trash = root.parent / f".{name}.removed-{uuid.uuid4().hex[:8]}"
                root.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
