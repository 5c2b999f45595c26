"""Bulk item writes (PostgreSQL: one INSERT ... SELECT FROM unnest of a batch's new
items; SQLite: one INSERT ... RETURNING) keep every byte of payloads and metadata, on
both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError

from embcompat.errors import InvalidInput
from embcompat.registry import versions
from embcompat.registry.schema import Item
from embcompat.service import galleries, search
from embcompat.service.galleries.filters import check_metadata, check_text, clean_batch
from embcompat.service.galleries.layout import item_ids_of
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


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    ("item", "field"),
    [
        (galleries.ItemIn("a", text="nul\x00inside", vector=[1.0, 0.0, 0.0]), "text"),
        (galleries.ItemIn("b\x00", text="x", vector=[1.0, 0.0, 0.0]), "id"),
        (galleries.ItemIn("c", vector=[1.0, 0.0, 0.0], metadata={"k": "v\x00"}), "metadata"),
        (galleries.ItemIn("d", text="lone \ud800", vector=[1.0, 0.0, 0.0]), "text"),
    ],
)
def test_strings_a_database_cannot_keep_are_refused_before_anything_is_written(
    tmp_path: Path, backend: str, item: galleries.ItemIn, field: str, request: pytest.FixtureRequest
) -> None:
    """PostgreSQL refuses a NUL or a lone surrogate halfway through a batch's insert (a 500);
    both backends now refuse the batch up front, naming the item and the field."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    with make_context(tmp_path / "data", url) as ctx:
        vector_gallery(ctx, "g", 3)
        ok = galleries.ItemIn("ok", text="fine", vector=[0.0, 1.0, 0.0])
        with pytest.raises(InvalidInput) as err:
            galleries.ingest(ctx, "g", [ok, item])
        assert err.value.context["field"] == field and repr(item.id) in err.value.message
        with ctx.session() as s:
            assert s.scalars(select(Item.id)).all() == []
            serving = versions.get_version(s, ctx.registry, "vec", "v1")
        assert len(galleries.space_store(ctx, "g", serving)) == 0


@pytest.mark.parametrize("refused", ["INSERT", "UPDATE"])
def test_a_batch_whose_rows_fail_leaves_neither_rows_nor_vectors(
    tmp_path: Path, pg_url: str, refused: str
) -> None:
    """The database refuses one row of a batch (a trigger here, as any constraint of the
    server could): on the insert of a new item, before any vector is written, or on the
    update of a known one while the new items' vectors are written beside it. Either
    way no new row is kept and the new items' vectors are removed again."""
    with make_context(tmp_path / "data", pg_url) as ctx:
        vector_gallery(ctx, "g", 3)
        galleries.ingest(ctx, "g", [galleries.ItemIn("seed", vector=[1.0, 0.0, 0.0])])
        with ctx.session() as s:
            seed = s.scalars(select(Item.id)).one()
            serving = versions.get_version(s, ctx.registry, "vec", "v1")
        engine = create_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN"
                " RAISE EXCEPTION 'refused %', NEW.external_id; END $$ LANGUAGE plpgsql"
            ))  # fmt: skip
            conn.execute(text(
                f"CREATE TRIGGER refuse BEFORE {refused} ON items FOR EACH ROW"
                " WHEN (NEW.external_id IN ('x2', 'seed')) EXECUTE FUNCTION refuse()"
            ))  # fmt: skip
        engine.dispose()
        batch = [galleries.ItemIn(f"x{n}", vector=[0.0, 1.0, float(n)]) for n in range(4)]
        batch.append(galleries.ItemIn("seed", text="now with text", vector=[1.0, 0.0, 0.0]))
        with pytest.raises(DBAPIError, match="refused (x2|seed)"):
            galleries.ingest(ctx, "g", batch)
        with ctx.session() as s:
            assert s.scalars(select(Item.external_id)).all() == ["seed"]
        assert galleries.space_store(ctx, "g", serving).snapshot().ids.tolist() == [seed]


_good = st.text(st.sampled_from("aé\tz"), min_size=1, max_size=4)
_any = st.text(st.sampled_from(["a", "é", "\x00", "\ud800", "\udc00"]), max_size=4)
_keys = st.one_of(_good, _good, _any, st.text(min_size=99, max_size=101))
_values = st.one_of(
    _good, _any, st.booleans(), st.integers(), st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1]),
    st.floats(allow_nan=True), st.none(), st.lists(st.integers(), max_size=1), st.just(1 + 2j),
)  # fmt: skip
_metadata = st.one_of(st.dictionaries(_keys, _values, max_size=3), st.none(), st.integers())


@given(
    strings=st.lists(st.one_of(_good, _any), max_size=2), metadata=st.lists(_metadata, max_size=2)
)
@example(strings=[], metadata=[{"k": float("nan")}])
@example(strings=[], metadata=[{"k": -float("inf")}])
@example(strings=[], metadata=[{"k" * 101: 1}])
@example(strings=[], metadata=[{"": 1}])
@example(strings=["ok"], metadata=[{"k": 2**53 + 1}])
@settings(max_examples=300, deadline=None)
def test_a_clean_batch_is_exactly_one_every_check_passes(
    strings: list[str], metadata: list[object]
) -> None:
    """The one-pass check of a batch (`clean_batch`) agrees with the per-value checks on
    every string and metadata object, NUL, lone surrogates, huge integers, NaN, keys
    of 0 or 101 characters and values of any type included."""

    def each_passes() -> bool:
        try:
            for value in strings:
                check_text("x", "text", value)
            for meta in metadata:
                check_metadata("x", meta)
        except InvalidInput:
            return False
        return True

    assert clean_batch(strings, metadata) == each_passes()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_items_named_by_more_ids_than_a_statement_binds_are_found_in_parts(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A probe can name 260,000 items: more than one statement binds on either database
    (PostgreSQL 65,535, SQLite as built here 250,000). The upgrade's probe measure and
    the probe summary look them up in parts."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    with make_context(tmp_path / "data", url) as ctx:
        vector_gallery(ctx, "g", 3)
        held = [galleries.ItemIn(f"i{n}", vector=[1.0, n, 0.0]) for n in (7, 250_001)]
        galleries.ingest(ctx, "g", held)
        names = [f"i{n}" for n in range(260_000)]
        with ctx.session() as s:
            gallery_id = galleries.get_gallery_row(s, "g").id
            found = item_ids_of(s, gallery_id, names)
        assert sorted(found) == ["i250001", "i7"]
        galleries.set_probe(ctx, "g", [{"text": "q", "relevant": names}])
        assert galleries.probe_summary(ctx, "g")["resolved"] == 2


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".hidden", "a\x00b", ""])
def test_a_gallery_name_must_be_a_plain_folder_name(tmp_path: Path, name: str) -> None:
    """A gallery's name is a folder under the data directory: the service refuses one
    that would leave it or hide in it, whoever calls (the API's schema, the local CLI)."""
    with make_context(tmp_path / "data") as ctx:
        with pytest.raises(InvalidInput, match="gallery name .* is not allowed"):
            vector_gallery(ctx, name, 3)
        assert not (tmp_path / "elsewhere").exists()


def test_items_already_held_draw_no_id(tmp_path: Path, pg_url: str) -> None:
    """Re-ingesting held items (updates, staged batches encoded) draws nothing from the
    32-bit id sequence: the next new item takes the id after the last one."""
    with make_context(tmp_path / "data", pg_url) as ctx:
        vector_gallery(ctx, "g", 3)
        batch = [galleries.ItemIn(f"x{n}", vector=[0.0, 1.0, float(n)]) for n in range(5)]
        galleries.ingest(ctx, "g", batch)
        for _ in range(3):
            assert galleries.ingest(ctx, "g", batch) == {"added": 0, "updated": 5}
        galleries.ingest(ctx, "g", [*batch, galleries.ItemIn("new", vector=[1.0, 0.0, 0.0])])
        with ctx.session() as s:
            ids = dict(s.execute(select(Item.external_id, Item.id)).tuples().all())
        assert ids["new"] == max(ids[f"x{n}"] for n in range(5)) + 1
