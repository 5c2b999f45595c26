"""Items of a gallery: ingest (encode or accept vectors), stage for the workers, delete,
and encode stored payloads into another version's space.

The DB holds each item's external id and raw payload (kept for re-embedding); vectors
live in the vector store, one space per model version, each with the fingerprint of the
content it was computed from. Every writer holds the gallery's lock while it changes the
DB and the store, so the two agree: an item whose content changes keeps no vector of its
old content in any space, and a vector computed from content that changed meanwhile is
never stored. Ingest is idempotent on the external id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import ARRAY, String, any_, bindparam, insert, select, text, update
from sqlalchemy.orm import Session

from embcompat.arrays import FloatArray, IdArray, check_vectors
from embcompat.errors import DuplicateItem, InvalidInput, UnknownItem
from embcompat.index.store import MANIFEST, SpaceStore
from embcompat.registry.jobs import active_upgrade
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item, ItemDeletion, utcnow
from embcompat.service.context import Context
from embcompat.service.galleries.filters import check_metadata, check_text, clean_batch
from embcompat.service.galleries.layout import (
    gallery_dir,
    gallery_lock,
    get_gallery_row,
    known_version,
    space_store,
    space_where,
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


def content_hash(payload: str | None) -> int:
    """The fingerprint stored beside a vector: what it was computed from (never 0,
    which marks a vector of unknown origin)."""
    digest = hashlib.blake2b((payload or "").encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") or 1


def _hashes(payloads: Sequence[str | None]) -> npt.NDArray[np.uint64]:
    return np.array([content_hash(p) for p in payloads], np.uint64)


def _space_stores(ctx: Context, gallery: str) -> list[SpaceStore]:
    """Every space of the gallery on disk: version spaces and mapped ones."""
    root = gallery_dir(ctx, gallery) / "vectors"
    return [
        ctx.spaces.open(p, where=space_where(gallery, p.name))
        for p in sorted(root.glob("v*"))
        if (p / MANIFEST).exists()  # a space being removed or rebuilt holds nothing
    ]


def _check_batch(ctx: Context, items: Sequence[ItemIn]) -> list[str]:
    if len(items) > ctx.settings.max_batch_items:
        raise InvalidInput(
            f"batch of {len(items)} items exceeds the limit of {ctx.settings.max_batch_items}",
            field="items",
        )
    ids = [it.id for it in items]
    texts = [it.text for it in items if it.text is not None]
    if not clean_batch(ids + texts, [it.metadata for it in items]):
        for it in items:
            check_text(it.id, "id", it.id)
            if it.text is not None:
                check_text(it.id, "text", it.text)
            check_metadata(it.id, it.metadata)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DuplicateItem(f"item id {dup!r} appears twice in one batch", item=dup)
    return ids


def stage(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> int:
    """Store raw items (texts) without vectors, for the `ingest` task to encode in chunks
    on the workers; idempotent on item id. An item staged with new content loses its old
    vectors at once (it is not found until encoded). Returns how many are staged."""
    ids = _check_batch(ctx, items)
    missing = [it.id for it in items if not it.text or it.vector is not None]
    if missing:
        raise InvalidInput(f"staged item {missing[0]!r} needs a text and no vector", field="text")
    with gallery_lock(ctx, gallery), ctx.session(write=True) as s:
        g = get_gallery_row(s, gallery, lock=True)
        g.items_version += 1
        serving = known_version(ctx, s, g.serving_version_id)
        if serving.external or serving.tags.get("input", "text") != "text":
            raise InvalidInput(
                f"gallery {gallery!r} is served by {serving.ref}, which cannot encode texts: "
                "staged items would never get vectors",
                hint="ingest the items with their vectors instead",
                field="items",
            )
        existing = {
            r.external_id: r
            for r in s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(ids))
            )
        }
        changed = []
        for it in items:
            row = existing.get(it.id) or Item(gallery_id=g.id, external_id=it.id)
            if row.payload != it.text or row.vector_version_id is None:
                if row.id is not None:
                    changed.append(row.id)
                row.payload, row.vector_version_id = it.text, None
            if it.metadata is not None:
                row.meta = it.metadata
            row.meta_seq = g.items_version
            s.add(row)
        for store in _space_stores(ctx, gallery):
            store.delete(np.array(changed, np.int64))
    return len(items)


def encode_staged(ctx: Context, gallery: str, limit: int = 1000) -> int:
    """Encode up to `limit` staged items and store their vectors; returns how many. The
    rows are read under the gallery's lock, so an update or delete that came meanwhile
    is never undone by writing back what was read before it."""
    with gallery_lock(ctx, gallery):
        with ctx.session() as s:
            g = get_gallery_row(s, gallery)
            rows = s.execute(
                select(Item.external_id, Item.payload, Item.meta)
                .where(
                    Item.gallery_id == g.id,
                    Item.vector_version_id.is_(None),
                    Item.payload.is_not(None),
                )
                .order_by(Item.id)
                .limit(limit)
            ).all()
        if rows:
            _ingest_locked(
                ctx, gallery, [ItemIn(ext, text, None, meta) for ext, text, meta in rows]
            )
    return len(rows)


def ingest(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> dict[str, int]:
    """Add or update items (idempotent on item id), in the serving version's space and,
    mid-upgrade, in the new version's too; an updated item's vectors in other spaces
    are dropped (a later upgrade encodes its new content)."""
    if not items:
        return {"added": 0, "updated": 0}
    with gallery_lock(ctx, gallery):
        return _ingest_locked(ctx, gallery, items)


def _ingest_locked(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> dict[str, int]:
    _check_batch(ctx, items)
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        targets = [known_version(ctx, s, g.serving_version_id)]
        job = active_upgrade(s, g.id)
        if job is not None and job.to_version_id is not None:
            targets.append(known_version(ctx, s, job.to_version_id))
    # encoded outside any transaction; the lock keeps the targets as they were read
    vectors = [encode_items(ctx, v, items) for v in targets]
    return _write_items(ctx, gallery, items, targets, vectors)


def _write_items(
    ctx: Context,
    gallery: str,
    items: Sequence[ItemIn],
    targets: list[ModelVersionRecord],
    vectors: list[FloatArray],
) -> dict[str, int]:
    """The DB rows and the vectors of one ingest batch, under the gallery's lock. Rows
    are written in bulk (one INSERT of every new item returning its id, one UPDATE per
    key set by primary key for known ones): no ORM object per item."""
    with ctx.session(write=True) as s:
        g = get_gallery_row(s, gallery, lock=True)
        g.items_version += 1
        version_id, now = targets[0].id, utcnow()
        rows = [
            {"gallery_id": g.id, "external_id": it.id, "payload": it.text, "meta": it.metadata,
             "vector_version_id": version_id, "meta_seq": g.items_version}
            for it in items
        ]  # fmt: skip
        got, existing = insert_new(s, g.id, rows, now)
        db_ids = np.array([existing[it.id][0] if it.id in existing else got[it.id]
                           for it in items], np.int64)  # fmt: skip
        fresh = np.array([got[it.id] for it in items if it.id in got], np.int64)
        sources = _hashes([it.text for it in items])
        stores = [space_store(ctx, gallery, v) for v in targets]

        def write_rows() -> None:
            known = [it for it in items if it.id in existing]
            for with_meta in (True, False):  # one statement per set of columns
                rows = [
                    {"id": existing[it.id][0], "payload": it.text, "vector_version_id": version_id,
                     "updated_at": now, "meta_seq": g.items_version,
                     **({"meta": it.metadata} if with_meta else {})}
                    for it in known if (it.metadata is not None) == with_meta
                ]  # fmt: skip
                if rows:
                    s.execute(update(Item), rows)

        def write_vectors() -> None:
            for store, vecs in zip(stores, vectors, strict=True):
                store.add(db_ids, vecs, sources, replace=True)

        changed = [
            existing[it.id][0]
            for it in items
            if it.id in existing and (existing[it.id][1] != it.text or it.vector is not None)
        ]
        changed += fresh.tolist()  # an id SQLite reused may still have an orphan vector
        try:
            # known items' rows are updated while the vector shards are written and
            # fsynced (new rows were inserted above: their ids name the vectors)
            side_by_side(write_rows, write_vectors)
            for other in _space_stores(ctx, gallery):
                if other.root not in {st.root for st in stores}:
                    other.delete(np.array(changed, np.int64))
            s.commit()
        except BaseException:
            for store in stores:  # new items leave no vector behind a failed commit
                store.delete(fresh)
            raise
        return {"added": len(items) - len(existing), "updated": len(existing)}


def _existing(s: Session, gallery_id: int, ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """{external id: (id, payload)} of those of `ids` the gallery holds. On PostgreSQL the
    ids travel as one array parameter (compiling 10,000 parameters cost more than the
    query)."""
    if not ids:
        return {}
    if s.get_bind().dialect.name == "postgresql":
        named = Item.external_id == any_(bindparam("ids", ids, type_=ARRAY(String)))
    else:
        named = Item.external_id.in_(ids)
    query = select(Item.id, Item.external_id, Item.payload).where(
        Item.gallery_id == gallery_id, named
    )
    return {ext: (int(i), payload) for i, ext, payload in s.execute(query)}


_INSERT_NEW_PG = text(
    "INSERT INTO items (gallery_id, external_id, payload, meta, vector_version_id, meta_seq,"
    " created_at, updated_at)"
    " SELECT :gallery_id, e, p, m::json, :vector_version_id, :meta_seq, :now, :now"
    " FROM unnest(CAST(:ext AS text[]), CAST(:payload AS text[]), CAST(:meta AS text[]))"
    " AS u(e, p, m)"
    " ON CONFLICT (gallery_id, external_id) DO NOTHING RETURNING id, external_id"
)
# ids of a batch probed for held items before the insert: a row the insert skips has
# drawn an id from the 32-bit sequence all the same (a WHERE NOT EXISTS that avoids it
# made the insert 2.8x slower at 1M items), so a batch of held items (a re-ingest,
# staged items encoded) is looked up first and only its new rows are inserted
HELD_PROBE = 8


def insert_new(
    s: Session, gallery_id: int, rows: list[dict[str, Any]], now: datetime
) -> tuple[dict[str, int], dict[str, tuple[int, str | None]]]:
    """Insert the rows of one ingest batch (one gallery, version and meta_seq) whose items
    the gallery does not hold yet: ({external id: new id}, {external id: (id, payload)}
    of the items it held). PostgreSQL, for a batch of new items (HELD_PROBE of its ids
    held by none): one INSERT ... ON CONFLICT DO NOTHING of the whole batch, its unique
    index answering "exists?", then a lookup of only the rows it skipped (at 1M items,
    looking every id up first cost as much as writing the rows). Otherwise, and on other
    databases: the lookup, then one insert of the new rows."""
    if not rows:
        return {}, {}
    names = [r["external_id"] for r in rows]
    postgresql = s.get_bind().dialect.name == "postgresql"
    if postgresql and not _existing(s, gallery_id, names[:: max(1, len(names) // HELD_PROBE)]):
        got = _insert_pg(s, gallery_id, rows, now)
        return got, _existing(s, gallery_id, [n for n in names if n not in got])
    existing = _existing(s, gallery_id, names)
    fresh = [r for r in rows if r["external_id"] not in existing]
    if not fresh:
        return {}, existing
    if postgresql:
        return _insert_pg(s, gallery_id, fresh, now), existing
    inserted = s.execute(
        insert(Item).returning(Item.id, Item.external_id, sort_by_parameter_order=True), fresh
    )
    return {ext: int(i) for i, ext in inserted}, existing


def _insert_pg(
    s: Session, gallery_id: int, rows: list[dict[str, Any]], now: datetime
) -> dict[str, int]:
    """{external id: new id} of the rows PostgreSQL inserted (one statement, arrays as
    parameters: no per-row parameters to compile)."""
    first = rows[0]
    params = {
        "gallery_id": gallery_id, "vector_version_id": first["vector_version_id"],
        "meta_seq": first["meta_seq"], "now": now,
        "ext": [r["external_id"] for r in rows], "payload": [r["payload"] for r in rows],
        "meta": [None if r["meta"] is None else json.dumps(r["meta"]) for r in rows],
    }  # fmt: skip
    return {ext: int(i) for i, ext in s.execute(_INSERT_NEW_PG, params)}


def side_by_side(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run `second` on a thread while `first` runs here; both have finished when this
    returns or raises (first's error wins), so a failure never leaves a write running."""
    with ThreadPoolExecutor(1) as pool:  # leaving the block waits for the thread
        pending = pool.submit(second)
        first()
        pending.result()


def delete_items(ctx: Context, gallery: str, external_ids: Sequence[str]) -> int:
    with gallery_lock(ctx, gallery), ctx.session(write=True) as s:
        g = get_gallery_row(s, gallery, lock=True)
        g.items_version += 1
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
        for store in _space_stores(ctx, gallery):
            store.delete(db_ids)
        for r in rows:
            s.delete(r)
        if len(db_ids):
            s.execute(
                insert(ItemDeletion),
                [{"gallery_id": g.id, "item_id": int(i), "seq": g.items_version} for i in db_ids],
            )
        return len(rows)


def encode_and_store(
    ctx: Context, gallery: str, version: ModelVersionRecord, item_ids: IdArray
) -> IdArray:
    """Encode these items' payloads with `version` and store the vectors that are missing
    or stale (computed from content that has changed since); returns the ids this call
    stored. Pairing, backfill chunks and the cascade's read-through all write through
    here. Encoding runs outside the gallery's lock; what it produced is stored only for
    items whose content is still what was encoded."""
    store = space_store(ctx, gallery, version)
    item_ids = np.asarray(item_ids, np.int64)
    todo, texts = _stale(ctx, store, item_ids)
    if len(todo) == 0:
        return todo
    vectors = ctx.encoder(version).encode(texts, ctx.settings.encode_batch_size)
    sources = _hashes(texts)
    with gallery_lock(ctx, gallery), ctx.session() as s:
        now = _hashes(_payloads(s, todo))  # a deleted item's is "" and never matches
        have, found = store.sources(todo)
        keep = (now == sources) & (~found | (have != sources))
        if keep.any():
            store.add(todo[keep], vectors[keep], sources[keep], replace=True)
    return todo[keep]


def _payloads(session: Session, ids: IdArray) -> list[str | None]:
    query = select(Item.id, Item.payload).where(Item.id.in_(ids.tolist()))
    rows: dict[int, str | None] = dict(session.execute(query).tuples().all())
    return [rows.get(int(i)) for i in ids]


def _stale(ctx: Context, store: SpaceStore, ids: IdArray) -> tuple[IdArray, list[str]]:
    """The ids among `ids` whose vector in `store` is missing or computed from other
    content than their payload now, and those payloads (items without one are skipped)."""
    have, found = store.sources(ids)
    with ctx.session() as s:
        payloads = _payloads(s, ids)
    has_text = np.array([bool(p) for p in payloads], dtype=bool)
    # a vector stored before fingerprints (0) is trusted: re-encoding every space at once
    # after an update of the service would cost a backfill
    stale = (~found | ((have != _hashes(payloads)) & (have != 0))) & has_text
    return ids[stale], [str(p) for p, st in zip(payloads, stale, strict=True) if st]
