"""Durable file writes and checksums: readers see the old file or the new, never a part."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` by temp file + fsync + rename in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array in `.npy` format, for `atomic_write`."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (files can exceed memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
