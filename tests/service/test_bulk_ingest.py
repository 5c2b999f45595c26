"""Bulk item writes (PostgreSQL: ids from the sequence, rows by COPY; SQLite: one
INSERT ... RETURNING) keep every byte of payloads and metadata, on both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from embcompat.registry import versions
from embcompat.registry.schema import Item
from embcompat.service import galleries, search
from tests.conftest import make_context, vector_gallery

AWKWARD = ["tab\there", "line\nbreak", "cr\rhere", "back\\slash", "\\N", "", "quote \"'",
           "ünïcødé ☃", "\\t literal", "end\\"]  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bulk_ingest_keeps_every_byte_on_both_databases(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    with make_context(tmp_path / "data", url) as ctx:
        vector_gallery(ctx, "g", 3)
        items = [
            galleries.ItemIn(f"i{n}\t{text}", text=text, vector=[1.0, n, 0.5],
                             metadata={"note": text, "n": n, "flag": n % 2 == 0})
            for n, text in enumerate(AWKWARD)
        ]  # fmt: skip
        assert galleries.ingest(ctx, "g", items) == {"added": len(AWKWARD), "updated": 0}
        again = [galleries.ItemIn(items[0].id, text="new", vector=[0.0, 1.0, 0.0])]
        extra = [galleries.ItemIn("fresh", text=None, vector=[0.0, 0.0, 1.0], metadata=None)]
        assert galleries.ingest(ctx, "g", again + extra) == {"added": 1, "updated": 1}
        with ctx.session() as s:
            rows = {e: (i, p, m) for i, e, p, m in s.execute(
                select(Item.id, Item.external_id, Item.payload, Item.meta))}  # fmt: skip
        assert rows[items[0].id][1] == "new" and rows["fresh"][1:] == (None, None)
        for it in items[1:]:
            assert rows[it.id][1:] == (it.text, it.metadata)
        ids = sorted(i for i, _, _ in rows.values())
        assert len(set(ids)) == len(AWKWARD) + 1
        with ctx.session() as s:
            serving = versions.get_version(s, ctx.registry, "vec", "v1")
        store = galleries.space_store(ctx, "g", serving)
        assert sorted(store.snapshot().ids.tolist()) == ids
        for it in items[1:]:  # each row's id holds its own vector, found by its metadata
            hits = search.search(ctx, "g", vectors=[it.vector], k=1, filters={"note": it.text})
            assert [h.item for h in hits.hits[0]] == [it.id]
        more = [galleries.ItemIn(f"m{n}", vector=[1.0, 0.0, n]) for n in range(50)]
        galleries.ingest(ctx, "g", more)  # the sequence moved on: no id collides
        assert len(store.snapshot().ids) == len(AWKWARD) + 51
