"""Publishing a gallery's index generations, and what a gallery holds."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import func, select

from embcompat.arrays import member
from embcompat.errors import InvalidInput, UnknownSpace
from embcompat.index.binary import METRICS_SAMPLE, binarizer_metrics
from embcompat.index.faiss_index import IndexGenerations
from embcompat.index.store import Snapshot
from embcompat.kinds import SERVING_STATES, IndexKind
from embcompat.registry.adapter_log import log_binarizer
from embcompat.registry.jobs import active_upgrade
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item
from embcompat.service.context import Context
from embcompat.service.galleries.layout import (
    gallery_dir,
    get_gallery_row,
    space_searcher,
    space_store,
    space_where,
    version_record,
)


def publish(ctx: Context, gallery: str, index_kind: str | None = None) -> dict[str, int]:
    """Build and publish a new index generation for every version space of the gallery
    (a mapped space is searched from the store until its job finishes). Every shard is
    verified against its checksum first: a damaged space is refused, never indexed, and
    the shard files no manifest names any more are removed.
    `index_kind` switches the gallery to another kind first (a gallery that outgrew RAM
    moves to `ivfpq`); searches keep the old generation until the new one is published."""
    out = {}
    if index_kind is not None and index_kind not in set(IndexKind):
        raise InvalidInput(
            f"unknown index kind {index_kind!r}",
            hint=f"one of {', '.join(IndexKind)}",
            field="index_kind",
        )
    with ctx.session(write=index_kind is not None) as s:
        row = get_gallery_row(s, gallery, lock=index_kind is not None)
        if index_kind is not None:
            row.index_kind = str(index_kind)
        kind = row.index_kind
    for space in sorted((gallery_dir(ctx, gallery) / "vectors").glob("v*")):
        if not space.name[1:].isdigit():
            continue
        with ctx.session() as s:
            rec = version_record(ctx, s, int(space.name[1:]))
        searcher = space_searcher(ctx, gallery, rec, kind)
        gens = searcher.generations
        searcher.store.verify()
        out[space.name] = gens.publish(searcher.store)
        searcher.store.garbage_collect()  # shard files compaction and deletes left behind
        ctx.health.clear(gallery, space.name)  # whatever was damaged, this one is sound
        if gens.fitted_binarizer is not None:
            _register_binarizer(ctx, gens, rec, searcher.store.snapshot())
    return out


def _register_binarizer(
    ctx: Context, gens: IndexGenerations, version: ModelVersionRecord, snap: Snapshot
) -> None:
    """A binary index fitted its binarizer: register it with what it keeps of the
    space's own float neighbours, measured on the first METRICS_SAMPLE vectors."""
    binarizer = gens.fitted_binarizer
    if binarizer is None:
        return
    metrics = binarizer_metrics(binarizer, snap.rows(np.arange(min(len(snap), METRICS_SAMPLE))))
    with ctx.session() as s:
        log_binarizer(s, ctx.registry, gens.root / "binarizer", binarizer, version, metrics)


def stats(ctx: Context, gallery: str) -> dict[str, Any]:
    """What the gallery holds. `items_per_version` counts what a search can return now:
    the serving version's vectors, and mid-upgrade the new version's plus the old ones
    not yet upgraded; `spaces` lists every space on disk (a retired one included) with
    its vectors and index generation."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        total = s.scalar(select(func.count(Item.id)).where(Item.gallery_id == g.id)) or 0
        job = active_upgrade(s, g.id)
        served = [version_record(ctx, s, g.serving_version_id)]
        if job is not None and job.state in SERVING_STATES:
            served.append(version_record(ctx, s, job.to_version_id))
    snaps = [space_store(ctx, gallery, v).snapshot() for v in served]
    per_version = {served[0].version: len(snaps[0])}
    if len(snaps) == 2:
        old_only = ~member(snaps[1].sorted_ids, snaps[0].ids)
        per_version = {served[0].version: int(old_only.sum()), served[1].version: len(snaps[1])}
    root = gallery_dir(ctx, gallery)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
    spaces = {}
    for space in sorted((root / "vectors").glob("v*")):
        gens = IndexGenerations(root / "indexes" / space.name)
        try:
            count = len(ctx.spaces.open(space, where=space_where(gallery, space.name)))
        except UnknownSpace:  # an upgrade's end dropped it since the listing
            continue
        spaces[space.name] = {"vectors": count, "generation": gens.current_number()}
    return {
        "gallery": gallery,
        "items": total,
        "items_per_version": per_version,
        "spaces": spaces,
        "bytes_on_disk": size,
    }
