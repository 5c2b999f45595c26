"""The files of one shard of a vector space, written atomically with their sha256 and
verified when first read.

A shard is three `.npy` files: `<name>.npy` vectors (n, dim) float32, `<name>.ids.npy`
item ids (n,) int64, and `<name>.src.npy` (n,) uint64: for each vector, a fingerprint of
the content it was computed from (0 when unknown), so a vector computed from an item's
old text is never taken for one of its new text. Spaces written before fingerprints and
checksums existed (their files unlisted in the manifest) read with fingerprints 0 and a
finiteness check instead of a checksum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.arrays import FloatArray, IdArray
from embcompat.errors import CorruptArtifact
from embcompat.files import atomic_write_npy, sha256_file

SourceArray = npt.NDArray[np.uint64]
SUFFIXES = (".npy", ".ids.npy", ".src.npy")


@dataclass(frozen=True)
class Shard:
    ids: IdArray
    vectors: np.memmap[Any, Any] | FloatArray
    sources: SourceArray


def shard_files(name: str) -> list[str]:
    return [f"{name}{suffix}" for suffix in SUFFIXES]


def write_shard(
    root: Path, name: str, ids: IdArray, vectors: FloatArray, sources: SourceArray
) -> dict[str, str]:
    """Write the shard's files; returns {file name: sha256} for the manifest."""
    checksums = {}
    arrays: tuple[np.ndarray, ...] = (
        np.ascontiguousarray(vectors, np.float32),
        np.ascontiguousarray(ids, np.int64),
        np.ascontiguousarray(sources, np.uint64),
    )
    for suffix, arr in zip(SUFFIXES, arrays, strict=True):
        checksums[f"{name}{suffix}"] = atomic_write_npy(root / f"{name}{suffix}", arr)
    return checksums


def read_shard(
    root: Path,
    name: str,
    dim: int,
    checksums: dict[str, str] | None,
    verify: bool,
    where: Mapping[str, str],
) -> Shard:
    """Load one shard (vectors memory-mapped). `verify`: check every file against its
    checksum first (the caller does it once per shard: shards never change). `where`
    names the space in errors ({"gallery": ..., "space": ...}), never a server path."""
    what = ", ".join(f"{k} {v!r}" for k, v in where.items())

    def corrupt(problem: str) -> CorruptArtifact:
        return CorruptArtifact(
            f"{what}: shard {name} {problem}",
            hint="run `embcompat gallery repair` to rebuild the space",
            **where,
        )

    try:
        listed = [f for f in shard_files(name) if checksums and f in checksums]
        for file in listed if verify else []:
            if checksums is not None and checksums[file] != sha256_file(root / file):
                raise corrupt("fails its checksum")
        ids = np.load(root / f"{name}.ids.npy")
        vectors = np.load(root / f"{name}.npy", mmap_mode="r")
        src_file = root / f"{name}.src.npy"
        sources = np.load(src_file) if src_file.exists() else np.zeros(len(ids), np.uint64)
    except (OSError, ValueError, EOFError) as exc:
        raise corrupt(f"is unreadable ({type(exc).__name__})") from exc
    if ids.ndim != 1 or vectors.shape != (len(ids), dim) or sources.shape != ids.shape:
        raise corrupt(f"holds {vectors.shape} vectors for {ids.shape} ids")
    if verify and not listed and not np.isfinite(vectors).all():  # written before checksums
        raise corrupt("holds NaN or Inf values")
    return Shard(ids, vectors, sources.astype(np.uint64, copy=False))
