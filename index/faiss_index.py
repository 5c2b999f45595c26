"""FAISS indexes over a space, published as numbered generations with an atomic switch.

`publish()` builds a new index from a store snapshot into `gen-N/` (index file, ids,
checksum) and then flips `CURRENT` by rename: searches keep using the generation they
loaded while the next one builds, and no index a reader holds is ever mutated (FAISS is
not thread-safe for add + search). A generation whose file fails its checksum or cannot
be read raises CorruptArtifact; `SpaceSearcher` then answers by exact search instead.

A search sees the generation plus the store's changes since it was built (rows added
after it are searched exactly, rows removed are filtered), so writes are visible at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import faiss
import numpy as np

from embcompat.adapters.binary import MIN_VECTORS, Binarizer
from embcompat.arrays import FloatArray, IdArray, check_vectors, member
from embcompat.errors import CorruptArtifact, InvalidInput
from embcompat.files import atomic_write, sha256_file
from embcompat.index.binary import (
    BinaryIndex,
    BinaryKind,
    BinaryRerankIndex,
    TwoStageSearcher,
    ensure_binarizer,
    load_binarizer,
    snapshot_codes,
)
from embcompat.index.ivfpq import MIN_VECTORS as MIN_PQ
from embcompat.index.ivfpq import PQRerankIndex, build_ivfpq
from embcompat.index.store import Snapshot, SpaceStore
from embcompat.kinds import FLOAT_INDEX_KINDS, IndexKind

IndexMetric = Literal["ip", "l2"]
# binary kinds: 1-bit ITQ codes in memory (faiss IndexBinaryFlat / IndexBinaryHNSW), the
# top 100 candidates re-ranked with the floats read from the store on disk (index.binary)


IVF_MIN = 256  # fewer vectors than this get a flat index: too few to train lists on
RETRY_S = 30.0  # a generation that failed to load is tried again after this long


def _gen_number(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("gen-"))
    except ValueError:
        return 0


def build_from_snapshot(snap: Snapshot, kind: IndexKind, metric: IndexMetric) -> faiss.Index:
    """A snapshot's FAISS index, its vectors added shard by shard straight from the
    memory-mapped files: no second copy of the space's floats (5 GB at 10M 128-d
    vectors). IVF trains its lists on at most the sample k-means would take itself."""
    index: faiss.Index
    if kind == "ivf" and len(snap) >= IVF_MIN:
        ivf = _ivf(snap.dim, len(snap), metric)
        cap = ivf.nlist * ivf.cp.max_points_per_centroid
        rows = np.arange(len(snap))
        if len(rows) > cap:
            rows = np.sort(np.random.default_rng(0).choice(len(rows), cap, replace=False))
        ivf.train(snap.rows(rows))
        index = ivf
    else:
        index = build_index(np.zeros((0, snap.dim), np.float32), snap.ids[:0], kind, metric)
    for k, shard in enumerate(snap.shards):
        ids = snap.ids[snap.starts[k] : snap.starts[k + 1]]
        index.add_with_ids(np.ascontiguousarray(shard, np.float32), ids)
    return index


def build_index(
    vectors: FloatArray, ids: IdArray, kind: IndexKind, metric: IndexMetric
) -> faiss.Index:
    """vectors: (n, d) float32, ids: (n,) int64 → a FAISS index returning those ids."""
    if kind not in FLOAT_INDEX_KINDS:
        raise InvalidInput(
            f"unknown float index kind {kind!r}", hint=f"one of {', '.join(FLOAT_INDEX_KINDS)}"
        )
    d = vectors.shape[1]
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "ivf" and len(x) >= IVF_MIN:
        index = _ivf(d, len(x), metric)
        index.train(x)
        index.add_with_ids(x, ids)
        return index
    base = (
        faiss.IndexHNSWFlat(d, 32, faiss_metric)
        if kind == "hnsw"
        else faiss.IndexFlat(d, faiss_metric)
    )
    if isinstance(base, faiss.IndexHNSWFlat):
        base.hnsw.efSearch = 128
    mapped = faiss.IndexIDMap2(base)
    mapped.add_with_ids(x, ids)
    return mapped


def _ivf(d: int, n: int, metric: IndexMetric) -> faiss.IndexIVFFlat:
    """An untrained IVF index sized for n vectors: about 4·sqrt(n) lists, 1/8 probed."""
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
    index = faiss.IndexIVFFlat(faiss.IndexFlat(d, faiss_metric), d, nlist, faiss_metric)
    index.nprobe = max(1, nlist // 8)
    return index


@dataclass(frozen=True)
class Generation:
    number: int
    index: faiss.Index | BinaryRerankIndex | PQRerankIndex | None  # None: an empty space
    ids: IdArray  # sorted ids the index holds
    store_seq: int


class IndexGenerations:
    """The published generations of one space's index under `root/`."""

    def __init__(
        self,
        root: Path,
        kind: IndexKind | str = IndexKind.FLAT,
        metric: IndexMetric = "ip",
        where: Mapping[str, str] | None = None,
    ) -> None:
        """`where` names the space in errors ({"gallery": "docs", "space": "v3"}), which
        never carry server paths."""
        self.root = Path(root)
        self.where = dict(where or {"space": self.root.name})
        self.label = ", ".join(f"{k} {v!r}" for k, v in self.where.items())
        try:
            self.kind = IndexKind(kind)
        except ValueError:
            raise InvalidInput(
                f"unknown index kind {kind!r}", hint=f"one of {', '.join(IndexKind)}"
            ) from None
        self.metric = metric
        self._loaded: Generation | None = None
        self._lock = threading.Lock()
        self.fitted_binarizer: Binarizer | None = None  # set by a publish that fitted one
        self._current: tuple[tuple[int, ...], int] | None = None
        self._failed: tuple[CorruptArtifact, float] | None = None

    def current_number(self) -> int | None:
        """The published number; CURRENT is re-read only when its inode or mtime changed
        (publish replaces it by rename), since every search asks."""
        try:
            st = os.stat(self.root / "CURRENT")
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)  # see SpaceStore
        if self._current is None or self._current[0] != key:
            try:
                number = int((self.root / "CURRENT").read_text().strip())
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise CorruptArtifact(
                    f"{self.label}: the pointer to its current index generation is damaged",
                    hint="run `embcompat gallery repair` to publish a fresh generation",
                    **self.where,
                ) from exc
            if number < 1:
                raise CorruptArtifact(
                    f"{self.label}: its current generation {number} is invalid", **self.where
                )
            self._current = (key, number)
        return self._current[1]

    def publish(self, store: SpaceStore, keep: int = 2) -> int:
        """Build from the store's snapshot and switch readers to it; returns its number.
        Publishers of one space take turns (a lock file): each builds in a folder of its
        own and the numbers never collide. A damaged CURRENT is replaced."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".publish.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._publish_locked(store, keep)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _publish_locked(self, store: SpaceStore, keep: int) -> int:
        snap = store.snapshot()
        try:
            current = self.current_number() or 0
        except CorruptArtifact:
            current = max((_gen_number(p) for p in self.root.glob("gen-*")), default=0)
        number = current + 1
        folder = self.root / f"gen-{number:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".gen-{number:06d}.", suffix=".tmp"))
        built, checksum = self.kind, None
        binary = self.kind.startswith("binary") and len(snap) >= MIN_VECTORS
        if binary:
            binarizer, fresh = ensure_binarizer(self.root, snap)
            self.fitted_binarizer = binarizer if fresh else None
            graph: BinaryKind = "hnsw" if self.kind == "binary-hnsw" else "flat"
            BinaryIndex.build(snapshot_codes(binarizer, snap), snap.ids, graph).save(tmp)
            checksum = sha256_file(tmp / "binary.faiss")
        elif len(snap):
            if self.kind.startswith("binary") or (
                self.kind == IndexKind.IVFPQ and len(snap) < MIN_PQ
            ):
                built = IndexKind.FLAT  # too few vectors to fit codes yet
            index: faiss.Index
            if built == IndexKind.IVFPQ:
                metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
                index = build_ivfpq(snap, metric)
            else:
                index = build_from_snapshot(snap, built, self.metric)  # type: ignore[arg-type]
            faiss.write_index(index, str(tmp / "index.faiss"))
            checksum = sha256_file(tmp / "index.faiss")
        np.save(tmp / "ids.npy", np.sort(snap.ids))
        meta = {
            "kind": built,
            "binary": binary,
            "metric": self.metric,
            "store_seq": snap.seq,
            "dim": snap.dim,
            "count": len(snap),
            "sha256": checksum,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        atomic_write(self.root / "CURRENT", str(number).encode())
        self._failed = self._current = None
        for old in sorted(self.root.glob("gen-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return number

    def load(self, store: SpaceStore | None = None) -> Generation | None:
        """The current generation, loaded once and shared (read-only) by searches; a
        binary generation re-ranks with the floats of `store`."""
        number = self.current_number()
        if number is None:
            return None
        with self._lock:
            if self._loaded and self._loaded.number == number:
                return self._loaded
            if self._failed is not None:
                failed, at = self._failed
                if failed.context.get("generation") == number and time.monotonic() - at < RETRY_S:
                    raise failed  # a damaged file is not re-read on every query
            try:
                self._loaded = self._load(number, store)
            except CorruptArtifact as exc:
                exc.context["generation"] = number
                self._failed = (exc, time.monotonic())
                raise
            return self._loaded

    def _load(self, number: int, store: SpaceStore | None) -> Generation:
        folder = self.root / f"gen-{number:06d}"
        try:
            meta = json.loads((folder / "meta.json").read_text())
            ids = np.load(folder / "ids.npy")
            index: faiss.Index | BinaryRerankIndex | PQRerankIndex | None = None
            if meta.get("binary"):
                binarizer = load_binarizer(self.root)
                stages = TwoStageSearcher(
                    binarizer, BinaryIndex.load(folder), [store] if store else []
                )
                index = BinaryRerankIndex(stages)
            elif meta["count"]:
                if sha256_file(folder / "index.faiss") != meta["sha256"]:
                    raise CorruptArtifact(
                        f"{self.label}: index generation {number} fails its checksum",
                        **self.where,
                    )
                index = faiss.read_index(str(folder / "index.faiss"))
                if meta["kind"] == IndexKind.IVFPQ:
                    if store is None:
                        raise CorruptArtifact(f"{self.label}: an IVF-PQ generation needs its store")
                    index = PQRerankIndex(cast(faiss.IndexIVFPQ, index), store)
        except CorruptArtifact:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CorruptArtifact(
                f"{self.label}: index generation {number} is unreadable ({type(exc).__name__})"
            ) from exc
        return Generation(number, index, ids, int(meta["store_seq"]))


class SpaceSearcher:
    """Searches one space: its current index generation plus the store's changes since."""

    def __init__(
        self,
        store: SpaceStore,
        generations: IndexGenerations,
        on_fallback: Callable[[CorruptArtifact], None] | None = None,
    ) -> None:
        """`on_fallback(error)`: told of every search answered exactly from the store
        because the index generation is damaged."""
        self.store = store
        self.generations = generations
        self.on_fallback = on_fallback
        self.last_error: str | None = None
        self._delta: tuple[tuple[int, int], IdArray, FloatArray, IdArray] | None = None
        self._n_excluded: tuple[int, IdArray, int] | None = None

    def _plan(self, gen: Generation | None) -> tuple[IdArray, FloatArray, IdArray]:
        """(ids whose vector the generation lacks or holds an older copy of, their
        vectors, the sorted ids whose indexed vector is still current) for this
        snapshot. A row written after the generation was built is served from the
        store, never from the index: an updated item is found by its new vector."""
        snap = self.store.snapshot()
        key = (gen.number if gen else -1, snap.seq)
        if self._delta is None or self._delta[0] != key:
            gen_ids = gen.ids if gen else np.zeros(0, np.int64)
            built_at = gen.store_seq if gen else -1
            added = (snap.written > built_at) | ~np.isin(snap.ids, gen_ids)
            current = np.sort(snap.ids[~added])
            self._delta = (key, snap.ids[added], snap.rows(np.flatnonzero(added)), current)
        return self._delta[1:]

    def _excluded_in(self, gen: Generation, excluded: IdArray | None) -> int:
        """How many excluded ids the generation holds; kept while the same exclusion
        array (a store snapshot's ids, the same object until the store changes) repeats."""
        if excluded is None:
            return 0
        cached = self._n_excluded
        if cached is None or cached[0] != gen.number or cached[1] is not excluded:
            cached = self._n_excluded = (gen.number, excluded, int(member(excluded, gen.ids).sum()))
        return cached[2]

    def _search_generation(
        self,
        index: faiss.Index,
        q: FloatArray,
        k: int,
        removed: int,
        live: IdArray,
        excluded: IdArray | None,
        n_excluded: int,
        budget: float,
    ) -> tuple[FloatArray, IdArray]:
        """Over-fetch for the share of the index that is excluded and filter afterwards
        (graph and list searches visit that many candidates anyway); rows left short are
        searched again with the exclusion inside FAISS, which always fills k."""
        n = index.ntotal
        share = n_excluded / max(n, 1)
        fetch = min(n, int(np.ceil((k + removed) / max(1.0 - share, 0.05) * 1.3)) + 8)
        s, i = index.search(q, fetch, params=_budget_params(index, budget, fetch))
        if self.generations.metric == "l2":
            s = -s  # scores are "higher is better" everywhere
        s, i = _filtered(s, i, live, removed, excluded)
        short = (i >= 0).sum(1) < min(k, n - removed - n_excluded)
        if short.any() and excluded is not None:
            params = _params(index, excluded)
            s2, i2 = index.search(q[short], min(k + removed, n), params=params)
            if self.generations.metric == "l2":
                s2 = -s2
            s2, i2 = _filtered(s2, i2, live, removed, None)
            width = max(s.shape[1], s2.shape[1])
            s = np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, width - i.shape[1])), constant_values=-1)
            s[short, : s2.shape[1]], i[short, : i2.shape[1]] = s2, i2
            s[short, s2.shape[1] :], i[short, i2.shape[1] :] = -np.inf, -1
        return s, i

    def _generation(self) -> Generation | None:
        """The current generation, or None when it is damaged: the caller then answers
        exactly from the store, and `on_fallback` is told."""
        try:
            gen = self.generations.load(self.store)
            self.last_error = None
        except CorruptArtifact as exc:
            gen, self.last_error = None, exc.message
            if self.on_fallback is not None:
                self.on_fallback(exc)
        return gen

    def _search_allowed(
        self, q: FloatArray, k: int, exclude: IdArray | None, budget: float, allow: IdArray
    ) -> tuple[FloatArray, IdArray]:
        """Only `allow` ids: a set small next to the space is scanned exactly from the
        store (the truth, and cheaper than any index walk); a large one is handed to
        FAISS as its selector, rows written since the generation scanned beside it."""
        if exclude is not None and len(exclude):
            allow = allow[~member(exclude, allow)]  # O(allowed), not O(excluded)
        snap = self.store.snapshot()
        if len(allow) <= max(EXACT_SCAN, len(snap) // 50):
            rows, found = snap.positions(allow)
            scan_s, scan_i = self._scan(q, k, allow[found], snap.rows(rows[found]))
            return _topk([scan_s], [scan_i], len(q), k)
        gen = self._generation()
        added_ids, added_vecs, live = self._plan(gen)
        parts_s, parts_i = [], []
        if gen is not None and gen.index is not None:
            removed = max(len(gen.ids) - len(live), 0)
            if isinstance(gen.index, PQRerankIndex):
                s, i = gen.index.search_excluding(q, k, live, None, allow)
            elif isinstance(gen.index, BinaryRerankIndex):
                outside = np.setdiff1d(live, allow, assume_unique=True)
                s, i = gen.index.search_excluding(q, k, live, outside)
            else:
                n = gen.index.ntotal
                params = _params(gen.index, None, allow)
                s, i = gen.index.search(q, min(k + removed, n), params=params)
                if self.generations.metric == "l2":
                    s = -s
                s, i = _filtered(s, i, live, removed, None)
            parts_s.append(s)
            parts_i.append(i)
        keep = member(allow, added_ids)
        scan_s, scan_i = self._scan(q, k, added_ids[keep], added_vecs[keep])
        return _topk([*parts_s, scan_s], [*parts_i, scan_i], len(q), k)

    def _scan(
        self, q: FloatArray, k: int, ids: IdArray, vectors: FloatArray
    ) -> tuple[FloatArray, IdArray]:
        """Exact top k of `vectors` (rows of `ids`) for every query."""
        if len(ids) == 0:
            return np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64)
        scores = q @ vectors.T if self.generations.metric == "ip" else -_l2(q, vectors)
        if scores.shape[1] > k:  # partition first: a full sort is O(n log n) per query
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, ids = np.take_along_axis(scores, part, 1), ids[part]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), np.take_along_axis(
            np.broadcast_to(ids, scores.shape), top, 1
        )

    def search(
        self,
        queries: FloatArray,
        k: int,
        exclude: IdArray | None = None,
        budget: float = 1.0,
        allow: IdArray | None = None,
    ) -> tuple[FloatArray, IdArray]:
        """queries: (nq, d) → scores, ids: (nq, k), best first (L2: negated distances);
        missing slots get id -1 and score -inf. `exclude` (sorted): ids never returned (items
        served from another space); k stays full while enough other items exist.
        `budget` < 1: this space holds that share of a mixed gallery's live items, and a
        graph index explores that share of its usual breadth (efSearch), so the parts of a
        mixed search together cost about what one index of the whole gallery does.
        `allow` (sorted): only these ids may be returned (a filter's matches)."""
        q = check_vectors(queries, self.store.dim, f"search of space {self.store.root.name!r}")
        if allow is not None:
            return self._search_allowed(q, k, exclude, budget, allow)
        gen = self._generation()
        added_ids, added_vecs, live = self._plan(gen)
        excluded = exclude if exclude is not None and len(exclude) else None
        parts_s, parts_i = [], []
        if gen is not None and gen.index is not None:
            removed = max(len(gen.ids) - len(live), 0)
            # only excluded ids this index holds make it short (a filter spans all spaces)
            n_ex = self._excluded_in(gen, excluded)
            if isinstance(gen.index, BinaryRerankIndex | PQRerankIndex):
                s, i = gen.index.search_excluding(q, k, live, excluded)
            else:
                s, i = self._search_generation(
                    gen.index, q, k, removed, live, excluded, n_ex, budget
                )
            parts_s.append(s)
            parts_i.append(i)
        if excluded is not None and len(added_ids):
            keep = ~member(excluded, added_ids)
            added_ids, added_vecs = added_ids[keep], added_vecs[keep]
        scan_s, scan_i = self._scan(q, k, added_ids, added_vecs)
        return _topk([*parts_s, scan_s], [*parts_i, scan_i], len(q), k)


def _params(
    index: faiss.Index, exclude: IdArray | None, allow: IdArray | None = None
) -> faiss.SearchParameters | None:
    """Search parameters that skip `exclude` ids, or keep only `allow` ids, keeping the
    index's own settings."""
    selector: Any
    if allow is not None:
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allow, np.int64))
    elif exclude is None or len(exclude) == 0:
        return None
    else:
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, np.int64))
        selector = faiss.IDSelectorNot(batch)
        selector.keepalive = batch
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    # faiss' bundled type stubs lag its Python API (keyword arguments, HNSW parameters)
    params: Any
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)  # type: ignore[call-arg]
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)  # type: ignore[attr-defined]
    else:
        params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
    params.keepalive = selector  # the C++ object must outlive the search
    return params


MIN_EF = 32
EXACT_SCAN = 20_000  # allowed sets up to this size (or 2 % of a space) are scanned exactly


def _budget_params(index: faiss.Index, budget: float, fetch: int) -> faiss.SearchParameters | None:
    """HNSW search parameters with efSearch scaled by `budget` (never below MIN_EF or the
    number of results asked); None (the index's own settings) for other kinds."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if budget >= 1.0 or not isinstance(inner, faiss.IndexHNSW):
        return None
    params: Any = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # stub gap
    params.efSearch = max(MIN_EF, fetch, round(inner.hnsw.efSearch * budget))
    return params


def _filtered(
    s: FloatArray, i: IdArray, live: IdArray, removed: int, excluded: IdArray | None
) -> tuple[FloatArray, IdArray]:
    """Blank out ids no longer live and ids served from another space."""
    drop = np.zeros(i.shape, bool)
    if removed:
        drop |= ~member(live, i)
    if excluded is not None:
        drop |= member(excluded, i)
    drop |= i < 0
    s, i = s.copy(), i.copy()
    s[drop], i[drop] = -np.inf, -1
    return s, i


def _l2(q: FloatArray, x: FloatArray) -> FloatArray:
    return (q**2).sum(1)[:, None] - 2 * q @ x.T + (x**2).sum(1)[None, :]


def _topk(
    parts_s: list[FloatArray], parts_i: list[IdArray], nq: int, k: int
) -> tuple[FloatArray, IdArray]:
    if not parts_s:
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    s = np.concatenate(parts_s, axis=1)
    i = np.concatenate(parts_i, axis=1)
    s = np.where(i < 0, -np.inf, s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return s.astype(np.float32), i.astype(np.int64)
