"""Items of a gallery: ingest (encode or accept vectors), stage for the workers, delete,
and encode stored payloads into another version's space.

The DB holds each item's external id and raw payload (kept for re-embedding); vectors
live in the vector store, one space per model version. Ingest is idempotent on the
external id: everything is validated and encoded before anything is written, and vectors
are stored before the DB commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from embcompat.arrays import FloatArray, IdArray, check_vectors
from embcompat.errors import DuplicateItem, InvalidInput, UnknownItem
from embcompat.registry.jobs import active_upgrade
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item
from embcompat.service.context import Context
from embcompat.service.galleries.filters import check_metadata
from embcompat.service.galleries.layout import (
    gallery_dir,
    get_gallery_row,
    space_store,
    version_record,
)


@dataclass(frozen=True)
class ItemIn:
    id: str
    text: str | None = None
    vector: Sequence[float] | None = None
    metadata: dict[str, Any] | None = None  # flat attributes for filtered search


def encode_items(ctx: Context, version: ModelVersionRecord, items: Sequence[ItemIn]) -> FloatArray:
    """Vectors for items in `version`'s space: sent vectors for an external version or
    one whose input is not text (an image model: items keep text payloads only, so the
    client sends the vectors), else the version's encoder over the texts."""
    text_input = version.tags.get("input", "text") == "text"
    if version.external or not text_input:
        missing = [it.id for it in items if it.vector is None]
        if missing:
            why = "is external" if version.external else f"encodes {version.tags['input']}"
            raise InvalidInput(
                f"{version.ref} {why}: item {missing[0]!r} needs a vector", field="vector"
            )
        return check_vectors([it.vector for it in items], version.dim, f"vectors for {version.ref}")
    missing = [it.id for it in items if not it.text]
    if missing:
        raise InvalidInput(f"item {missing[0]!r} needs a text to encode", field="text")
    if any(it.vector is not None for it in items):
        raise InvalidInput(f"{version.ref} encodes texts itself; send texts, not vectors")
    texts = [it.text for it in items]
    return ctx.encoder(version).encode(texts, ctx.settings.encode_batch_size)


def _check_batch(ctx: Context, items: Sequence[ItemIn]) -> list[str]:
    if len(items) > ctx.settings.max_batch_items:
        raise InvalidInput(
            f"batch of {len(items)} items exceeds the limit of {ctx.settings.max_batch_items}",
            field="items",
        )
    ids = [it.id for it in items]
    for it in items:
        check_metadata(it.id, it.metadata)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DuplicateItem(f"item id {dup!r} appears twice in one batch", item=dup)
    return ids


def stage(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> int:
    """Store raw items (texts) without vectors, for the `ingest` task to encode in chunks
    on the workers; idempotent on item id. Returns how many are staged."""
    ids = _check_batch(ctx, items)
    missing = [it.id for it in items if not it.text or it.vector is not None]
    if missing:
        raise InvalidInput(f"staged item {missing[0]!r} needs a text and no vector", field="text")
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        existing = {
            r.external_id: r
            for r in s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(ids))
            )
        }
        for it in items:
            row = existing.get(it.id) or Item(gallery_id=g.id, external_id=it.id)
            if row.payload != it.text or row.vector_version_id is None:
                row.payload, row.vector_version_id = it.text, None
            if it.metadata is not None:
                row.meta = it.metadata
            s.add(row)
    return len(items)


def encode_staged(ctx: Context, gallery: str, limit: int = 1000) -> int:
    """Encode up to `limit` staged items and store their vectors; returns how many."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        rows = s.execute(
            select(Item.external_id, Item.payload)
            .where(
                Item.gallery_id == g.id, Item.vector_version_id.is_(None), Item.payload.is_not(None)
            )
            .order_by(Item.id)
            .limit(limit)
        ).all()
    if rows:
        ingest(ctx, gallery, [ItemIn(ext, text) for ext, text in rows])
    return len(rows)


def ingest(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> dict[str, int]:
    """Add or update items (idempotent on item id), in the serving version's space and,
    mid-upgrade, in the new version's too."""
    if not items:
        return {"added": 0, "updated": 0}
    ids = _check_batch(ctx, items)
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        targets = [version_record(ctx, s, g.serving_version_id)]
        job = active_upgrade(s, g.id)
        if job is not None and job.to_version_id is not None:
            targets.append(version_record(ctx, s, job.to_version_id))
        vectors = [encode_items(ctx, v, items) for v in targets]
        existing = {
            r.external_id: r
            for r in s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(ids))
            )
        }
        rows = []
        for it in items:
            row = existing.get(it.id) or Item(gallery_id=g.id, external_id=it.id)
            row.payload = it.text
            if it.metadata is not None:
                row.meta = it.metadata
            row.vector_version_id = targets[-1].id
            s.add(row)
            rows.append(row)
        s.flush()
        db_ids = np.array([r.id for r in rows], np.int64)
        for version, vecs in zip(targets, vectors, strict=True):
            space_store(ctx, gallery, version).add(db_ids, vecs, replace=True)
        return {"added": len(items) - len(existing), "updated": len(existing)}


def delete_items(ctx: Context, gallery: str, external_ids: Sequence[str]) -> int:
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        rows = list(
            s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(external_ids))
            )
        )
        found = {r.external_id for r in rows}
        missing = [e for e in external_ids if e not in found]
        if missing:
            raise UnknownItem(f"gallery {gallery!r} has no item {missing[0]!r}", item=missing[0])
        db_ids = np.array([r.id for r in rows], np.int64)
        for space in (gallery_dir(ctx, gallery) / "vectors").glob("v*"):
            ctx.spaces.open(space).delete(db_ids)
        for r in rows:
            s.delete(r)
        return len(rows)


def encode_and_store(
    ctx: Context, gallery: str, version: ModelVersionRecord, item_ids: IdArray
) -> IdArray:
    """Encode these items' payloads with `version`, store the vectors that are missing,
    and mark them upgraded; returns the ids this call stored (others were already there).
    Pairing, backfill chunks and the cascade's read-through all write through here."""
    store = space_store(ctx, gallery, version)
    _, have = store.get(item_ids)
    todo = item_ids[~have]
    if len(todo) == 0:
        return todo
    with ctx.session() as s:
        rows = {r.id: r.payload for r in s.scalars(select(Item).where(Item.id.in_(todo.tolist())))}
    todo = np.array([i for i in todo if rows.get(int(i))], np.int64)
    if len(todo) == 0:
        return todo
    vectors = ctx.encoder(version).encode(
        [rows[int(i)] for i in todo], ctx.settings.encode_batch_size
    )
    added = store.add_missing(todo, vectors)
    if len(added):
        with ctx.session() as s:
            for row in s.scalars(select(Item).where(Item.id.in_(added.tolist()))):
                row.vector_version_id = version.id
    return added
