"""The vector store: round trips, refusals, races and crashes that lose nothing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from embcompat.errors import DimensionMismatch, DuplicateItem, InvalidVectors
from embcompat.index.store import MAX_SHARDS, OpenSpaces, SpaceStore


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
