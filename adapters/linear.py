"""Linear bridges: orthogonal Procrustes, ridge affine, and reduced-rank (low-rank) affine.

Procrustes: with X, Y centred (n, d_s), (n, d_t) and M = Xᵀ Y = U S Vᵀ (thin SVD),
W = U Vᵀ maximises tr(Wᵀ M) over (semi-)orthogonal W; when d_s ≠ d_t this equals
zero-padding the smaller side. transform(x) = (x − μ_x) W + μ_y.

Affine: W = (Xcᵀ Xc + λ I)⁻¹ Xcᵀ Yc, b = μ_y − μ_x W, with λ = alpha · tr(Xcᵀ Xc) / d_s.
Low-rank: the affine W projected on the top-r right singular vectors V_r of the fitted
values Xc W (reduced-rank regression): W_r = (W V_r) V_rᵀ.
"""

from __future__ import annotations

import functools
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from embcompat.adapters.base import Adapter, Direction, check_pairs
from embcompat.arrays import FloatArray, row_norms


def _centers(x: FloatArray, y: FloatArray, center: bool) -> tuple[FloatArray, FloatArray]:
    if not center:
        return np.zeros(x.shape[1], np.float32), np.zeros(y.shape[1], np.float32)
    return x.mean(0).astype(np.float32), y.mean(0).astype(np.float32)


NORM_BLOCK = 2_048  # rows per block of output_norms: 1 MiB of z at 128-d, 6 MiB at 768


class LinearMap(Adapter):
    """y = (x − μ_x) · W + μ_y, optionally L2-normalised (cosine spaces).

    Being linear, it can be folded into the query instead of applied to a gallery:
    q · y = ((q Wᵀ) · x + q · c) / ‖x W + c‖ with c = μ_y − μ_x W, so a mapped gallery
    needs only one length per item (`output_norms`), never its mapped vectors."""

    weight: FloatArray
    mu_x: FloatArray
    mu_y: FloatArray
    normalize_output: bool

    def _apply(self, x: FloatArray) -> FloatArray:
        # (x − μx)·W + μy = x·W + c: one product, one in-place add, no copies
        out: FloatArray = x @ self.weight
        out += self.offset
        if self.normalize_output:
            out /= row_norms(out)
        return out

    @property
    def offset(self) -> FloatArray:
        """c = μ_y − μ_x W, the output of the zero vector."""
        return (self.mu_y - self.mu_x @ self.weight).astype(np.float32)

    def output_norms(self, x: FloatArray) -> FloatArray:
        """x: (n, source_dim) → (n,) lengths of x W + c before normalisation, without
        forming it. With z = x − μ_x: ‖z W + μ_y‖² = z (W Wᵀ) zᵀ + 2 z · (W μ_y) + ‖μ_y‖²,
        and W Wᵀ = I for a rotation into an equal or wider space (Procrustes), where this
        is one pass over z. Centred, not through c: in an anisotropic old space x W and c
        are long and nearly opposite, and float32 loses their difference (1e-4 relative
        error at a mean cosine of 0.999, where the product itself is within 2e-6).
        z is formed block by block in a buffer that stays in cache: x (often a view of a
        memory-mapped shard) is read once and never copied whole."""
        gram, shift = self._gram, 2 * (self.weight @ self.mu_y)
        const = float(self.mu_y @ self.mu_y)
        out = np.empty(len(x), np.float32)
        z = np.empty((min(NORM_BLOCK, len(x)), x.shape[1]), np.float32)
        zg = z if gram is None else np.empty((len(z), len(gram)), np.float32)
        for start in range(0, len(x), NORM_BLOCK):
            part = x[start : start + NORM_BLOCK]
            zb = np.subtract(part, self.mu_x, out=z[: len(part)])
            sq = zb @ shift
            sq += const
            t = zb if gram is None else np.matmul(zb, gram, out=zg[: len(part)])
            sq += np.einsum("ij,ij->i", t, zb)
            np.sqrt(np.maximum(sq, 1e-24, out=sq), out=out[start : start + len(part)])
        return out

    @functools.cached_property
    def _gram(self) -> FloatArray | None:
        """W Wᵀ, or None when it is the identity (orthonormal rows): then ‖z W‖ = ‖z‖."""
        gram = (self.weight @ self.weight.T).astype(np.float32)
        return None if np.abs(gram - np.eye(len(gram), dtype=np.float32)).max() < 1e-4 else gram

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {"weight": self.weight, "mu_x": self.mu_x, "mu_y": self.mu_y}

    def config(self) -> dict[str, Any]:
        return {"normalize_output": self.normalize_output}

    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        self.normalize_output = bool(config["normalize_output"])
        self.weight = arrays["weight"].astype(np.float32)
        self.mu_x = arrays["mu_x"].astype(np.float32)
        self.mu_y = arrays["mu_y"].astype(np.float32)

    def _set(self, w: npt.NDArray[Any], mu_x: FloatArray, mu_y: FloatArray, norm: bool) -> Self:
        self.weight = np.ascontiguousarray(w, dtype=np.float32)
        self.mu_x, self.mu_y, self.normalize_output = mu_x, mu_y, norm
        return self


class ProcrustesAdapter(LinearMap):
    kind = "procrustes"

    @classmethod
    def fit(
        cls,
        source: Any,
        target: Any,
        direction: Direction = "query: new->old",
        center: bool = True,
        normalize_output: bool = True,
    ) -> ProcrustesAdapter:
        """source: (n, d_s), target: (n, d_t) paired rows → a fitted adapter."""
        x, y = check_pairs(source, target, "procrustes")
        mu_x, mu_y = _centers(x, y, center)
        m = (x - mu_x).astype(np.float64).T @ (y - mu_y).astype(np.float64)
        u, _, vt = np.linalg.svd(m, full_matrices=False)
        obj = cls(x.shape[1], y.shape[1], direction)
        return obj._set(u @ vt, mu_x, mu_y, normalize_output)

    @property
    def rotation(self) -> FloatArray:
        """(d_s, d_t) with orthonormal columns (d_s ≥ d_t) or rows (d_s < d_t)."""
        return self.weight


def _ridge(x: FloatArray, y: FloatArray, alpha: float) -> npt.NDArray[np.float64]:
    xd = x.astype(np.float64)
    gram = xd.T @ xd
    lam = alpha * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xd.T @ y.astype(np.float64))


class AffineAdapter(LinearMap):
    kind = "affine"

    @classmethod
    def fit(
        cls,
        source: Any,
        target: Any,
        direction: Direction = "query: new->old",
        alpha: float = 1e-2,
        normalize_output: bool = True,
    ) -> AffineAdapter:
        x, y = check_pairs(source, target, "affine")
        mu_x, mu_y = _centers(x, y, True)
        w = _ridge(x - mu_x, y - mu_y, alpha)
        return cls(x.shape[1], y.shape[1], direction)._set(w, mu_x, mu_y, normalize_output)


class LowRankAdapter(LinearMap):
    kind = "lowrank"

    @classmethod
    def fit(
        cls,
        source: Any,
        target: Any,
        direction: Direction = "query: new->old",
        rank: int = 128,
        alpha: float = 1e-2,
        normalize_output: bool = True,
    ) -> LowRankAdapter:
        x, y = check_pairs(source, target, "lowrank")
        mu_x, mu_y = _centers(x, y, True)
        xc = x - mu_x
        w = _ridge(xc, y - mu_y, alpha)
        r = max(1, min(rank, *w.shape))
        xd = xc.astype(np.float64)
        # right singular vectors of the fitted values Xc·W = eigenvectors of Wᵀ(XcᵀXc)W
        _, vecs = np.linalg.eigh(w.T @ (xd.T @ xd) @ w)
        top = vecs[:, ::-1][:, :r]
        w_r = (w @ top) @ top.T
        obj = cls(x.shape[1], y.shape[1], direction)._set(w_r, mu_x, mu_y, normalize_output)
        obj.rank = r
        return obj

    def config(self) -> dict[str, Any]:
        return {**super().config(), "rank": self.rank}

    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        super()._load(config, arrays)
        self.rank = int(config["rank"])
