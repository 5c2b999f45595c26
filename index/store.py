"""Vector store: per gallery and space, float32 shards on disk keyed by int64 item ids.

A space is a folder of immutable shards (`shard-N.npy` vectors, `shard-N.ids.npy` ids)
and a `manifest.json` naming the live shards. A delete rewrites the shards it touches
without those rows (deletes are rare: an upgrade keeps old vectors until it finishes,
then retires the whole old space). Every write puts new
files in place with temp file + fsync + rename and commits by renaming a new manifest, so
a crash at any point leaves the previous manifest, and the state it names, readable.
Writers serialise on a lock file; readers never lock and see one manifest or the next.
"""

from __future__ import annotations

import fcntl
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.arrays import FloatArray, IdArray, check_vectors
from embcompat.errors import CorruptArtifact, DimensionMismatch, DuplicateItem, InvalidInput
from embcompat.files import atomic_write, npy_bytes

MANIFEST = "manifest.json"
MAX_SHARDS = 32


@dataclass(frozen=True)
class Snapshot:
    """One manifest's view of a space: live ids and their vectors (memory-mapped)."""

    seq: int
    dim: int
    ids: IdArray
    vectors: FloatArray
    order: IdArray  # argsort of ids, for lookups
    sorted_ids: IdArray  # ids[order]: what exclusions and membership tests take

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: IdArray) -> tuple[IdArray, npt.NDArray[np.bool_]]:
        """Rows of `ids` in this snapshot, and which were found."""
        if len(self.ids) == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        return self.order[pos], self.sorted_ids[pos] == ids


@dataclass(frozen=True)
class _Layout:
    """Where each live id sits on disk: shard number and row, shards memory-mapped."""

    dim: int
    ids: IdArray
    order: IdArray
    shard: IdArray
    row: IdArray
    shards: list[np.memmap[Any, Any]]


class SpaceStore:
    """The vectors of one space (a model version, or a mapped copy) of one gallery."""

    def __init__(self, root: Path, dim: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: tuple[tuple[int, int], Snapshot] | None = None
        self._layout_cache: tuple[tuple[int, int], _Layout] | None = None
        self._dim: int | None = None
        manifest = self._read_manifest()
        if manifest is None:
            if dim is None:
                raise InvalidInput(f"space {self.root.name!r} does not exist and has no dim")
            with self._locked():
                if self._read_manifest() is None:
                    self._commit({"seq": 0, "dim": dim, "shards": []})
        elif dim is not None and manifest["dim"] != dim:
            raise DimensionMismatch(
                f"space {self.root.name!r} holds dim {manifest['dim']}, not {dim}", field="dim"
            )

    @property
    def dim(self) -> int:
        """Fixed when the space is created, so read once (searches check it per query)."""
        if self._dim is None:
            self._dim = int(self._manifest()["dim"])
        return self._dim

    # -- reading ---------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / MANIFEST).read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CorruptArtifact(f"manifest of space {self.root} is unreadable: {exc}") from exc

    def _manifest(self) -> dict[str, Any]:
        manifest = self._read_manifest()
        if manifest is None:
            raise CorruptArtifact(f"space {self.root} lost its manifest")
        return manifest

    def _manifest_key(self) -> tuple[int, int]:
        """Identifies the committed manifest (a commit renames a new file into place)."""
        st = (self.root / MANIFEST).stat()
        return st.st_ino, st.st_mtime_ns

    def snapshot(self) -> Snapshot:
        """The live ids and vectors; cached until the manifest file changes."""
        key = self._manifest_key()
        if self._cache and self._cache[0] == key:
            return self._cache[1]
        m = self._manifest()
        ids_parts, vec_parts = [], []
        for shard in m["shards"]:
            ids_parts.append(np.load(self.root / f"{shard}.ids.npy"))
            vec_parts.append(np.load(self.root / f"{shard}.npy", mmap_mode="r"))
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        vecs = np.concatenate(vec_parts) if vec_parts else np.zeros((0, m["dim"]), np.float32)
        order = np.argsort(ids, kind="stable")
        snap = Snapshot(m["seq"], m["dim"], ids, np.ascontiguousarray(vecs), order, ids[order])
        self._cache = (key, snap)
        return snap

    def get(self, ids: IdArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """ids: (n,) → vectors (n, dim) (zeros where missing) and a found mask (n,)."""
        snap = self.snapshot()
        rows, found = snap.positions(np.asarray(ids, np.int64))
        out = np.zeros((len(rows), snap.dim), np.float32)
        out[found] = snap.vectors[rows[found]]
        return out, found

    def __len__(self) -> int:
        return len(self.snapshot())

    def read(self, ids: IdArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """As `get`, but reading only the asked rows from the memory-mapped shard files,
        never loading the space: the float re-ranking of a binary index keeps vectors on
        disk and touches a few hundred rows per query."""
        layout = self._layout()
        ids = np.asarray(ids, np.int64).ravel()
        out = np.zeros((len(ids), layout.dim), np.float32)
        found = np.zeros(len(ids), dtype=bool)
        if len(layout.ids) == 0 or len(ids) == 0:
            return out, found
        sorted_ids = layout.ids[layout.order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids
        rows = layout.order[pos]
        shard, local = layout.shard[rows], layout.row[rows]
        for k in np.unique(shard[found]):
            sel = found & (shard == k)
            order = np.argsort(local[sel])  # ascending rows: sequential page reads
            picked = np.flatnonzero(sel)[order]
            out[picked] = layout.shards[k][local[sel][order]]
        return out, found

    def _layout(self) -> _Layout:
        key = self._manifest_key()
        if self._layout_cache and self._layout_cache[0] == key:
            return self._layout_cache[1]
        m = self._manifest()
        ids = [np.load(self.root / f"{s}.ids.npy") for s in m["shards"]]
        shards = [np.load(self.root / f"{s}.npy", mmap_mode="r") for s in m["shards"]]
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        layout = _Layout(
            m["dim"],
            all_ids,
            np.argsort(all_ids, kind="stable"),
            np.concatenate([np.full(len(x), k) for k, x in enumerate(ids)]) if ids else all_ids,
            np.concatenate([np.arange(len(x)) for x in ids]) if ids else all_ids,
            shards,
        )
        self._layout_cache = (key, layout)
        return layout

    # -- writing ---------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.root / MANIFEST, json.dumps(manifest).encode())

    def add_missing(self, ids: Any, vectors: Any) -> IdArray:
        """Add only the ids not yet present, atomically: two writers racing on an item
        store it once. Returns the ids this call added."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vecs = check_vectors(vectors, self.dim, f"space {self.root.name!r}")
        with self._locked():
            fresh = ~np.isin(ids, self.snapshot().ids)
            if fresh.any():
                self._append_locked(ids[fresh], vecs[fresh], clash=None)
        return ids[fresh]

    def add(self, ids: Any, vectors: Any, *, replace: bool = False) -> int:
        """Append vectors for new ids; `replace=True` overwrites ids already present.

        Returns how many ids were written. Refuses duplicate ids within the batch, ids
        already live (unless replace), wrong dims and non-finite values."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vecs = check_vectors(vectors, self.dim, f"space {self.root.name!r}")
        if len(ids) != len(vecs):
            raise InvalidInput(f"{len(ids)} ids for {len(vecs)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise DuplicateItem(f"duplicate item ids in one batch for space {self.root.name!r}")
        if len(ids) == 0:
            return 0
        with self._locked():
            clash = np.isin(ids, self.snapshot().ids)
            if clash.any() and not replace:
                raise DuplicateItem(
                    f"space {self.root.name!r} already holds item id {int(ids[clash][0])} "
                    f"({int(clash.sum())} clashing)",
                    hint="use replace to overwrite",
                )
            self._append_locked(ids, vecs, clash=ids[clash] if clash.any() else None)
        return len(ids)

    def _append_locked(self, ids: IdArray, vecs: FloatArray, clash: IdArray | None) -> None:
        """Write one shard and commit it; `clash` ids are dropped from older shards."""
        m = self._manifest()
        seq = m["seq"] + 1
        shard = f"shard-{seq:08d}"
        atomic_write(self.root / f"{shard}.npy", npy_bytes(vecs))
        atomic_write(self.root / f"{shard}.ids.npy", npy_bytes(ids))
        m = {**m, "seq": seq, "shards": [*m["shards"], shard]}
        if clash is not None:
            m = self._without(m, clash, seq, keep=shard)
        if len(m["shards"]) > MAX_SHARDS:
            m = self._compacted(m, seq)
        self._commit(m)

    def delete(self, ids: Any) -> int:
        """Remove ids; returns how many were live."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        with self._locked():
            m = self._manifest()
            gone = ids[np.isin(ids, self.snapshot().ids)]
            if len(gone) == 0:
                return 0
            self._commit(self._without(m, gone, m["seq"] + 1))
        return len(gone)

    def _without(
        self, m: dict[str, Any], ids: IdArray, seq: int, keep: str | None = None
    ) -> dict[str, Any]:
        """The manifest with `ids` gone: shards holding them are rewritten without them
        (new files; the old ones stay until `garbage_collect`, for readers still on them)."""
        shards = []
        for shard in m["shards"]:
            if shard == keep:
                shards.append(shard)
                continue
            sids = np.load(self.root / f"{shard}.ids.npy")
            hit = np.isin(sids, ids)
            if not hit.any():
                shards.append(shard)
                continue
            if (~hit).any():
                name = f"{shard}.c{seq:08d}"
                vecs = np.load(self.root / f"{shard}.npy")[~hit]
                atomic_write(self.root / f"{name}.npy", npy_bytes(vecs))
                atomic_write(self.root / f"{name}.ids.npy", npy_bytes(sids[~hit]))
                shards.append(name)
        return {**m, "seq": seq, "shards": shards}

    def _compacted(self, m: dict[str, Any], seq: int) -> dict[str, Any]:
        """Many small writes (read-through backfill) make many shards: merge all but the
        first (usually the large ingest) into one."""
        first, rest = m["shards"][0], m["shards"][1:]
        name = f"shard-{seq:08d}.m"
        ids = np.concatenate([np.load(self.root / f"{s}.ids.npy") for s in rest])
        vecs = np.concatenate([np.load(self.root / f"{s}.npy") for s in rest])
        atomic_write(self.root / f"{name}.npy", npy_bytes(vecs))
        atomic_write(self.root / f"{name}.ids.npy", npy_bytes(ids))
        return {**m, "shards": [first, name]}

    def garbage_collect(self) -> int:
        """Remove shard files no manifest names (left by crashes or compaction)."""
        with self._locked():
            named = set(self._manifest()["shards"])
            removed = 0
            for f in self.root.glob("shard-*.npy"):
                base = f.name.removesuffix(".ids.npy").removesuffix(".npy")
                if base not in named:
                    f.unlink()
                    removed += 1
            for f in self.root.glob(".*.tmp"):
                f.unlink()
                removed += 1
        return removed


class OpenSpaces:
    """The open stores of one service context, so a space's snapshot cache (checked
    against the manifest on every read) is shared by every caller instead of reloaded
    per call."""

    def __init__(self) -> None:
        self._open: dict[Path, SpaceStore] = {}
        self._lock = threading.Lock()

    def open(self, root: Path, dim: int | None = None) -> SpaceStore:
        key = Path(root).resolve()
        with self._lock:
            store = self._open.get(key)
            if store is None or not (key / MANIFEST).exists():
                store = self._open[key] = SpaceStore(key, dim)
        if dim is not None and store.dim != dim:
            raise DimensionMismatch(
                f"space {key.name!r} holds dim {store.dim}, not {dim}", field="dim"
            )
        return store
