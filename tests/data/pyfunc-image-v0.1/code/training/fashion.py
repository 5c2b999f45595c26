"""Fashion-MNIST from Debian's `dataset-fashion-mnist` (idx files, gzip): no download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embcompat.errors import InvalidInput

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> npt.NDArray[np.uint8]:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    split: str, root: Path = FASHION_DIR
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """split 'train' (60k) or 'test' (10k) → images (n, 28, 28) uint8, labels (n,) 0-9."""
    if split not in SPLITS:
        raise InvalidInput(f"unknown Fashion-MNIST split {split!r}", hint="'train' or 'test'")
    prefix = root / SPLITS[split]
    try:
        images = _read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"))
        labels = _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    except FileNotFoundError as exc:
        raise InvalidInput(
            f"Fashion-MNIST is not installed under {root}",
            hint="apt-get install -y dataset-fashion-mnist (make install does)",
        ) from exc
    return images, labels


def to_tensor_batch(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """(n, 28, 28) uint8 → (n, 1, 28, 28) float32, standardised as at training."""
    x = np.asarray(images, np.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - 0.2860) / 0.3530
