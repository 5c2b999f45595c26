"""Filters on item metadata: which items a filtered search must never return.

filters: {key: condition}, all keys must hold; a condition is a value, a list of values
(any of), or operators `not`, `lt`, `lte`, `gt`, `gte` (`index.meta` has the rules);
the key `id` matches item ids."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from embcompat.arrays import IdArray
from embcompat.errors import InvalidInput
from embcompat.files import atomic_write
from embcompat.index.meta import (
    MAX_EXACT,
    MetaIndex,
    MetaValue,
    from_bytes,
    number_problem,
    to_bytes,
)
from embcompat.registry.schema import Item, ItemDeletion
from embcompat.service.context import Context
from embcompat.service.galleries.layout import gallery_dir, get_gallery_row

log = logging.getLogger(__name__)

Filters = dict[str, Any]


def check_text(item_id: str, what: str, value: str) -> None:
    """A string every database stores as it is: no NUL character (PostgreSQL refuses
    one mid-batch, SQLite would keep it) and valid UTF-8 (no lone surrogate)."""
    if "\x00" in value:
        raise InvalidInput(f"item {item_id!r}: {what} contains a NUL character", field=what)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(
                f"item {item_id!r}: {what} is not valid UTF-8 (a lone surrogate)", field=what
            ) from None


def check_metadata(item_id: str, meta: Any) -> None:
    """Metadata is a flat object of strings, numbers and bools, keys of 1-100 chars."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise InvalidInput(f"item {item_id!r}: metadata must be an object", field="metadata")
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= 100:
            raise InvalidInput(f"item {item_id!r}: metadata key {key!r} is not allowed")
        check_text(item_id, "metadata", key)
        if isinstance(value, str):
            check_text(item_id, "metadata", value)
        if not isinstance(value, MetaValue):  # type: ignore[arg-type]
            raise InvalidInput(
                f"item {item_id!r}: metadata {key!r} must be a string, number or bool, "
                f"not {type(value).__name__}",
                field="metadata",
            )
        if problem := number_problem(value):
            raise InvalidInput(f"item {item_id!r}: metadata {key!r}: {problem}", field="metadata")


def clean_batch(strings: list[str], metadata: list[Any]) -> bool:
    """True when `check_text` and `check_metadata` would pass every one of a batch's
    strings and metadata objects: one pass with no call per value and one scan of the
    joined strings (per-value checks cost a fifth of an ingest batch). False sends the
    caller to those checks, which name the item and the field at fault."""
    if any(type(text) is not str for text in strings):  # a subclass may check otherwise
        return False
    texts = list(strings)
    for meta in metadata:
        if meta is None:
            continue
        if type(meta) is not dict:
            return False
        for key, value in meta.items():
            kind = type(value)
            if type(key) is not str or not 0 < len(key) <= 100:
                return False
            texts.append(key)
            if kind is str:
                texts.append(value)
            elif kind is int:
                if not -MAX_EXACT <= value <= MAX_EXACT:
                    return False
            elif kind is float:
                if not math.isfinite(value):
                    return False
            elif kind is not bool:
                return False
    try:
        joined = "".join(texts)
        return "\x00" not in joined and (joined.isascii() or bool(joined.encode("utf-8")))
    except (TypeError, UnicodeEncodeError):
        return False


def allowed_by(ctx: Context, gallery: str, filters: Filters | None) -> IdArray | None:
    """The sorted ids of the items a search with `filters` may return (None: no filter),
    from the gallery's metadata index (`index.meta`): array operations on the matching
    ids, no pass over the items."""
    if not filters:
        return None
    if not isinstance(filters, dict):
        raise InvalidInput("filters must be an object of key: condition", field="filters")
    with ctx.session() as s:
        gallery_id = get_gallery_row(s, gallery).id

        def resolve(names: list[str]) -> IdArray:
            query = select(Item.id).where(
                Item.gallery_id == gallery_id, Item.external_id.in_(names)
            )
            return np.unique(np.array(s.scalars(query).all(), np.int64))

        return meta_index(ctx, gallery).matching(filters, resolve)


REBUILD_SHARE = 0.25  # more changed items than this share of the index: rebuild instead
SAVE_EVERY = 100  # item writes between saves of the index file


def index_file(ctx: Context, gallery: str) -> Path:
    return gallery_dir(ctx, gallery) / "meta-index.npz"


def meta_index(ctx: Context, gallery: str) -> MetaIndex:
    """The gallery's metadata index as of its latest item write, kept on the context.

    Behind by a few writes, it catches up with the rows stamped after it (`meta_seq`) and
    the deletions logged since; a new process starts from the file saved beside the
    gallery (rewritten every SAVE_EVERY writes); only a missing or damaged file, or many
    changes at once, cost a pass over the gallery's items."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        # the gallery (its id and creation time: a re-created gallery can reuse the id)
        # and its write counter, read before the rows: they are never older than it
        stamp = (g.id, int(g.created_at.timestamp() * 1e6), g.items_version)

        def catch_up(kept: tuple[Any, tuple[MetaIndex, int]] | None) -> tuple[MetaIndex, int]:
            base = (kept[1][0], kept[0], kept[1][1]) if kept else _saved(ctx, gallery)
            if base is not None and base[1][:2] == stamp[:2] and base[1][2] <= g.items_version:
                index, (_, _, since), saved = base
                rows = s.execute(
                    select(Item.id, Item.meta).where(Item.gallery_id == g.id, Item.meta_seq > since)
                ).all()
                removed = s.scalars(
                    select(ItemDeletion.item_id).where(
                        ItemDeletion.gallery_id == g.id, ItemDeletion.seq > since
                    )
                ).all()
                if len(rows) + len(removed) <= max(1000, REBUILD_SHARE * len(index)):
                    index = index.updated(
                        ((int(i), m) for i, m in rows), np.unique(np.array(removed, np.int64))
                    )
                    if g.items_version - saved >= SAVE_EVERY:
                        saved = _save(ctx, gallery, index, stamp)
                    return index, saved
            query = select(Item.id, Item.meta).where(Item.gallery_id == g.id)
            index = MetaIndex.build((int(i), m) for i, m in s.execute(query))
            return index, _save(ctx, gallery, index, stamp)

        return ctx.current("meta", gallery, stamp, catch_up)[0]


def _saved(ctx: Context, gallery: str) -> tuple[MetaIndex, tuple[int, ...], int] | None:
    """The index file beside the gallery, if it reads back whole."""
    try:
        index, stamp = from_bytes(index_file(ctx, gallery).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # derived data: rebuilt from the items
        log.warning("gallery %r: metadata index file unreadable (%s), rebuilding", gallery, exc)
        return None
    return index, stamp, stamp[-1]


def _save(ctx: Context, gallery: str, index: MetaIndex, stamp: tuple[int, ...]) -> int:
    atomic_write(index_file(ctx, gallery), to_bytes(index, stamp))
    return stamp[-1]


def forget_meta_index(ctx: Context, gallery: str) -> None:
    """Drop the kept and saved index (a repair): the next filter rebuilds it."""
    ctx.forget("meta", gallery)
    index_file(ctx, gallery).unlink(missing_ok=True)
