"""Making scores of two spaces comparable, and fusing two rankings of the same items.

- `raw`: scores as they are (two spaces' cosines sit on different scales: the naive merge);
- `rrf`: reciprocal-rank fusion, 1 / (60 + rank), needs no fitting (the baseline);
- `calibrated`: per-path Platt scaling p = σ(a·s + b) of a score to the probability of
  being a true neighbour, fitted on labelled candidates (the paired sample's proxy truth,
  or a labelled probe);
- `learned` (cascade): w·z_new + (1 − w)·z_old on per-query standardised scores of the
  same candidates, w chosen on a labelled probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

from embcompat.errors import InvalidInput

FloatArray = npt.NDArray[np.float32]
RRF_K = 60.0


@dataclass(frozen=True)
class Platt:
    a: float = 1.0
    b: float = 0.0

    def __call__(self, scores: FloatArray) -> FloatArray:
        z = np.clip(self.a * np.asarray(scores, np.float64) + self.b, -50, 50)
        out = 1.0 / (1.0 + np.exp(-z))
        return np.where(np.isfinite(scores), out, -np.inf).astype(np.float32)

    @classmethod
    def fit(cls, scores: FloatArray, labels: npt.NDArray[np.bool_]) -> Platt:
        """Logistic regression of labels on one score (L-BFGS, tiny L2 on a)."""
        s = np.asarray(scores, np.float64).ravel()
        y = np.asarray(labels, np.float64).ravel()
        keep = np.isfinite(s)
        s, y = s[keep], y[keep]
        if len(s) < 10 or y.min() == y.max():
            raise InvalidInput("calibration needs at least 10 scores with both labels present")
        mu, sd = s.mean(), s.std() + 1e-9
        t = (s - mu) / sd

        def loss(p: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
            z = p[0] * t + p[1]
            prob = 1.0 / (1.0 + np.exp(-z))
            nll = np.logaddexp(0, z) - y * z
            grad = prob - y
            return float(nll.mean() + 1e-4 * p[0] ** 2), np.array(
                [(grad * t).mean() + 2e-4 * p[0], grad.mean()]
            )

        a, b = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B").x
        return cls(a=float(a / sd), b=float(b - a * mu / sd))


def rrf_scores(ranks: npt.NDArray[np.int64]) -> FloatArray:
    """ranks: 0-based (any shape); missing ranks (< 0) contribute nothing."""
    return np.where(ranks >= 0, 1.0 / (RRF_K + ranks + 1), 0.0).astype(np.float32)


def rrf_rows(scores: FloatArray) -> FloatArray:
    """RRF term of each column's rank within its row (unknown scores contribute 0)."""
    key = np.where(np.isfinite(scores), scores, -np.inf)
    ranks = np.argsort(np.argsort(-key, axis=1, kind="stable"), axis=1)
    return np.where(np.isfinite(scores), rrf_scores(ranks), 0.0).astype(np.float32)


def zscore_rows(scores: FloatArray) -> FloatArray:
    """Standardise each row over its finite entries (per-query, per-space)."""
    s = np.asarray(scores, np.float64)
    finite = np.isfinite(s)
    n = np.maximum(finite.sum(1, keepdims=True), 1)
    mu = np.where(finite, s, 0).sum(1, keepdims=True) / n
    var = np.where(finite, (s - mu) ** 2, 0).sum(1, keepdims=True) / n
    return np.where(finite, (s - mu) / np.sqrt(var + 1e-12), np.nan).astype(np.float32)


def fuse_z(z_old: FloatArray, z_new: FloatArray, weight: float) -> FloatArray:
    """w·z_new + (1 − w)·z_old; where one side is unknown the other stands alone."""
    both = np.isfinite(z_old) & np.isfinite(z_new)
    fused = np.where(both, weight * z_new + (1 - weight) * z_old, np.nan)
    fused = np.where(~both & np.isfinite(z_old), z_old, fused)
    fused = np.where(~both & np.isfinite(z_new), z_new, fused)
    return np.where(np.isfinite(fused), fused, -np.inf).astype(np.float32)


def fit_weight(objective: Callable[[float], float], grid: int = 21) -> float:
    """The weight in [0, 1] that maximises `objective` (a probe metric) on a grid."""
    weights = np.linspace(0.0, 1.0, grid)
    values = [objective(float(w)) for w in weights]
    return float(weights[int(np.argmax(values))])
