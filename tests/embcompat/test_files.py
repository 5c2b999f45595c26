"""Durable writes: the checksum returned is the written file's, whether its body was
hashed beside the write (large) or after it (small), and a failed write leaves nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from embcompat import files
from embcompat.files import HASH_BESIDE, atomic_write_npy, sha256_file


@pytest.mark.parametrize("n", [0, 10, HASH_BESIDE // 4 + 1])
def test_atomic_write_npy_returns_the_sha256_of_the_file_it_wrote(tmp_path: Path, n: int) -> None:
    arr = np.arange(n, dtype=np.float32)
    digest = atomic_write_npy(tmp_path / "a.npy", arr)
    assert digest == sha256_file(tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_large_write_leaves_no_file_and_no_hashing_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_npy(tmp_path / "a.npy", np.zeros(HASH_BESIDE, np.uint8))
    assert list(tmp_path.iterdir()) == []
    assert not any(t.name == "sha256" for t in threading.enumerate())
