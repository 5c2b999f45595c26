"""`auto`: fit candidate kinds, pick by a held-out retrieval metric (not by MSE).

The metric is the label-free proxy of DESIGN.md: on pairs held out from fitting, the new
model's own exact top-k neighbours are the truth, and each candidate is scored by how
many of them a search through it recovers. The winner is refitted on all pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embcompat.adapters.base import Adapter, Direction, check_pairs
from embcompat.adapters.linear import AffineAdapter, LowRankAdapter, ProcrustesAdapter
from embcompat.adapters.metrics import neighbour_recall, search
from embcompat.adapters.mlp import ResidualMLPAdapter
from embcompat.arrays import FloatArray

CANDIDATES: dict[str, type[Adapter]] = {
    "procrustes": ProcrustesAdapter,
    "affine": AffineAdapter,
    "lowrank": LowRankAdapter,
    "residual_mlp": ResidualMLPAdapter,
}


@dataclass
class Selection:
    adapter: Adapter
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.adapter.kind


def proxy_score(adapter: Adapter, source: FloatArray, target: FloatArray, k: int = 10) -> float:
    """Neighbour recall of searches through `adapter` on held-out pairs (source, target)."""
    if adapter.direction == "query: new->old":  # source = new
        truth = search(source, source, k)[1]
        found = search(adapter.transform(source), target, k)[1]
    else:  # gallery: old->new, source = old, target = new
        truth = search(target, target, k)[1]
        found = search(target, adapter.transform(source), k)[1]
    return neighbour_recall(found, truth, k)


def select_adapter(
    source: Any,
    target: Any,
    direction: Direction = "query: new->old",
    kinds: tuple[str, ...] = tuple(CANDIDATES),
    holdout: float = 0.2,
    k: int = 10,
    seed: int = 0,
    fit_kwargs: dict[str, dict[str, Any]] | None = None,
) -> Selection:
    """Fit each kind on (1 − holdout) of the pairs, score on the rest, refit the best."""
    x, y = check_pairs(source, target, "auto")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(k + 1, int(len(x) * holdout))
    val, train = order[:n_val], order[n_val:]
    kwargs = fit_kwargs or {}
    scores = {
        kind: proxy_score(
            CANDIDATES[kind].fit(x[train], y[train], direction, **kwargs.get(kind, {})),  # type: ignore[attr-defined]
            x[val],
            y[val],
            k,
        )
        for kind in kinds
    }
    best = max(scores, key=lambda kind: scores[kind])
    adapter = CANDIDATES[best].fit(x, y, direction, **kwargs.get(best, {}))  # type: ignore[attr-defined]
    return Selection(adapter, scores)
