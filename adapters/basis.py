"""Basis transformation with extra dimensions (the BT² / OCA idea, for frozen models).

The new space (d_new) is zero-padded to D = max(d_new, d_old) and rotated by an
orthogonal Q (D, D) whose first d_old columns are the Procrustes map new→old and whose
other columns span the complement. Hence:
- new↔new inner products are preserved exactly (Q is orthogonal);
- the first d_old coordinates of a transformed new vector are its Procrustes bridge
  into the old space, so an old vector zero-padded to D scores against it as the bridge
  does: one index holds both versions, and no query-time adapter is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from embcompat.adapters.base import Adapter, check_pairs
from embcompat.adapters.linear import ProcrustesAdapter
from embcompat.arrays import FloatArray, check_vectors
from embcompat.errors import InvalidInput


def zero_pad(x: FloatArray, dim: int) -> FloatArray:
    """x: (n, d) with d ≤ dim → (n, dim), zeros appended."""
    out = np.zeros((x.shape[0], dim), np.float32)
    out[:, : x.shape[1]] = x
    return out


class BasisAdapter(Adapter):
    kind = "basis"

    @classmethod
    def fit(cls, new: Any, old: Any, center: bool = True) -> BasisAdapter:
        """new: (n, d_new), old: (n, d_old) paired rows → orthogonal basis of R^D."""
        x, y = check_pairs(new, old, "basis")
        d_new, d_old = x.shape[1], y.shape[1]
        dim = max(d_new, d_old)
        head = ProcrustesAdapter.fit(zero_pad(x, dim), y, center=center).rotation  # (D, d_old)
        full, _ = np.linalg.qr(head.astype(np.float64), mode="complete")
        q = np.hstack([head.astype(np.float64), full[:, d_old:]])
        obj = cls(d_new, dim, "basis: new->compatible")
        obj.old_dim = d_old
        obj.basis = q.astype(np.float32)
        return obj

    @classmethod
    def identity(cls, d_new: int, d_old: int) -> BasisAdapter:
        """The basis of a new model trained compatible with extra dims (BT², OCA): its
        first d_old coordinates already are the old space, so no rotation is applied."""
        if d_new < d_old:
            raise InvalidInput(f"a compatible basis needs d_new >= d_old, got {d_new} < {d_old}")
        obj = cls(d_new, d_new, "basis: new->compatible")
        obj.old_dim = d_old
        obj.basis = np.eye(d_new, dtype=np.float32)
        return obj

    def _apply(self, x: FloatArray) -> FloatArray:
        return zero_pad(x, self.target_dim) @ self.basis

    @property
    def head(self) -> FloatArray:
        """(d_new, d_old): the query-side map that scores new queries against old vectors."""
        return self.basis[: self.source_dim, : self.old_dim]

    def pad_old(self, old: Any) -> FloatArray:
        """old: (n, d_old) → (n, D): old vectors join the unified index as they are."""
        return zero_pad(check_vectors(old, self.old_dim, "basis old side"), self.target_dim)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"basis": self.basis}

    def config(self) -> dict[str, Any]:
        return {"old_dim": self.old_dim}

    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        self.old_dim = int(config["old_dim"])
        self.basis = arrays["basis"].astype(np.float32)
