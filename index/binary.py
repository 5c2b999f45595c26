"""Binary serving stage: Hamming candidates from a faiss binary index, float re-ranking.

Candidates can be re-scored from the codes alone (asymmetric: the float query against
the binary items, `Binarizer.asymmetric_scores`), which is how a multi-bit recurrent
code is read (its stages carry residuals of decreasing size, which plain Hamming weighs
equally). The in-memory part is the packed codes (bits / 8 bytes per item) in a faiss
`IndexBinaryFlat` (exact Hamming) or `IndexBinaryHNSW` (graph), plus the row→item-id
map. The float vectors stay in the gallery's vector store on disk: a search takes the
`rerank` best Hamming candidates and re-scores them exactly with the floats read from
the memory-mapped shards (`SpaceStore.read`), so quality comes back at the cost of a few
hundred row reads per query.

A mixed gallery mid-upgrade is one binary index holding codes of both versions (one
shared binarizer: see `adapters.binary.fit_shared`); re-ranking reads each item from the
first store that holds it (new space first, then the mapped copy of the old space).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from embcompat.adapters.binary import Binarizer, CodeArray
from embcompat.arrays import FloatArray, IdArray, member
from embcompat.errors import CorruptArtifact, DimensionMismatch, InvalidInput
from embcompat.files import atomic_write
from embcompat.index.store import Snapshot, SpaceStore

BinaryKind = Literal["flat", "hnsw"]
BINARY_KINDS: tuple[BinaryKind, ...] = ("flat", "hnsw")
HNSW_M = 32
RERANK_CHUNK = 128  # queries re-ranked together: (128, rerank, dim) floats at a time


class BinaryIndex:
    """Packed codes of one gallery (or of a mixed one) and the item ids of their rows."""

    def __init__(self, index: faiss.IndexBinary, ids: IdArray, kind: BinaryKind) -> None:
        self.index, self.ids, self.kind = index, ids, kind

    @classmethod
    def build(
        cls, codes: CodeArray, ids: IdArray, kind: BinaryKind = "flat", ef_search: int = 128
    ) -> BinaryIndex:
        """codes: (n, bytes) uint8 packed bits, ids: (n,) int64 → a searchable index."""
        if kind not in BINARY_KINDS:
            raise InvalidInput(
                f"unknown binary index kind {kind!r}", hint=f"one of {', '.join(BINARY_KINDS)}"
            )
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        ids = np.asarray(ids, np.int64)
        if codes.ndim != 2 or len(codes) != len(ids):
            raise InvalidInput(f"binary index needs (n, bytes) codes for n ids, got {codes.shape}")
        if len(np.unique(ids)) != len(ids):
            raise InvalidInput("binary index got an item id twice: code each item once")
        bits = codes.shape[1] * 8
        index: faiss.IndexBinary
        if kind == "hnsw":
            index = faiss.IndexBinaryHNSW(bits, HNSW_M)
            index.hnsw.efSearch = ef_search
        else:
            index = faiss.IndexBinaryFlat(bits)
        if len(codes):
            index.add(codes)
        return cls(index, ids, kind)

    @property
    def bits(self) -> int:
        return int(self.index.d)

    def memory_bytes(self) -> int:
        """Bytes the index holds in memory: its serialised form (codes and graph) + ids."""
        return int(faiss.serialize_index_binary(self.index).nbytes + self.ids.nbytes)

    def search(self, codes: CodeArray, k: int) -> tuple[npt.NDArray[np.int32], IdArray]:
        """codes: (nq, bytes) → Hamming distances and item ids (nq, k), nearest first;
        missing slots get id -1."""
        dist, rows = self.search_rows(codes, k)
        return dist, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)

    def search_rows(self, codes: CodeArray, k: int) -> tuple[npt.NDArray[np.int32], IdArray]:
        """As `search`, returning index rows (for `stored_codes`) instead of item ids."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] * 8 != self.bits:
            raise DimensionMismatch(
                f"binary index holds {self.bits}-bit codes, got codes of shape {codes.shape}",
                field="dim",
            )
        k = min(k, len(self.ids))
        if k == 0:
            return np.zeros((len(codes), 0), np.int32), np.zeros((len(codes), 0), np.int64)
        params = None
        if self.kind == "hnsw":  # the graph search keeps at least k candidates in play
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # stub gap
            params.efSearch = max(int(self.index.hnsw.efSearch), k)  # type: ignore[attr-defined]
        dist, rows = self.index.search(codes, k, params=params)
        return dist, rows

    def stored_codes(self) -> CodeArray:
        """(n, bytes) view of the codes inside the faiss index (no copy, no second set)."""
        flat: Any = self.index
        if self.kind == "hnsw":  # the graph keeps its codes in a flat storage index
            flat = faiss.downcast_IndexBinary(flat.storage)
        n, width = len(self.ids), self.bits // 8
        if n == 0:
            return np.zeros((0, width), np.uint8)
        return np.asarray(faiss.rev_swig_ptr(flat.xb.data(), n * width)).reshape(n, width)

    def save(self, folder: Path) -> None:
        """Write index + ids atomically; `load` checks the index against its checksum."""
        blob = faiss.serialize_index_binary(self.index).tobytes()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "binary.faiss", blob)
        atomic_write(folder / "binary.ids.npy", _npy(self.ids))
        meta = {"kind": self.kind, "sha256": hashlib.sha256(blob).hexdigest()}
        atomic_write(folder / "binary.json", json.dumps(meta).encode())

    @classmethod
    def load(cls, folder: Path) -> BinaryIndex:
        try:
            meta = json.loads((folder / "binary.json").read_text())
            blob = (folder / "binary.faiss").read_bytes()
            ids = np.load(folder / "binary.ids.npy")
        except (OSError, ValueError) as exc:
            raise CorruptArtifact(f"binary index in {folder} is unreadable: {exc}") from exc
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise CorruptArtifact(f"binary index in {folder} fails its checksum")
        index = faiss.deserialize_index_binary(np.frombuffer(blob, np.uint8))
        return cls(index, ids, meta["kind"])


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


class TwoStageSearcher:
    """Binary candidates, then exact float scores from the stores (rerank > 0)."""

    def __init__(
        self, binarizer: Binarizer, index: BinaryIndex, stores: Sequence[SpaceStore] = ()
    ) -> None:
        if index.bits != binarizer.bits:
            raise DimensionMismatch(
                f"binarizer emits {binarizer.bits} bits, the index holds {index.bits}-bit codes"
            )
        for store in stores:
            if store.dim != binarizer.source_dim:
                raise DimensionMismatch(
                    f"re-ranking store {store.root.name!r} holds dim {store.dim}, "
                    f"the binarizer codes dim {binarizer.source_dim}"
                )
        self.binarizer, self.index, self.stores = binarizer, index, list(stores)

    def search(
        self, queries: FloatArray, k: int, rerank: int = 100, code_rerank: int = 0
    ) -> tuple[FloatArray, IdArray]:
        """queries: (nq, d) float → scores, ids (nq, k), best first.

        Stage 1: Hamming candidates from the binary index. `code_rerank` > 0: the top
        `code_rerank` are re-scored asymmetrically from their codes (float query against
        binary items: no float vector read). `rerank` > 0: the top `rerank` are re-scored
        exactly with their float vectors from the stores. Scores are those of the last
        stage run (Hamming: −distance)."""
        q = np.asarray(queries, np.float32)
        codes = self.binarizer.codes(q)  # validates dim and finiteness
        depth = max(k, rerank if self.stores else 0, code_rerank)
        dist, rows = self.index.search_rows(codes, depth)
        scores = -dist.astype(np.float32)
        if code_rerank > 0 and rows.shape[1]:
            rows, scores = rows[:, :code_rerank], scores[:, :code_rerank]
            stored = self.index.stored_codes()[np.maximum(rows, 0)]
            scores = np.where(rows >= 0, self.binarizer.asymmetric_scores(q, stored), -np.inf)
            order = np.argsort(-scores, axis=1, kind="stable")
            rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
        ids = np.where(rows >= 0, self.index.ids[np.maximum(rows, 0)], -1)
        if rerank <= 0 or not self.stores:
            return scores[:, :k].astype(np.float32), ids[:, :k]
        return self._rerank(q, ids[:, :rerank], k)

    def _rerank(self, q: FloatArray, cand: IdArray, k: int) -> tuple[FloatArray, IdArray]:
        out_s = np.full((len(q), min(k, cand.shape[1])), -np.inf, np.float32)
        out_i = np.full(out_s.shape, -1, np.int64)
        for start in range(0, len(q), RERANK_CHUNK):  # bounded temporaries per chunk
            rows = slice(start, start + RERANK_CHUNK)
            c = cand[rows]
            unique, inverse = np.unique(c, return_inverse=True)  # each row read once
            vectors, found = self._read(unique)
            scores = np.matmul(vectors[inverse.reshape(c.shape)], q[rows, :, None])[..., 0]
            scores[~found[inverse.reshape(c.shape)] | (c < 0)] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            out_s[rows] = np.take_along_axis(scores, top, 1)
            out_i[rows] = np.where(np.isfinite(out_s[rows]), np.take_along_axis(c, top, 1), -1)
        return out_s, out_i

    def _read(self, ids: IdArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
        out = np.zeros((len(ids), self.binarizer.source_dim), np.float32)
        found = np.zeros(len(ids), dtype=bool)
        for store in self.stores:
            need = ~found & (ids >= 0)
            if not need.any():
                break
            vecs, hit = store.get(ids[need])
            rows = np.flatnonzero(need)[hit]
            out[rows], found[rows] = vecs[hit], True
        return out, found


BINARIZER = "binarizer"
FIT_SAMPLE = 20000
METRICS_SAMPLE = 20_000  # vectors `binarizer_metrics` ranks against each other
CODE_BLOCK = 65_536  # rows coded per call: float temporaries bounded, whatever a shard holds


class BinaryRerankIndex:
    """A published binary generation as SpaceSearcher uses it: Hamming candidates of the
    binary index, re-ranked exactly with the floats of the space's store (on disk)."""

    def __init__(self, searcher: TwoStageSearcher, rerank: int = 100) -> None:
        self.searcher, self.rerank = searcher, rerank

    @property
    def ntotal(self) -> int:
        return len(self.searcher.index.ids)

    def search_excluding(
        self, q: FloatArray, k: int, live: IdArray, excluded: IdArray | None
    ) -> tuple[FloatArray, IdArray]:
        """Top k of the live, not excluded items; the candidate depth doubles for rows
        left short until they fill or the whole index was re-ranked."""

        depth = max(self.rerank, k)
        rows = np.arange(len(q))
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        while len(rows):
            s, i = self.searcher.search(q[rows], depth, rerank=depth)
            bad = (i < 0) | ~member(live, i)
            if excluded is not None:
                bad |= member(excluded, i)
            s, i = np.where(bad, -np.inf, s), np.where(bad, -1, i)
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
            out_s[rows, : s.shape[1]], out_i[rows, : i.shape[1]] = s, i
            full = (i >= 0).sum(1) >= k
            if depth >= self.ntotal:
                break
            rows, depth = rows[~full], min(depth * 4, self.ntotal)
        return out_s, out_i


def ensure_binarizer(root: Path, snap: Snapshot, seed: int = 0) -> tuple[Binarizer, bool]:
    """The binarizer of a space's binary generations (root/binarizer), fitted once (ITQ,
    1 bit per dimension, on up to FIT_SAMPLE of the snapshot's vectors, read from its
    shards) and kept, so every later generation codes with the same bits. Returns it
    and whether it was fitted now."""
    from embcompat.adapters.binary import ITQBinarizer
    from embcompat.adapters.io import save_adapter

    if (root / BINARIZER).exists():
        return load_binarizer(root), False
    rng = np.random.default_rng(seed)
    sample = snap.rows(np.sort(rng.permutation(len(snap))[:FIT_SAMPLE]))
    binarizer = ITQBinarizer.fit(sample, 1.0, seed=seed)
    save_adapter(binarizer, root / BINARIZER, source=root.name, target="codes")
    return binarizer, True


def snapshot_codes(binarizer: Binarizer, snap: Snapshot) -> CodeArray:
    """Every vector's code in row order, CODE_BLOCK rows at a time from the memory-mapped
    shards: the space's floats are never joined in memory (5 GB at 10M 128-d vectors,
    for codes of 160 MB)."""
    parts = [
        binarizer.codes(np.asarray(shard[a : a + CODE_BLOCK], np.float32))
        for shard in snap.shards
        for a in range(0, len(shard), CODE_BLOCK)
    ]
    if not parts:
        return np.zeros((0, binarizer.bits // 8), np.uint8)
    return np.concatenate(parts)


def load_binarizer(root: Path) -> Binarizer:
    """The binarizer kept beside a space's binary generations."""
    from embcompat.adapters.io import load_adapter

    if not (root / BINARIZER).exists():
        raise CorruptArtifact(f"binary generations in {root} lost their binarizer")
    binarizer = load_adapter(root / BINARIZER)
    if not isinstance(binarizer, Binarizer):
        raise CorruptArtifact(f"{root / BINARIZER} holds a {binarizer.kind}, not a binarizer")
    return binarizer


def binarizer_metrics(binarizer: Binarizer, vectors: FloatArray, n: int = 1000) -> dict[str, float]:
    """Label-free: of each sampled vector's 10 nearest others by float inner product, the
    share Hamming ranking finds, and the share a float re-rank of its top 100 finds."""
    x = vectors[:METRICS_SAMPLE]
    q = x[:n]
    truth = np.argsort(-(q @ x.T), axis=1)[:, 1:11]
    cq, cx = binarizer.transform(q), binarizer.transform(x)
    ham = np.argsort(-(cq @ cx.T), axis=1, kind="stable")[:, :101]
    exact = np.take_along_axis(q @ x.T, ham, 1)
    reranked = np.take_along_axis(ham, np.argsort(-exact, axis=1), 1)

    def share(ranked: npt.NDArray[np.int64]) -> float:
        pairs = enumerate(zip(ranked, truth, strict=True))
        hits = [len(set(r[r != i][:10]) & set(t)) for i, (r, t) in pairs]
        return float(np.mean(hits)) / 10

    return {"nn_recall10_hamming": share(ham), "nn_recall10_rerank100": share(reranked)}
