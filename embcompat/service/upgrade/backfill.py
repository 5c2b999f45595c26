"""Moving the gallery into the new space: backfill chunks (re-embed), map chunks
(stored old vectors through the gallery-side adapter) and finalize.

The chunk ledger (`job_chunks`, ranges of item ids) makes every chunk happen once: a
chunk re-run skips items already upgraded (by an earlier attempt, by the pair sample,
or by read-through search)."""

from __future__ import annotations

import contextlib

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embcompat.arrays import IdArray
from embcompat.errors import UnknownSpace
from embcompat.kinds import TERMINAL_STATES, ChunkState, JobState, ServingPlan
from embcompat.registry import versions
from embcompat.registry.schema import Item, Job, JobChunk
from embcompat.service.context import Context
from embcompat.service.galleries import (
    encode_and_store,
    gallery_lock,
    mapped_searcher,
    mapped_store,
    space_searcher,
    space_store,
    version_record,
)
from embcompat.service.galleries.layout import gallery_row_by_id
from embcompat.service.upgrade.jobs import (
    count_upgraded,
    drop_mapped_space,
    enter,
    folded_mapper,
    job_adapter,
    job_row,
    job_versions,
)
from embcompat.service.upgrade.states import start_serving, transition

CATCH_UP_BATCH = 1000


def _chunk(session: Session, job_id: int, seq: int) -> JobChunk:
    return session.scalars(
        select(JobChunk).where(JobChunk.job_id == job_id, JobChunk.seq == seq)
    ).one()


def _chunk_item_ids(session: Session, job: Job, chunk: JobChunk) -> IdArray:
    """The gallery's items in the chunk's id range (items deleted since are gone)."""
    rows = session.execute(
        select(Item.id).where(
            Item.gallery_id == job.gallery_id, Item.id >= chunk.start, Item.id < chunk.stop
        )
    )
    return np.array([i for (i,) in rows], np.int64)


MAP_BATCH = 100_000  # vectors mapped per write: one shard, one transform call
FOLDED_MAP_BATCH = 1_000_000  # a folded map writes 4 bytes an item: fewer, larger writes


def mapping(job: Job) -> bool:
    """Whether the job's map step is under way: the gate chose `mapped` and the map is
    not recorded done. Gated, or serving_bridge for a job gated before mapped plans
    waited for their map."""
    return (
        job.plan == ServingPlan.MAPPED
        and job.state in (JobState.GATED, JobState.SERVING_BRIDGE)
        and not (job.report or {}).get("map", {}).get("done")
    )


def map_batches(ctx: Context, job_id: int) -> list[list[int]]:
    """The chunks to map before serving, when the gate chose the `mapped` plan, grouped
    into batches of about MAP_BATCH items (a map is a matrix product: per-chunk writes
    and lookups would cost more than the product itself), FOLDED_MAP_BATCH when only
    scales are written (a batch's memory is then a few arrays of ids and scales)."""
    with ctx.session() as s:
        job = job_row(s, job_id)
        if not mapping(job):
            return []
        chunks = s.execute(
            select(JobChunk.seq, JobChunk.start, JobChunk.stop)
            .where(JobChunk.job_id == job_id)
            .order_by(JobChunk.seq)
        ).all()
    v = job_versions(ctx, job_id)
    limit = MAP_BATCH if folded_mapper(ctx, job_id, v) is None else FOLDED_MAP_BATCH
    snap = space_store(ctx, v.gallery, v.old).snapshot()
    batches: list[list[int]] = [[]]
    size = 0
    for seq, start, stop in chunks:
        n = int(np.searchsorted(snap.sorted_ids, stop) - np.searchsorted(snap.sorted_ids, start))
        if batches[-1] and size + n > limit:
            batches.append([])
            size = 0
        batches[-1].append(seq)
        size += n
    return [b for b in batches if b]


def map_chunks(ctx: Context, job_id: int, seqs: list[int]) -> int:
    """Push the chunks' stored old vectors through the gallery-side adapter into the
    mapped space (idempotent: ids already mapped are skipped). The ids come from the old
    space itself (an item deleted from the gallery is gone from it too), read from its
    memory-mapped shards. Returns vectors mapped; none once the job stopped mapping
    (paused, cancelled): a cancelled job's space is never written again."""
    v = job_versions(ctx, job_id)
    with ctx.session() as s:
        if not mapping(job_row(s, job_id)):
            return 0
        ranges = s.execute(
            select(JobChunk.start, JobChunk.stop).where(
                JobChunk.job_id == job_id, JobChunk.seq.in_(seqs)
            )
        ).all()
    mapper = job_adapter(ctx, job_id, "mapper", v.old, v.new)
    folded = folded_mapper(ctx, job_id, v)
    old = space_store(ctx, v.gallery, v.old)
    snap = old.snapshot()  # ids, fingerprints and vectors all read from this one
    held = snap.sorted_ids
    ids = np.concatenate(
        [np.zeros(0, np.int64)]
        + [held[np.searchsorted(held, a) : np.searchsorted(held, b)] for a, b in ranges]
    )
    with contextlib.suppress(UnknownSpace):  # mapped by an earlier, stopped run
        done = mapped_store(ctx, v.gallery, v.old, v.new, job_id, create=False).snapshot()
        ids = ids[~done.positions(ids)[1]]
    if len(ids) == 0:
        return 0
    rows = snap.positions(ids)[0]  # all found: the ids come from the snapshot
    read_from = snap.sources[rows]
    if folded is None:
        mapped = mapper.transform(snap.rows(rows))
    elif folded.normalize_output:  # the scale of each item: 1 / its mapped length
        mapped = np.reciprocal(snap.map_rows(rows, folded.output_norms, np.float32))[:, None]
    else:
        mapped = np.ones((len(rows), 1), np.float32)
    with gallery_lock(ctx, v.gallery):  # an item deleted or updated meanwhile is not mapped
        with ctx.session() as s:  # a cancel drops the space under this lock, after its commit
            if not mapping(job_row(s, job_id)):
                return 0
        target = mapped_store(ctx, v.gallery, v.old, v.new, job_id, folded=folded is not None)
        sources, still = old.sources(ids)
        still &= sources == read_from
        if not still.all():  # rare: a batch's vectors are not copied for nothing
            ids, mapped, sources = ids[still], mapped[still], sources[still]
        added = len(target.add_missing(ids, mapped, sources))
    with ctx.session(write=True) as s:  # progress, for operators: `gated` can last hours
        job = job_row(s, job_id, lock=True)
        job.report = {**job.report, "map": {"mapped": len(target), "of": len(snap)}}
    return added


def publish_mapped(ctx: Context, job_id: int) -> int | None:
    """The map step's end, called once `map_chunks` has mapped every batch: index the
    mapped space with the gallery's index kind (so the plan searches an index instead
    of scanning every mapped vector per query), record the map done, and start serving
    the mapped plan. Returns the index generation; None for a folded space, which the
    old space's own index serves, and when the job is not mapping (another plan, the
    map done already, paused or cancelled)."""
    with ctx.session() as s:
        job = job_row(s, job_id)
        if not mapping(job):
            return None
        kind = gallery_row_by_id(s, job.gallery_id).index_kind
    v = job_versions(ctx, job_id)
    folded = folded_mapper(ctx, job_id, v)
    with gallery_lock(ctx, v.gallery):  # from here the space exists, empty if nothing mapped
        with ctx.session() as s:
            if not mapping(job_row(s, job_id)):
                return None
        store = mapped_store(ctx, v.gallery, v.old, v.new, job_id, folded=folded is not None)
    generation, mapped = None, 0
    with contextlib.suppress(UnknownSpace):  # else cancelled meanwhile: seen below
        if folded is None:
            searcher = mapped_searcher(ctx, v.gallery, v.old, v.new, job_id, kind, create=False)
            generation = searcher.generations.publish(searcher.store)
        mapped = len(store)
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        if mapping(job):  # not paused or cancelled meanwhile
            done = {"mapped": mapped, "done": True, "generation": generation}
            job.report = {**job.report, "map": {**job.report.get("map", {}), **done}}
            if job.state == JobState.GATED:
                start_serving(s, job)
        ended = job.state in TERMINAL_STATES
    if ended:  # a cancel dropped the space while the index was built: nothing left behind
        drop_mapped_space(ctx, job_id)
    return generation


def step_start_backfill(ctx: Context, job_id: int) -> list[int]:
    """Enter backfilling; returns the chunk seqs still to do (for dispatch)."""
    enter(ctx, job_id, JobState.SERVING_BRIDGE, JobState.BACKFILLING)
    with ctx.session() as s:
        if job_row(s, job_id).state != JobState.BACKFILLING:
            return []
        return [
            c.seq
            for c in s.scalars(
                select(JobChunk)
                .where(JobChunk.job_id == job_id, JobChunk.state != ChunkState.DONE)
                .order_by(JobChunk.seq)
            )
        ]


def backfill_chunk(ctx: Context, job_id: int, seq: int) -> int:
    """Re-embed one chunk's items with the new version; done exactly once per chunk.
    Returns how many items this call upgraded."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id)
        chunk = _chunk(s, job_id, seq)
        if chunk.state == ChunkState.DONE or job.state != JobState.BACKFILLING:
            return 0
        chunk.state, chunk.attempts = ChunkState.RUNNING, chunk.attempts + 1
        ids = _chunk_item_ids(s, job, chunk)
    v = job_versions(ctx, job_id)
    try:
        added = encode_and_store(ctx, v.gallery, v.new, ids)
    except Exception as exc:
        with ctx.session(write=True) as s:
            c = _chunk(s, job_id, seq)
            c.state, c.error = ChunkState.FAILED, repr(exc)[:2000]
        raise
    done, total = count_upgraded(ctx, job_id)
    with ctx.session(write=True) as s:
        c = _chunk(s, job_id, seq)
        c.state, c.items_done, c.error = ChunkState.DONE, len(ids), None
        job = job_row(s, job_id, lock=True)
        job.items_done, job.items_total = done, total
    return len(added)


def chunks_left(ctx: Context, job_id: int) -> int:
    with ctx.session() as s:
        return (
            s.scalar(
                select(func.count(JobChunk.id)).where(
                    JobChunk.job_id == job_id, JobChunk.state != ChunkState.DONE
                )
            )
            or 0
        )


def finalize(ctx: Context, job_id: int) -> bool:
    """When every chunk is done: publish the new space's index, serve the new version
    (MLflow `serving` alias), retire the bridge. Idempotent; False if not ready."""
    if chunks_left(ctx, job_id):
        return False
    v = job_versions(ctx, job_id)
    with ctx.session() as s:
        if job_row(s, job_id).state != JobState.BACKFILLING:
            return False
        gallery_id = job_row(s, job_id).gallery_id
        live = np.array(
            s.execute(select(Item.id).where(Item.gallery_id == gallery_id)).scalars().all(),
            np.int64,
        )
    for start in range(0, len(live), CATCH_UP_BATCH):  # items the chunks did not cover
        encode_and_store(ctx, v.gallery, v.new, live[start : start + CATCH_UP_BATCH])
    searcher = space_searcher(ctx, v.gallery, v.new, v.index_kind)
    searcher.store.verify()
    searcher.generations.publish(searcher.store)
    done, total = count_upgraded(ctx, job_id)
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        if job.state != JobState.BACKFILLING:
            return False
        g = gallery_row_by_id(s, job.gallery_id)
        labelled = job.report.get("gate", {}).get("probe") or {}
        keep = job.plan == ServingPlan.CASCADE and bool(labelled.get("keep_old_at_100"))
        if keep:
            reason = (
                "the labelled probe measured a fusion gain worth keeping v1's vectors and encoder"
            )
        elif not labelled.get("r10_new_new"):
            reason = "v1 retired: no labelled probe measured a fusion gain worth keeping it"
        else:
            reason = "v1 retired: the fusion gain on the probe is under one point"
        job.report = {
            **job.report,
            "finalize": {"keep_old": keep, "fusion_gain": labelled.get("fusion_gain"),
                         "reason": reason},
        }  # fmt: skip
        g.serving_version_id, g.plan = v.new.id, ServingPlan.CASCADE.value if keep else None
        job.items_done, job.items_total = done, total
        versions.promote(s, ctx.registry, v.new.model, v.new.version, "serving")
        transition(job, JobState.DONE)
    drop_mapped_space(ctx, job_id)
    return True


def warm_active_encoders(ctx: Context) -> int:
    """Load the new version's encoder of every upgrade that has not ended; returns how many."""
    with ctx.session() as s:
        rows = s.scalars(
            select(Job).where(
                Job.kind == "upgrade", Job.state.not_in([t.value for t in TERMINAL_STATES])
            )
        ).all()
        targets = {r.to_version_id for r in rows if r.to_version_id is not None}
        records = [version_record(ctx, s, t) for t in targets]
    for rec in records:
        if not rec.external:
            ctx.encoder(rec)
    return len(records)
