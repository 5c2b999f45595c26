"""Durable file writes and checksums: readers see the old file or the new, never a part."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from pathlib import Path

import numpy as np


def atomic_write(path: Path, *parts: bytes | memoryview) -> None:
    """Write the parts, in order, to `path` by temp file + fsync + rename in the same
    folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


HASH_BESIDE = 1 << 20  # bodies at least this large are hashed while they are written


def atomic_write_npy(path: Path, arr: np.ndarray) -> str:
    """Write `arr` as `.npy` (the bytes np.save writes) from the array's own buffer, with
    no copy of it in memory; returns the file's sha256, of the same buffer.

    A large body is hashed on a second thread while this one writes and fsyncs it (both
    release the GIL): a map step writes as many bytes as it computes, and hashing after
    the write would add its whole time to the step's."""
    arr = np.ascontiguousarray(arr)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    header = buf.getvalue()
    body = memoryview(arr.reshape(-1).view(np.uint8).data)
    digest = hashlib.sha256(header)
    if body.nbytes < HASH_BESIDE:
        atomic_write(path, header, body)
        digest.update(body)
        return digest.hexdigest()
    hashing = threading.Thread(target=digest.update, args=(body,), name="sha256")
    hashing.start()
    try:
        atomic_write(path, header, body)
    finally:
        hashing.join()
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (files can exceed memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
