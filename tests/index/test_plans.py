"""Serving plans over a mixed gallery: no duplicates mid-move, the cascade's read-through
backfill (once per item, within budget), and an encoder failure that never fails a search."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from embcompat.adapters import ProcrustesAdapter
from embcompat.arrays import l2_normalize
from embcompat.errors import EncoderError, InvalidInput
from embcompat.index.faiss_index import IndexGenerations, SpaceSearcher
from embcompat.index.plans import PATHS, MixedIndex, Plan, search
from embcompat.index.store import SpaceStore

N = 400


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """An old space with every item, an empty new space, and each item's vectors."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(N, 24))
    old = l2_normalize((base[:, :16] + 0.3 * rng.normal(size=(N, 16))).astype(np.float32))
    new = l2_normalize(base.astype(np.float32))
    spaces = {}
    for name, vecs in (("old", old), ("new", new)):
        store = SpaceStore(tmp_path / name, vecs.shape[1])
        if name == "old":
            store.add(np.arange(N), vecs)
        gens = IndexGenerations(tmp_path / f"{name}-idx")
        gens.publish(store)
        spaces[name] = SpaceSearcher(store, gens)
    return {"old": old, "new": new, "mixed": MixedIndex(spaces["old"], spaces["new"])}


class CountingReadThrough:
    def __init__(self, space: SpaceStore, vectors: np.ndarray, fail: bool = False) -> None:
        self.space, self.vectors, self.fail, self.asked = space, vectors, fail, []

    def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.fail:
            raise EncoderError("encoder timed out after 2.0s")
        self.asked.append(ids.copy())
        self.space.add_missing(ids, self.vectors[ids])
        return ids, self.vectors[ids]


def test_items_moving_mid_search_are_never_returned_twice(world: dict) -> None:
    mixed, new = world["mixed"], world["new"]
    plan = Plan("dual", "rrf")
    stop, dupes = threading.Event(), []

    def mover() -> None:  # backfill: items gain new vectors and keep their old ones
        for part in np.array_split(np.arange(N), 40):
            mixed.new.store.add(part, new[part])
        stop.set()

    thread = threading.Thread(target=mover)
    thread.start()
    while not stop.is_set():
        res = search(mixed, plan, world["new"][:30], world["old"][:30], k=20)
        for row in res.ids:
            live = row[row >= 0]
            if len(live) != len(set(live.tolist())):
                dupes.append(row)
    thread.join()
    assert not dupes


def test_bridge_plan_reports_paths(world: dict) -> None:
    mixed, new, old = world["mixed"], world["new"], world["old"]
    mixed.new.store.add(np.arange(200), new[:200])
    bridge = ProcrustesAdapter.fit(new, old)
    res = search(mixed, Plan("bridge", "rrf", bridge=bridge), new[:10], None, k=10)
    names = {PATHS[c] for c in res.paths.ravel()}
    assert names == {"new", "bridge"}
    assert (res.ids[:, 0] == np.arange(10)).mean() >= 0.9  # items find themselves


def test_cascade_reads_through_once_and_backfill_skips_what_it_stored(world: dict) -> None:
    mixed, new, old = world["mixed"], world["new"], world["old"]
    rt = CountingReadThrough(mixed.new.store, new)
    plan = Plan("cascade", "rrf", cascade_k=20, encode_budget=5)
    res = search(mixed, plan, new[:8], old[:8], k=10, read_through=rt)
    assert (res.encodes <= 5).all() and res.encodes.sum() > 0
    assert res.on_the_fly.any() and not res.warnings
    stored = mixed.new.store.snapshot().ids
    assert len(stored) == len(np.unique(stored)) == len(np.unique(np.concatenate(rt.asked)))
    np.testing.assert_array_equal(mixed.new.store.get(stored)[0], new[stored])
    # the same queries again: what was stored is read from the store, not re-encoded
    asked_before = len(rt.asked)
    again = search(mixed, plan, new[:8], old[:8], k=10, read_through=rt)
    asked_again = np.concatenate(rt.asked[asked_before:] or [np.zeros(0, np.int64)])
    assert not set(asked_again.tolist()) & set(stored.tolist())
    assert not again.on_the_fly[np.isin(again.ids, stored)].any()
    # a backfill job adds only items not yet stored
    pending = np.setdiff1d(np.arange(N), mixed.new.store.snapshot().ids)
    added = mixed.new.store.add_missing(np.arange(N), new)
    np.testing.assert_array_equal(np.sort(added), pending)


def test_cascade_answers_from_the_old_space_when_the_encoder_fails(world: dict) -> None:
    mixed, new, old = world["mixed"], world["new"], world["old"]
    rt = CountingReadThrough(mixed.new.store, new, fail=True)
    res = search(mixed, Plan("cascade", "learned", cascade_k=20), new[:5], old[:5], 10, rt)
    assert res.warnings and "timed out" in res.warnings[0]
    assert (res.ids >= 0).all() and res.encodes.sum() == 0
    expected = np.argsort(-(old[:5] @ old.T), axis=1)[:, :10]
    np.testing.assert_array_equal(res.ids, expected)


def test_plans_refuse_missing_parts(world: dict) -> None:
    with pytest.raises(InvalidInput, match="plan 'bridge' needs a query-side adapter"):
        Plan("bridge")
    with pytest.raises(InvalidInput, match="needs the query encoded by the old version"):
        search(world["mixed"], Plan("dual"), world["new"][:1], None)
    with pytest.raises(InvalidInput, match="unknown plan 'magic'"):
        Plan("magic")  # type: ignore[arg-type]


def test_a_crash_mid_read_through_leaves_the_store_consistent(world: dict) -> None:
    """The encoder stores what it encoded, then the query dies before using it: the
    stored vectors are whole and unique, and a later backfill adds only the rest."""
    mixed, new, old = world["mixed"], world["new"], world["old"]

    class CrashAfterWrite(CountingReadThrough):
        def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            super().encode(ids)
            raise RuntimeError("process killed mid-query")

    rt = CrashAfterWrite(mixed.new.store, new)
    res = search(
        mixed, Plan("cascade", "rrf", cascade_k=20, encode_budget=4), new[:6], old[:6], 10, rt
    )
    assert res.warnings and "killed mid-query" in res.warnings[0]
    stored = mixed.new.store.snapshot().ids
    assert len(stored) == len(np.unique(stored)) > 0
    np.testing.assert_array_equal(mixed.new.store.get(stored)[0], new[stored])
    added = mixed.new.store.add_missing(np.arange(N), new)
    assert len(added) == N - len(stored) and not set(added.tolist()) & set(stored.tolist())
