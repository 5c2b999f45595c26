"""The vector store: round trips, refusals, races and crashes that lose nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from embcompat.errors import DimensionMismatch, DuplicateItem, InvalidVectors
from embcompat.index import store as store_module
from embcompat.index.shards import Shard
from embcompat.index.store import MAX_SHARDS, OpenSpaces, Snapshot, SpaceStore


def _vecs(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_add_get_replace_delete_round_trip(tmp_path: Path) -> None:
    store = SpaceStore(tmp_path / "s", 8)
    x = _vecs(10)
    assert store.add(np.arange(10), x) == 10
    got, found = store.get(np.array([3, 42, 7]))
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[[0, 2]], x[[3, 7]])
    y = _vecs(2, seed=1)
    store.add([3, 7], y, replace=True)
    np.testing.assert_array_equal(store.get(np.array([3, 7]))[0], y)
    assert len(store) == 10
    assert store.delete([3, 99]) == 1
    assert len(store) == 9 and not store.get(np.array([3]))[1][0]
    reopened = SpaceStore(tmp_path / "s")
    np.testing.assert_array_equal(reopened.get(np.array([7]))[0], y[1:])


def test_bad_writes_are_refused_and_change_nothing(tmp_path: Path) -> None:
    store = SpaceStore(tmp_path / "s", 8)
    store.add([1, 2], _vecs(2))
    before = store.snapshot()
    with pytest.raises(DuplicateItem, match="already holds item id 2"):
        store.add([2, 3], _vecs(2))
    with pytest.raises(DuplicateItem, match="duplicate item ids in one batch"):
        store.add([5, 5], _vecs(2))
    with pytest.raises(DimensionMismatch, match="expects dim 8, got 4"):
        store.add([6], _vecs(1, d=4))
    bad = _vecs(1)
    bad[0, 0] = np.nan
    with pytest.raises(InvalidVectors, match="NaN or Inf"):
        store.add([7], bad)
    after = store.snapshot()
    assert after.seq == before.seq
    np.testing.assert_array_equal(after.ids, before.ids)
    with pytest.raises(DimensionMismatch, match="holds dim 8, not 16"):
        SpaceStore(tmp_path / "s", 16)


def test_crash_between_shard_write_and_manifest_rename_keeps_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SpaceStore(tmp_path / "s", 8)
    x = _vecs(5)
    store.add(np.arange(5), x)
    real_replace = os.replace

    def crash_on_manifest(src: str, dst: str) -> None:
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated power loss before the manifest rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated power loss"):
        store.add(np.arange(5, 10), _vecs(5, seed=3))
    monkeypatch.setattr(os, "replace", real_replace)
    reopened = SpaceStore(tmp_path / "s")
    snap = reopened.snapshot()
    np.testing.assert_array_equal(np.sort(snap.ids), np.arange(5))
    np.testing.assert_array_equal(reopened.get(np.arange(5))[0], x)
    assert reopened.garbage_collect() >= 2  # the orphaned shard and ids files
    reopened.add(np.arange(5, 10), _vecs(5, seed=3))  # and the store goes on
    assert len(reopened) == 10


def test_racing_read_through_writers_store_each_item_once(tmp_path: Path) -> None:
    store = SpaceStore(tmp_path / "s", 8)
    x = _vecs(50)
    added: list[np.ndarray] = []

    def writer(seed: int) -> None:
        ids = np.random.default_rng(seed).permutation(50)[:30]
        for part in np.array_split(ids, 5):
            added.append(SpaceStore(tmp_path / "s").add_missing(part, x[part]))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_added = np.concatenate(added)
    assert len(all_added) == len(np.unique(all_added)), "an item was stored twice"
    snap = store.snapshot()
    assert len(snap.ids) == len(np.unique(snap.ids)) == len(all_added)
    np.testing.assert_array_equal(store.get(snap.ids)[0], x[snap.ids])


def test_many_small_writes_are_compacted(tmp_path: Path) -> None:
    store = SpaceStore(tmp_path / "s", 8)
    x = _vecs(3 * MAX_SHARDS)
    for i in range(3 * MAX_SHARDS):
        store.add([i], x[i : i + 1])
    assert len(store._manifest()["shards"]) <= MAX_SHARDS
    np.testing.assert_array_equal(store.get(np.arange(3 * MAX_SHARDS))[0], x)


def test_open_spaces_share_one_store_per_folder_and_check_its_dim(tmp_path: Path) -> None:
    spaces = OpenSpaces()
    store = spaces.open(tmp_path / "s", 8)
    store.add([1], _vecs(1))
    assert spaces.open(tmp_path / "s") is store
    assert spaces.open(tmp_path / "." / "s", 8) is store  # one store per resolved folder
    with pytest.raises(DimensionMismatch):
        spaces.open(tmp_path / "s", 4)
    assert OpenSpaces().open(tmp_path / "s") is not store  # another context, its own store


def test_appends_rewrite_each_row_a_logarithmic_number_of_times(tmp_path: Path) -> None:
    """Size-tiered compaction: 400 appends of 50 rows rewrite far less than the O(N^2)
    of merging everything past the limit, and the shard count stays bounded."""
    store = SpaceStore(tmp_path / "s", 4)
    x = _vecs(400 * 50, d=4)
    for b in range(400):
        store.add_missing(np.arange(b * 50, (b + 1) * 50), x[b * 50 : (b + 1) * 50])
    files = list((tmp_path / "s").glob("shard-*.m.npy"))
    rewritten = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
    assert rewritten <= 20_000 * 8  # log2(400) ~ 8.6 doublings at most per row
    assert len(store._manifest()["shards"]) <= MAX_SHARDS
    np.testing.assert_array_equal(store.get(np.arange(20_000))[0], x)


@pytest.mark.parametrize("gather", [3, 65_536])  # gathers split into blocks, and whole
def test_rows_and_map_rows_read_runs_gathers_and_any_order_across_shards(
    tmp_path: Path, gather: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "GATHER_BLOCK", gather)
    store = SpaceStore(tmp_path / "s", 4)
    x = _vecs(60, d=4)
    for a, b in ((0, 7), (7, 30), (30, 31), (31, 60)):
        store.add(np.arange(a, b), x[a:b])
    snap = store.snapshot()
    every = np.concatenate([np.asarray(s) for s in snap.shards])
    cases = [np.arange(60), np.arange(5, 40), np.arange(40)[::-1], np.array([3, 3, 4]),
             np.array([0, 2, 4]), np.array([30]), np.zeros(0, np.int64),
             np.random.default_rng(0).integers(0, 60, 100)]  # fmt: skip
    seen: list[np.ndarray] = []

    def first(part: np.ndarray) -> np.ndarray:
        seen.append(part)
        return np.asarray(part[:, 0])

    for rows in cases:
        np.testing.assert_array_equal(snap.rows(rows), every[rows])
        np.testing.assert_array_equal(snap.map_rows(rows, first, np.float32), every[rows, 0])
    # a run of consecutive rows reaches the function as a view of the shard, uncopied
    seen.clear()
    snap.map_rows(np.arange(7, 30), first, np.float32)
    assert len(seen) == 1 and isinstance(seen[0], np.memmap)
    seen.clear()
    snap.map_rows(np.array([1, 3, 5, 7, 9, 11, 13]), first, np.float32)
    assert max(len(p) for p in seen) <= gather  # a gather is copied a block at a time


def _frozen(snap: Snapshot) -> list[np.ndarray]:
    return [a.copy() for a in (snap.ids, snap.sources, snap.written, snap.order, snap.sorted_ids)]


class StoreMachine(RuleBasedStateMachine):
    """The snapshot a writer keeps up to date by extending it must equal what a fresh
    reader builds from the files, whatever mix of writes came before; and a snapshot a
    reader holds never changes, though later appends write into room past its arrays."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        self.store = SpaceStore(self.tmp / "s", 3)
        self.store.max_shards = 4  # compact often
        self.model: dict[int, np.ndarray] = {}
        self.held: list[tuple[Snapshot, list[np.ndarray]]] = []  # what readers hold

    ids = st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True)

    @rule(count=st.integers(1, 6), seed=st.integers(0, 9))
    def append_above(self, count: int, seed: int) -> None:
        """New ids above every held one, as ingest and map steps write them."""
        ids = list(range(max(self.model, default=0) + 1, max(self.model, default=0) + 1 + count))
        added = self.store.add_missing(ids, _vecs(count, d=3, seed=seed)).tolist()
        assert added == ids
        self.model.update(zip(ids, _vecs(count, d=3, seed=seed), strict=True))

    @rule(pick=st.integers(0, 9), count=st.integers(1, 4))
    def extend_an_older_snapshot(self, pick: int, count: int) -> None:
        """An older snapshot extended again (its room was used by a later one) gets a
        copy of its own: the result is right and nothing another reader holds moves."""
        if not self.held:
            return
        snap = self.held[pick % len(self.held)][0]
        top = int(snap.sorted_ids[-1]) if len(snap) else 0
        new = np.arange(top + 1, top + 1 + count, dtype=np.int64)
        shard = Shard(new, _vecs(count, d=3), np.zeros(count, np.uint64))
        out = snap.extended(snap.seq + 1, shard)
        np.testing.assert_array_equal(out.ids, np.concatenate([snap.ids, new]))
        np.testing.assert_array_equal(out.sorted_ids, np.concatenate([snap.sorted_ids, new]))
        np.testing.assert_array_equal(out.ids[out.order], out.sorted_ids)
        if out.ids.base is not None:  # written into a room the line of snapshots shares
            with pytest.raises(ValueError, match="read-only"):
                out.ids[:1] = -1

    @rule(ids=ids, seed=st.integers(0, 9), replace=st.booleans())
    def add(self, ids: list[int], seed: int, replace: bool) -> None:
        x = _vecs(len(ids), d=3, seed=seed)
        if not replace:
            added = self.store.add_missing(ids, x).tolist()
            assert set(added) == set(ids) - set(self.model)
            self.model.update({i: x[ids.index(i)] for i in added})
        else:
            self.store.add(ids, x, replace=True)
            self.model.update({i: x[n] for n, i in enumerate(ids)})

    @rule(ids=ids)
    def delete(self, ids: list[int]) -> None:
        gone = self.store.delete(ids)
        assert gone == len(set(ids) & set(self.model))
        for i in ids:
            self.model.pop(i, None)

    @invariant()
    def held_snapshots_never_change(self) -> None:
        for snap, arrays in self.held:
            for now, then in zip(_frozen(snap), arrays, strict=True):
                np.testing.assert_array_equal(now, then)
        snap = self.store.snapshot()
        self.held = [*self.held[-9:], (snap, _frozen(snap))]

    @invariant()
    def matches_a_fresh_reader(self) -> None:
        mine, fresh = self.store.snapshot(), SpaceStore(self.tmp / "s").snapshot()
        for snap in (mine, fresh):
            assert sorted(snap.ids.tolist()) == sorted(self.model)
            assert snap.sorted_ids.tolist() == sorted(self.model)
        np.testing.assert_array_equal(mine.ids, fresh.ids)
        np.testing.assert_array_equal(mine.written, fresh.written)
        np.testing.assert_array_equal(mine.vectors, fresh.vectors)
        want = np.array([self.model[i] for i in sorted(self.model)]).reshape(-1, 3)
        np.testing.assert_array_equal(self.store.get(np.array(sorted(self.model)))[0], want)

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("EMBCOMPAT_FUZZ_EXAMPLES", "30")),
    stateful_step_count=40,
    deadline=None,
)
test_store_snapshots_stay_true = StoreMachine.TestCase


def test_a_shard_rewritten_again_and_again_keeps_a_short_name(tmp_path: Path) -> None:
    store = SpaceStore(tmp_path / "s", 2)
    store.add(np.arange(100), _vecs(100, d=2))  # one shard
    for n in range(40):  # each delete rewrites it
        store.delete([n])
    (name,) = store._manifest()["shards"]
    assert len(name) <= len("shard-00000001.c00000041")
    store.add([50], _vecs(1, d=2, seed=9), replace=True)
    assert len(store) == 60
    assert store.garbage_collect() > 0  # the 40 files sets no manifest names any more
    assert {f.name for f in (tmp_path / "s").glob("shard-*")} == {
        f"{s}{x}" for s in store._manifest()["shards"] for x in (".npy", ".ids.npy", ".src.npy")
    }
