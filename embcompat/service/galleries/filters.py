"""Filters on item metadata: which items a filtered search must never return.

filters: {key: value} (equal) or {key: [values]} (any of); all keys must hold; the key
`id` matches item ids. Items without the key do not match."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from embcompat.arrays import IdArray
from embcompat.errors import InvalidInput
from embcompat.registry.schema import Item
from embcompat.service.context import Context
from embcompat.service.galleries.layout import get_gallery_row

MetaValue = str | int | float | bool
Filters = dict[str, MetaValue | list[MetaValue]]
_MISSING = object()


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


def excluded_by(ctx: Context, gallery: str, filters: Filters | None) -> IdArray | None:
    """The sorted item ids a search with `filters` must never return (None: no filter)."""
    if not filters:
        return None
    if not isinstance(filters, dict):
        raise InvalidInput("filters must be an object of key: value or [values]", field="filters")
    wanted: dict[str, set[tuple[str, Any]]] = {}
    for key, value in filters.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, MetaValue) for v in values):  # type: ignore[arg-type]
            raise InvalidInput(
                f"filter {key!r} needs a string, number or bool, or a non-empty list of them",
                field="filters",
            )
        wanted[key] = {_typed(v) for v in values}
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        rows = s.execute(
            select(Item.id, Item.external_id, Item.meta).where(Item.gallery_id == g.id)
        ).all()
    out = [
        i
        for i, ext, meta in rows
        if not all(
            _typed(ext if key == "id" else (meta or {}).get(key, _MISSING)) in values
            for key, values in wanted.items()
        )
    ]
    return np.array(sorted(out), np.int64)


def _typed(value: Any) -> tuple[str, Any]:
    """A value with its kind, so `true` never matches 1 nor "1" matches 1 (Python's
    True == 1), while 1 and 1.0 stay the same number."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, str):
        return ("str", value)
    return ("missing", id(value))
