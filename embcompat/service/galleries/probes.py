"""A gallery's stored labelled probe: queries with the ids of their relevant items. The
gate measures every plan on it when an upgrade gives none, and registration reports
predict R@10 with it."""

from __future__ import annotations

from typing import Any

from embcompat.errors import InvalidInput
from embcompat.registry.schema import GalleryProbe
from embcompat.service.context import Context
from embcompat.service.galleries.layout import get_gallery_row, item_ids_of

MAX_QUERIES = 100_000


def set_probe(ctx: Context, gallery: str, queries: list[dict[str, Any]]) -> dict[str, Any]:
    """Store (replace) the gallery's probe; returns how many queries it has and how many
    of their relevant items the gallery holds now (ids not yet ingested are kept)."""
    if not queries or len(queries) > MAX_QUERIES:
        raise InvalidInput(f"a probe needs 1 to {MAX_QUERIES} queries", field="queries")
    for n, q in enumerate(queries):
        if not isinstance(q, dict) or not (isinstance(q.get("text"), str) and q["text"]) or not (
            isinstance(q.get("relevant"), list) and q["relevant"]
            and all(isinstance(r, str) for r in q["relevant"])
        ):  # fmt: skip
            raise InvalidInput(
                f"probe query {n} needs a text and a non-empty list of relevant item ids",
                field="queries",
            )
    clean = [{"text": q["text"], "relevant": list(q["relevant"])} for q in queries]
    with ctx.session(write=True) as s:
        g = get_gallery_row(s, gallery, lock=True)
        row = s.get(GalleryProbe, g.id)
        if row is None:
            s.add(GalleryProbe(gallery_id=g.id, queries=clean))
        else:
            row.queries = clean
    return probe_summary(ctx, gallery)


def get_probe(ctx: Context, gallery: str) -> list[dict[str, Any]] | None:
    with ctx.session() as s:
        row = s.get(GalleryProbe, get_gallery_row(s, gallery).id)
        return list(row.queries) if row is not None else None


def probe_summary(ctx: Context, gallery: str) -> dict[str, Any]:
    """What the stored probe holds, without its texts: counts and when it was set."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        row = s.get(GalleryProbe, g.id)
        if row is None:
            return {"gallery": gallery, "queries": 0, "relevant": 0, "resolved": 0}
        wanted = sorted({r for q in row.queries for r in q["relevant"]})
        resolved = len(item_ids_of(s, g.id, wanted))
        return {"gallery": gallery, "queries": len(row.queries), "relevant": len(wanted),
                "resolved": resolved, "updated_at": row.updated_at.isoformat()}  # fmt: skip
