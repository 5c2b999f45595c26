"""The metadata index stays consistent with the items under ingest, update, delete and
repair, seen from the context that wrote and from another one (another process): every
filter matches exactly what a scan of the items' metadata says."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from embcompat.errors import InvalidInput
from embcompat.index.meta import MetaIndex, typed
from embcompat.service import galleries, search
from embcompat.service.context import Context
from embcompat.service.galleries.filters import index_file
from tests.conftest import make_context, vector_gallery

KEYS = ("color", "size", "flag")
VALUES = st.sampled_from(["red", "blue", 1, 2, 2.5, True, "1"])
META = st.none() | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3)
CONDITION = (
    VALUES
    | st.lists(VALUES, min_size=1, max_size=3)
    | st.fixed_dictionaries({"not": VALUES | st.lists(VALUES, min_size=1, max_size=2)})
    | st.fixed_dictionaries({}, optional={"lt": st.sampled_from([1, 2, 3]),
                                          "gte": st.sampled_from([0, 1.5, 2])})
    .filter(bool)
)  # fmt: skip
FILTERS = st.dictionaries(st.sampled_from((*KEYS, "id")), CONDITION, min_size=1, max_size=2).filter(
    lambda f: not (isinstance(f.get("id"), dict) and set(f["id"]) - {"not"})  # ids: no order
)


def holds(meta: dict[str, Any] | None, external: str, key: str, condition: Any) -> bool:
    """What a filter means, written plainly: the reference the index must agree with."""
    present = key == "id" or key in (meta or {})
    value = typed(external if key == "id" else (meta or {}).get(key))
    if not isinstance(condition, dict):
        options = condition if isinstance(condition, list) else [condition]
        return present and value in {typed(v) for v in options}
    if "not" in condition:
        options = condition["not"] if isinstance(condition["not"], list) else [condition["not"]]
        if present and value in {typed(v) for v in options}:
            return False
    bounds = {k: v for k, v in condition.items() if k != "not"}
    if bounds:
        if not present or value[0] != "number":
            return False
        x = value[1]
        return ("lt" not in bounds or x < bounds["lt"]) and (
            "gte" not in bounds or x >= bounds["gte"]
        )
    return True


class MetaIndexMachine(RuleBasedStateMachine):
    root = Path()  # set by the test to its tmp_path

    def __init__(self) -> None:
        super().__init__()
        self.ctx = make_context(self.root / uuid.uuid4().hex[:8])  # MLflow keeps old paths
        self.other = Context(self.ctx.settings)  # a second process's view
        vector_gallery(self.ctx, "g", 4)
        self.items: dict[str, dict[str, Any] | None] = {}

    def teardown(self) -> None:
        self.other.close()
        self.ctx.close()

    @rule(names=st.lists(st.integers(0, 30), min_size=1, max_size=6, unique=True), meta=META)
    def ingest(self, names: list[int], meta: dict[str, Any] | None) -> None:
        """Written by this context; the other catches up from the DB."""
        items = [galleries.ItemIn(f"i{n}", vector=[1.0, float(n), 0.0, 0.5], metadata=meta)
                 for n in names]  # fmt: skip
        galleries.ingest(self.ctx, "g", items)
        for n in names:  # metadata None keeps what an item had
            self.items[f"i{n}"] = meta if meta is not None else self.items.get(f"i{n}")

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if self.items:
            gone = data.draw(st.lists(st.sampled_from(sorted(self.items)), min_size=1,
                                      max_size=3, unique=True))  # fmt: skip
            galleries.delete_items(self.other, "g", gone)  # written by the other context
            for name in gone:
                del self.items[name]

    @rule()
    def repair(self) -> None:
        galleries.repair(self.ctx, "g")

    @rule(damage=st.booleans())
    def restart_other(self, damage: bool) -> None:
        """Another process starts: from the index file saved beside the gallery (behind
        by up to SAVE_EVERY writes, so it catches up), or, damaged, from the items."""
        path = index_file(self.ctx, "g")
        if damage and path.exists():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        self.other.close()
        self.other = Context(self.ctx.settings)

    @invariant()
    def filters_match_a_scan(self) -> None:
        for filters in FILTER_SAMPLES:
            expected = sorted(
                name for name, meta in self.items.items()
                if all(holds(meta, name, k, c) for k, c in filters.items())
            )  # fmt: skip
            for ctx in (self.ctx, self.other):
                if not self.items:
                    continue
                res = search.search(ctx, "g", vectors=[[1.0, 0.0, 0.0, 0.5]], k=1000,
                                    filters=filters)  # fmt: skip
                assert sorted(h.item for h in res.hits[0]) == expected, filters


FILTER_SAMPLES: list[dict[str, Any]] = [
    {"color": "red"}, {"color": ["red", 1]}, {"size": 2}, {"size": 2.5},
    {"flag": True}, {"flag": "1"}, {"size": {"lt": 2}}, {"size": {"gte": 1.5, "lt": 3}},
    {"color": {"not": "red"}}, {"id": ["i1", "i7", "nope"]}, {"id": {"not": "i3"}},
    {"color": {"not": ["red", "blue"]}, "size": {"gte": 1}},
]  # fmt: skip


def test_the_metadata_index_follows_every_write(tmp_path: Path) -> None:
    MetaIndexMachine.root = tmp_path
    run = MetaIndexMachine.TestCase
    run.settings = settings(
        max_examples=25,
        stateful_step_count=8,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    run().runTest()


def test_the_index_agrees_with_the_reference_on_random_filters() -> None:
    """Pure: MetaIndex against `holds` on random metadata and filters."""
    from hypothesis import given

    @given(st.lists(META, min_size=0, max_size=40), FILTERS)
    @settings(max_examples=300, deadline=None)
    def check(metas: list[dict[str, Any] | None], filters: dict[str, Any]) -> None:
        index = MetaIndex.build(enumerate(metas))
        expected = [n for n, m in enumerate(metas)
                    if all(holds(m, f"i{n}", k, c) for k, c in filters.items())]  # fmt: skip
        assert index.matching(filters, resolve).tolist() == expected

    def resolve(names: list[str]) -> np.ndarray:
        return np.array(sorted({int(n[1:]) for n in names if n[1:].isdigit()}), np.int64)

    check()


def test_numbers_that_cannot_compare_exactly_are_refused(tmp_path: Path) -> None:
    """NaN would sort above every bound, 2**53 + 1 would equal 2**53, 10**400 has no
    float: refused in metadata and in filters, naming the key."""
    with make_context(tmp_path / "data") as ctx:
        vector_gallery(ctx, "g", 2)
        galleries.ingest(
            ctx, "g", [galleries.ItemIn("a", vector=[1.0, 0.0], metadata={"n": 2**53})]
        )
        for bad in (float("nan"), float("inf"), 2**53 + 1, 10**400):
            with pytest.raises(InvalidInput, match="'n'"):
                galleries.ingest(
                    ctx, "g", [galleries.ItemIn("b", vector=[0.0, 1.0], metadata={"n": bad})]
                )
            for condition in (bad, {"gt": bad}, {"not": bad}):
                with pytest.raises(InvalidInput, match="'n'"):
                    search.search(ctx, "g", vectors=[[1.0, 0.0]], k=2, filters={"n": condition})
        hits = search.search(ctx, "g", vectors=[[1.0, 0.0]], k=2, filters={"n": 2**53}).hits
        assert [h.item for h in hits[0]] == ["a"]


def test_a_saved_index_that_parses_but_lies_is_rebuilt(tmp_path: Path) -> None:
    """The file is derived data: arrays out of order, of unequal lengths or of the wrong
    type make a new process rebuild from the items instead of answering from it."""
    with make_context(tmp_path / "data") as ctx:
        vector_gallery(ctx, "g", 2)
        galleries.ingest(ctx, "g", [galleries.ItemIn(f"i{n}", vector=[1.0, n],
                         metadata={"color": "red" if n % 2 else "blue", "size": n})
                         for n in range(8)])  # fmt: skip
        want = {"color": "red"}
        expected = sorted(h.item for h in search.search(
            ctx, "g", vectors=[[1.0, 0.0]], k=8, filters=want).hits[0])  # fmt: skip
        path = index_file(ctx, "g")
        good = dict(np.load(io.BytesIO(path.read_bytes())))
        lies = [
            {"k0_owners": good["k0_owners"][::-1]},
            {"k0_owners": good["k0_owners"][:-1]},
            {"k1_nids": np.zeros(0, np.int64)},
            {"ids": good["ids"].astype(str)},
            {"k0_owners": good["k0_owners"][:, None]},
            {"stamp": np.zeros(0, np.int64)},
        ]
        for lie in lies:
            buf = io.BytesIO()
            np.savez(buf, **{**good, **lie})
            path.write_bytes(buf.getvalue())
            with Context(ctx.settings) as fresh:
                got = search.search(fresh, "g", vectors=[[1.0, 0.0]], k=8, filters=want).hits[0]
                assert sorted(h.item for h in got) == expected, list(lie)
