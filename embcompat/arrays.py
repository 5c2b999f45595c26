"""Array types and the checks every layer applies to vectors before using them."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.errors import DimensionMismatch, InvalidVectors

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def check_vectors(x: Any, dim: int, what: str) -> FloatArray:
    """x: (n, dim) or (dim,) finite numbers → (n, dim) float32 (a copy when converted)."""
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidVectors(f"{what} expects numbers: {exc}", field="vectors") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidVectors(f"{what} expects a 2-d array (n, {dim}), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise DimensionMismatch(f"{what} expects dim {dim}, got {arr.shape[1]}", field="dim")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr).all(axis=1)).sum())
        raise InvalidVectors(f"{what} got {bad} vector(s) containing NaN or Inf", field="vectors")
    return arr


def l2_normalize(x: FloatArray) -> FloatArray:
    """x: (n, d) → rows scaled to unit length (zero rows stay zero)."""
    return (x / row_norms(x)).astype(np.float32, copy=False)


def row_norms(x: FloatArray) -> FloatArray:
    """x: (n, d) → (n, 1) row lengths, at least 1e-12 (einsum: one pass, no squares
    array, several times faster than np.linalg.norm on a chunk of a gallery)."""
    return np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]


def member(sorted_ids: IdArray, ids: IdArray) -> BoolArray:
    """ids (any shape) → whether each is in `sorted_ids` (sorted, 1-d), by binary search."""
    if len(sorted_ids) == 0:
        return np.zeros(np.shape(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids
