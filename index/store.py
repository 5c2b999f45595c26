"""Vector store: per gallery and space, float32 shards on disk keyed by int64 item ids.

A space is a folder of immutable shards (`index.shards`: vectors, ids and the content
fingerprint of each vector) and a `manifest.json` naming the live shards with the sha256
of each file; a shard is verified against it when this process first reads it. A delete
rewrites the shards it touches without those rows (deletes are rare: an upgrade keeps old
vectors until it finishes, then retires the whole old space). Every write puts new files
in place with temp file + fsync + rename and commits by renaming a new manifest, so
a crash at any point leaves the previous manifest, and the state it names, readable.
Writers serialise on a lock file; readers never lock and see one manifest or the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.arrays import FloatArray, IdArray, check_vectors
from embcompat.errors import (
    CorruptArtifact,
    DimensionMismatch,
    DuplicateItem,
    InvalidInput,
    UnknownSpace,
)
from embcompat.files import atomic_write
from embcompat.index.shards import Shard, SourceArray, read_shard, shard_files, write_shard

MANIFEST = "manifest.json"
MAX_SHARDS = 32
GATHER_BLOCK = 65_536  # rows gathered (copied) at once by `Snapshot.map_rows`


@dataclass(frozen=True)
class Snapshot:
    """One manifest's view of a space: live ids and, on demand, their vectors.

    The vectors stay in their memory-mapped shard files: `rows()` reads only the rows
    asked (a search's few candidates, a map chunk), and `vectors` joins every shard in
    memory only for the callers that need all of them at once (building an index)."""

    seq: int
    dim: int
    ids: IdArray
    sources: SourceArray  # content fingerprint of each vector (0: unknown)
    written: IdArray  # the store seq at which each row's file was written
    order: IdArray  # argsort of ids, for lookups
    sorted_ids: IdArray  # ids[order]: what exclusions and membership tests take
    shards: tuple[np.memmap[Any, Any] | FloatArray, ...]  # vectors, in row order
    starts: IdArray  # (shards + 1,) first row of each shard, then the total
    room: _Room | None = field(default=None, compare=False, repr=False)  # for appends

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: IdArray) -> tuple[IdArray, npt.NDArray[np.bool_]]:
        """Rows of `ids` in this snapshot, and which were found."""
        if len(self.ids) == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        return self.order[pos], self.sorted_ids[pos] == ids

    def rows(self, rows: IdArray) -> FloatArray:
        """The vectors of `rows` (n,) → (n, dim), read shard by shard in ascending row
        order (sequential page reads from the memory-mapped files)."""
        out = np.empty((len(rows), self.dim), np.float32)
        for at, part in self._segments(rows):
            out[at] = part
        return out

    def map_rows(
        self, rows: IdArray, fn: Callable[[FloatArray], npt.NDArray[Any]], dtype: npt.DTypeLike
    ) -> npt.NDArray[Any]:
        """fn applied to the vectors of `rows`, one (n_i,)-valued call per stretch of a
        shard: (n,) results in `rows`' order. A run of consecutive rows (a map chunk's)
        reaches fn as a view of the memory-mapped shard, so the vectors are read once and
        never copied (a copy of 1M rows cost more than the map's own arithmetic)."""
        out = np.empty(len(rows), dtype)
        for at, part in self._segments(rows):
            out[at] = fn(part)
        return out

    def _segments(self, rows: IdArray) -> Iterator[tuple[slice | IdArray, FloatArray]]:
        """(where in `rows`, their vectors) per shard: a slice of the shard where the
        rows are consecutive (one view instead of a gather), else gathered copies of at
        most GATHER_BLOCK rows (bounded memory, however many rows a map batch holds)."""
        rows = np.asarray(rows, np.int64)
        order = None if (rows[1:] >= rows[:-1]).all() else np.argsort(rows, kind="stable")
        asc = rows if order is None else rows[order]
        cut = np.searchsorted(asc, self.starts)  # each shard's segment of `asc`
        for k in np.flatnonzero(np.diff(cut)):
            a, b = cut[k], cut[k + 1]
            r = asc[a:b] - self.starts[k]
            shard = self.shards[k]
            if (np.diff(r) == 1).all():
                yield (slice(a, b) if order is None else order[a:b]), shard[r[0] : r[-1] + 1]
                continue
            for c in range(a, b, GATHER_BLOCK):  # a copy per block, never the whole segment
                e = min(c + GATHER_BLOCK, b)
                yield (slice(c, e) if order is None else order[c:e]), shard[r[c - a : e - a]]

    @functools.cached_property
    def vectors(self) -> FloatArray:
        """Every vector in memory, (n, dim): for building an index or fitting codes."""
        if not self.shards:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(self.shards), np.float32)

    def extended(self, seq: int, shard: Shard) -> Snapshot:
        """This snapshot plus one appended shard of new ids, without re-reading and
        re-sorting every shard (ingest and map steps append often). Ids above every held
        one (the usual case: item ids grow) are written into spare room after this
        snapshot's arrays, O(batch) and not O(N) per append; others are inserted."""
        n, k = len(self.ids), len(shard.ids)
        new_order = np.argsort(shard.ids, kind="stable")
        new_sorted, new_rows = shard.ids[new_order], new_order + n
        new_written = np.full(k, seq, np.int64)
        starts = np.append(self.starts, n + k)
        if n and k and new_sorted[0] <= self.sorted_ids[-1]:
            at = np.searchsorted(self.sorted_ids, new_sorted)
            return Snapshot(
                seq, self.dim, np.concatenate([self.ids, shard.ids]),
                np.concatenate([self.sources, shard.sources]),
                np.concatenate([self.written, new_written]),
                np.insert(self.order, at, new_rows), np.insert(self.sorted_ids, at, new_sorted),
                (*self.shards, shard.vectors), starts,
            )  # fmt: skip
        room = self.room
        if room is None or not room.fits(n, k):
            room = _Room.around(
                (self.ids, self.sources, self.written, self.order, self.sorted_ids), n + k
            )
        ids, sources, written, order, sorted_ids = room.append(
            n, (shard.ids, shard.sources, new_written, new_rows, new_sorted)
        )
        return Snapshot(
            seq, self.dim, ids, sources, written, order, sorted_ids,
            (*self.shards, shard.vectors), starts, room,
        )  # fmt: skip


class _Room:
    """Arrays with spare capacity past the rows in use, shared by a line of snapshots each
    extending the last: every snapshot sees only a prefix, and only the one ending at
    `used` may write past it (an older one gets a fresh copy), so no reader's view ever
    changes. Doubling keeps the copies O(N) over a space's life; the spare room is
    never touched until used, so it costs address space, not memory."""

    def __init__(self, arrays: tuple[npt.NDArray[Any], ...], used: int) -> None:
        self.arrays, self.used = arrays, used

    def fits(self, n: int, k: int) -> bool:
        """Whether k rows may be written after the first n: n ends the rows in use (no
        newer snapshot of this line holds rows past it) and the capacity suffices."""
        return self.used == n and len(self.arrays[0]) >= n + k

    @classmethod
    def around(cls, arrays: tuple[npt.NDArray[Any], ...], need: int) -> _Room:
        """A room holding copies of `arrays` (all of one length) with space for `need`."""
        n, capacity = len(arrays[0]), 2 * need + 1024
        room = tuple(np.empty(capacity, a.dtype) for a in arrays)
        for buf, a in zip(room, arrays, strict=True):
            buf[:n] = a
        return cls(room, n)

    def append(self, n: int, parts: tuple[npt.NDArray[Any], ...]) -> tuple[npt.NDArray[Any], ...]:
        """Write `parts` after the first n rows (`fits` said so); read-only views of the
        n + k rows, since every snapshot of the line shares the buffers."""
        end = n + len(parts[0])
        views = []
        for buf, part in zip(self.arrays, parts, strict=True):
            buf[n:end] = part
            view = buf[:end]
            view.flags.writeable = False
            views.append(view)
        self.used = end
        return tuple(views)


class SpaceStore:
    """The vectors of one space (a model version, or a mapped copy) of one gallery."""

    max_shards = MAX_SHARDS  # past this many live shards, appends merge the newest

    def __init__(
        self, root: Path, dim: int | None = None, where: Mapping[str, str] | None = None
    ) -> None:
        """`where` names the space in errors ({"gallery": "docs", "space": "v3"}), which
        never carry server paths."""
        self.root = Path(root)
        self.where = dict(where or {"space": self.root.name})
        self.label = ", ".join(f"{k} {v!r}" for k, v in self.where.items())
        if dim is not None:  # opening an existing space never creates its folder
            self.root.mkdir(parents=True, exist_ok=True)
        self._cache: tuple[tuple[int, ...], Snapshot] | None = None
        self._dim: int | None = None
        # shards checked against their checksums, by name and checksums: a repaired
        # space reuses names for new files, which are checked again
        self._verified: set[tuple[str, ...]] = set()
        manifest = self._read_manifest()
        if manifest is None:
            if dim is None:
                raise UnknownSpace(f"{self.label} does not exist and has no dim")
            with self._locked():
                if self._read_manifest() is None:
                    self._commit({"seq": 0, "dim": dim, "shards": [], "sha256": {}})
        elif dim is not None and manifest["dim"] != dim:
            raise DimensionMismatch(
                f"{self.label} holds dim {manifest['dim']}, not {dim}", field="dim"
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
            manifest = json.loads((self.root / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise self._corrupt(f"its manifest is unreadable ({type(exc).__name__})") from exc
        if not (
            isinstance(manifest, dict)
            and isinstance(manifest.get("seq"), int)
            and isinstance(manifest.get("dim"), int)
            and isinstance(manifest.get("shards"), list)
        ):
            raise self._corrupt("its manifest is malformed")
        return manifest

    def _corrupt(self, what: str) -> CorruptArtifact:
        return CorruptArtifact(
            f"{self.label}: {what}",
            hint="run `embcompat gallery repair` to rebuild the space",
            **self.where,
        )

    def _manifest(self) -> dict[str, Any]:
        manifest = self._read_manifest()
        if manifest is None:
            raise self._corrupt("its manifest is missing")
        return manifest

    def _shard(self, m: dict[str, Any], name: str) -> Shard:
        """One shard of manifest `m`, verified against its checksums the first time."""
        verify = _identity(m, name) not in self._verified
        shard = read_shard(self.root, name, m["dim"], m.get("sha256"), verify, self.where)
        self._verified.add(_identity(m, name))
        return shard

    def intact_shards(self) -> list[Shard]:
        """The live shards that pass their checks now (what a repair keeps)."""
        m = self._manifest()
        out = []
        for name in m["shards"]:
            with contextlib.suppress(CorruptArtifact):
                out.append(read_shard(self.root, name, m["dim"], m.get("sha256"), True, self.where))
        return out

    def verify(self) -> int:
        """Check every live shard against its checksums now (not only on first read);
        returns how many vectors the space holds."""
        self._verified.clear()
        self._cache = None
        return len(self.snapshot())

    def _manifest_key(self) -> tuple[int, ...]:
        """Identifies the committed manifest (a commit renames a new file into place).
        File times tick by the kernel's coarse clock (milliseconds) and a freed inode
        number is soon reused, so two quick commits can look alike: commits of this
        store drop its caches themselves, and the size and ctime narrow the rest."""
        try:
            st = (self.root / MANIFEST).stat()
        except FileNotFoundError:  # the space was dropped (an upgrade's end) while open
            raise UnknownSpace(f"{self.label} is no longer on disk") from None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

    def snapshot(self) -> Snapshot:
        """The live ids (vectors read on demand); cached until the manifest changes."""
        key = self._manifest_key()
        if self._cache and self._cache[0] == key:
            return self._cache[1]
        m = self._manifest()
        shards = [self._shard(m, name) for name in m["shards"]]
        ids = np.concatenate([np.zeros(0, np.int64)] + [s.ids for s in shards])
        src = np.concatenate([np.zeros(0, np.uint64)] + [s.sources for s in shards])
        written = np.concatenate(
            [np.zeros(0, np.int64)]
            + [_row_written(m, n, len(s.ids)) for s, n in zip(shards, m["shards"], strict=True)]
        )
        order = np.argsort(ids, kind="stable")
        starts = np.cumsum([0] + [len(s.ids) for s in shards]).astype(np.int64)
        snap = Snapshot(
            m["seq"], m["dim"], ids, src, written, order, ids[order],
            tuple(s.vectors for s in shards), starts,
        )  # fmt: skip
        self._cache = (key, snap)
        return snap

    def sources(self, ids: IdArray) -> tuple[SourceArray, npt.NDArray[np.bool_]]:
        """ids: (n,) → the content fingerprint of each stored vector (0 where missing or
        unknown) and a found mask (n,)."""
        snap = self.snapshot()
        rows, found = snap.positions(np.asarray(ids, np.int64))
        out = np.zeros(len(rows), np.uint64)
        out[found] = snap.sources[rows[found]]
        return out, found

    def get(self, ids: IdArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        """ids: (n,) → vectors (n, dim) (zeros where missing) and a found mask (n,),
        reading only those rows from the memory-mapped shards (the float re-ranking of a
        binary or IVF-PQ index touches a few hundred rows per query and keeps the rest
        of the space on disk)."""
        snap = self.snapshot()
        rows, found = snap.positions(np.asarray(ids, np.int64).ravel())
        if found.all():
            return snap.rows(rows), found
        out = np.zeros((len(rows), snap.dim), np.float32)
        out[found] = snap.rows(rows[found])
        return out, found

    def __len__(self) -> int:
        return len(self.snapshot())

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
        self._cache = None

    def _checked(
        self, ids: Any, vectors: Any, sources: Any
    ) -> tuple[IdArray, FloatArray, SourceArray]:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        vecs = check_vectors(vectors, self.dim, self.label)
        src = (
            np.zeros(len(ids), np.uint64)
            if sources is None
            else np.asarray(sources, dtype=np.uint64).ravel()
        )
        if not len(ids) == len(vecs) == len(src):
            raise InvalidInput(f"{len(ids)} ids for {len(vecs)} vectors and {len(src)} sources")
        return ids, vecs, src

    def _held(self, ids: IdArray) -> npt.NDArray[np.bool_]:
        """Which of `ids` are live (a sorted lookup, not a pass over the space)."""
        return self.snapshot().positions(ids)[1]

    def add_missing(self, ids: Any, vectors: Any, sources: Any = None) -> IdArray:
        """Add only the ids not yet present, atomically: two writers racing on an item
        store it once. `sources`: (n,) content fingerprints. Returns the ids added."""
        ids, vecs, src = self._checked(ids, vectors, sources)
        with self._locked():
            fresh = ~self._held(ids)
            if not fresh.any():
                return ids[:0]
            if not fresh.all():  # the usual case, all fresh, copies no vectors
                ids, vecs, src = ids[fresh], vecs[fresh], src[fresh]
            self._append_locked(ids, vecs, src, clash=None)
        return ids

    def add(self, ids: Any, vectors: Any, sources: Any = None, *, replace: bool = False) -> int:
        """Append vectors for new ids; `replace=True` overwrites ids already present.
        `sources`: (n,) content fingerprints of the vectors (0: unknown).

        Returns how many ids were written. Refuses duplicate ids within the batch, ids
        already live (unless replace), wrong dims and non-finite values."""
        ids, vecs, src = self._checked(ids, vectors, sources)
        if len(np.unique(ids)) != len(ids):
            raise DuplicateItem(f"duplicate item ids in one batch for {self.label}")
        if len(ids) == 0:
            return 0
        with self._locked():
            clash = self._held(ids)
            if clash.any() and not replace:
                raise DuplicateItem(
                    f"{self.label} already holds item id {int(ids[clash][0])} "
                    f"({int(clash.sum())} clashing)",
                    hint="use replace to overwrite",
                )
            self._append_locked(ids, vecs, src, clash=ids[clash] if clash.any() else None)
        return len(ids)

    def _append_locked(
        self, ids: IdArray, vecs: FloatArray, src: SourceArray, clash: IdArray | None
    ) -> None:
        """Write one shard and commit it; `clash` ids are dropped from older shards.
        A plain append extends the cached snapshot instead of re-reading the space, so
        appending is O(batch) in reads and the manifest stays O(log N) shards long."""
        before = self.snapshot()
        m = self._manifest()
        seq = m["seq"] + 1
        shard = f"shard-{seq:08d}"
        sums = write_shard(self.root, shard, ids, vecs, src)
        m = {**m, "seq": seq, "shards": [*m["shards"], shard], "sha256": {**_sums(m), **sums}}
        self._verified.add(_identity(m, shard))  # written and checksummed just now
        if clash is not None:
            m = self._without(m, clash, seq, keep=shard)
        merged = self._compacted(m, seq)
        self._commit(merged)
        if clash is None and merged is m:
            try:  # committed: a snapshot that cannot grow is rebuilt on the next read
                self._cache = (self._manifest_key(), before.extended(seq, self._shard(m, shard)))
            except MemoryError:
                self._cache = None

    def delete(self, ids: Any) -> int:
        """Remove ids; returns how many were live."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        with self._locked():
            m = self._manifest()
            gone = ids[self._held(ids)]
            if len(gone) == 0:
                return 0
            self._commit(self._without(m, gone, m["seq"] + 1))
        return len(gone)

    def _without(
        self, m: dict[str, Any], ids: IdArray, seq: int, keep: str | None = None
    ) -> dict[str, Any]:
        """The manifest with `ids` gone: the shards holding them (found from the cached
        snapshot, not by reading every shard) are rewritten without them (new files; the
        old ones stay until `garbage_collect`, for readers still on them)."""
        snap = self.snapshot()
        rows, found = snap.positions(ids)
        hit_shards = set(np.searchsorted(snap.starts, rows[found], side="right") - 1)
        shards, sums, runs = [], _sums(m), dict(m.get("written") or {})
        for k, shard in enumerate(m["shards"]):
            if shard == keep or k not in hit_shards:
                shards.append(shard)
                continue
            old = self._shard(m, shard)
            hit = np.isin(old.ids, ids)
            if (~hit).any():
                name = f"{shard.split('.')[0]}.c{seq:08d}"  # one suffix, however often rewritten
                sums.update(
                    write_shard(
                        self.root, name, old.ids[~hit], old.vectors[~hit], old.sources[~hit]
                    )
                )
                runs[name] = _runs(_row_written(m, shard, len(old.ids))[~hit])
                shards.append(name)
        return {**m, "seq": seq, "shards": shards, "sha256": _live_sums(sums, shards),
                "written": _live_runs(runs, shards)}  # fmt: skip

    def _compacted(self, m: dict[str, Any], seq: int) -> dict[str, Any]:
        """Size-tiered merging, as in a log-structured store: past `max_shards`, the newest
        shards are merged, taking older ones in while the older one is no larger than
        what is merged so far. A row is rewritten only when its shard at least doubles,
        O(log N) times over a space's life, so many small appends (ingest batches, map
        chunks, read-through writes) cost O(N log N) in all instead of O(N^2)."""
        if len(m["shards"]) <= self.max_shards:
            return m
        sizes = [len(self._shard(m, s).ids) for s in m["shards"]]
        first = len(sizes) - 2
        while first > 0 and sizes[first - 1] <= sum(sizes[first:]):
            first -= 1
        merge = m["shards"][first:]
        name = f"shard-{seq:08d}.m"
        parts = [self._shard(m, s) for s in merge]
        written = np.concatenate(
            [_row_written(m, s, len(p.ids)) for s, p in zip(merge, parts, strict=True)]
        )
        sums = write_shard(
            self.root,
            name,
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.sources for p in parts]),
        )
        self._verified.add((name, *(sums.get(f, "") for f in shard_files(name))))
        shards = [*m["shards"][:first], name]
        runs = {**(m.get("written") or {}), name: _runs(written)}
        return {**m, "shards": shards, "sha256": _live_sums({**_sums(m), **sums}, shards),
                "written": _live_runs(runs, shards)}  # fmt: skip

    def garbage_collect(self) -> int:
        """Remove shard files no manifest names (left by crashes or compaction)."""
        with self._locked():
            named = set(self._manifest()["shards"])
            removed = 0
            for f in self.root.glob("shard-*.npy"):
                base = f.name.removesuffix(".ids.npy").removesuffix(".src.npy")
                base = base.removesuffix(".npy")
                if base not in named:
                    f.unlink()
                    removed += 1
            for f in self.root.glob(".*.tmp"):
                f.unlink()
                removed += 1
        return removed


def _identity(m: dict[str, Any], name: str) -> tuple[str, ...]:
    """A shard as its name and the checksums the manifest lists for its files."""
    sums = _sums(m)
    return (name, *(sums.get(f, "") for f in shard_files(name)))


def _written(shard: str) -> int:
    """The store seq at which a plain shard's rows were written: the first number in its
    name (`shard-00000012`; rewritten without deleted rows, `shard-00000012.c00000015`,
    its rows are the same vectors)."""
    return int(shard.removeprefix("shard-").split(".")[0])


def _row_written(m: dict[str, Any], shard: str, n: int) -> IdArray:
    """(n,) the store seq at which each row of `shard` was written: its name's for a
    plain shard, the runs the manifest records for one merged by compaction (its rows
    keep their own seqs, so a compaction does not make the index look outdated)."""
    runs = (m.get("written") or {}).get(shard)
    if runs is None:
        return np.full(n, _written(shard), np.int64)
    return np.repeat(np.array([r[0] for r in runs], np.int64), [r[1] for r in runs])


def _runs(written: IdArray) -> list[list[int]]:
    """Run-length form of per-row seqs: [[seq, count], ...]."""
    if len(written) == 0:
        return []
    cut = np.flatnonzero(np.diff(written)) + 1
    starts = np.concatenate([[0], cut])
    counts = np.diff(np.concatenate([starts, [len(written)]]))
    return [[int(written[a]), int(c)] for a, c in zip(starts, counts, strict=True)]


def _live_runs(runs: dict[str, Any], shards: list[str]) -> dict[str, Any]:
    return {name: r for name, r in runs.items() if name in shards}


def _sums(m: dict[str, Any]) -> dict[str, str]:
    """The manifest's checksums ({} for a space written before they existed)."""
    return dict(m.get("sha256") or {})


def _live_sums(sums: dict[str, str], shards: list[str]) -> dict[str, str]:
    """Checksums of the files of `shards` only; a pre-checksum shard stays unlisted."""
    files = {f for name in shards for f in shard_files(name)}
    return {f: h for f, h in sums.items() if f in files}


class OpenSpaces:
    """The open stores of one service context, so a space's snapshot cache (checked
    against the manifest on every read) is shared by every caller instead of reloaded
    per call."""

    def __init__(self) -> None:
        self._open: dict[Path, SpaceStore] = {}
        self._lock = threading.Lock()

    def open(
        self, root: Path, dim: int | None = None, where: Mapping[str, str] | None = None
    ) -> SpaceStore:
        key = Path(root).resolve()
        with self._lock:
            store = self._open.get(key)
            if store is None or not (key / MANIFEST).exists():
                store = self._open[key] = SpaceStore(key, dim, where)
        if dim is not None and store.dim != dim:
            raise DimensionMismatch(f"{store.label} holds dim {store.dim}, not {dim}", field="dim")
        return store

    def forget(self, root: Path) -> None:
        """Drop the open store of `root` (its folder was replaced, e.g. by a repair)."""
        with self._lock:
            self._open.pop(Path(root).resolve(), None)
