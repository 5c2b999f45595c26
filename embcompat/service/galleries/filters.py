"""Filters on item metadata: which items a filtered search must never return.

filters: {key: condition}, all keys must hold; a condition is a value, a list of values
(any of), or operators `not`, `lt`, `lte`, `gt`, `gte` (`index.meta` has the rules);
the key `id` matches item ids."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from embcompat.arrays import IdArray
from embcompat.errors import InvalidInput
from embcompat.index.meta import MetaIndex, MetaValue
from embcompat.registry.schema import Item
from embcompat.service.context import Context
from embcompat.service.galleries.layout import get_gallery_row

Filters = dict[str, Any]


def check_metadata(item_id: str, meta: Any) -> None:
    """Metadata is a flat object of strings, numbers and bools, keys of 1-100 chars."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise InvalidInput(f"item {item_id!r}: metadata must be an object", field="metadata")
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= 100:
            raise InvalidInput(f"item {item_id!r}: metadata key {key!r} is not allowed")
        if not isinstance(value, MetaValue):  # type: ignore[arg-type]
            raise InvalidInput(
                f"item {item_id!r}: metadata {key!r} must be a string, number or bool, "
                f"not {type(value).__name__}",
                field="metadata",
            )


def allowed_by(ctx: Context, gallery: str, filters: Filters | None) -> IdArray | None:
    """The sorted ids of the items a search with `filters` may return (None: no filter),
    from the gallery's metadata index (`index.meta`): array operations on the matching
    ids, no pass over the items. The index is rebuilt from the database only after a
    write to the gallery's items (its `items_version` moved)."""
    if not filters:
        return None
    if not isinstance(filters, dict):
        raise InvalidInput("filters must be an object of key: condition", field="filters")
    return meta_index(ctx, gallery).matching(filters)


def meta_index(ctx: Context, gallery: str) -> MetaIndex:
    """The gallery's metadata index as of its latest item write, kept on the context."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        query = select(Item.id, Item.external_id, Item.meta).where(Item.gallery_id == g.id)
        # the version is read before the rows, so the rows are never older than it says
        return ctx.current(
            "meta",
            gallery,
            (g.id, g.items_version),
            lambda: MetaIndex((int(i), str(e), m) for i, e, m in s.execute(query)),
        )
