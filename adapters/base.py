"""The adapter contract and input validation shared by every kind.

An adapter maps vectors of a source space (n, d_source) into a target space
(n, d_target). `direction` records which side of the search it serves:
- `query: new->old`: new-model queries bridged into the old gallery's space;
- `gallery: old->new`: stored old vectors mapped into the new space;
- `basis: new->compatible`: the new space rotated so its head is compatible with old;
- `binary: vectors->codes`: a binarizer, vectors to ±1 codes (bits = target_dim).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal, Self

import numpy as np
import numpy.typing as npt

from embcompat.arrays import FloatArray, check_vectors
from embcompat.errors import InsufficientPairs, InvalidVectors

Direction = Literal[
    "query: new->old", "gallery: old->new", "basis: new->compatible", "binary: vectors->codes"
]
DIRECTIONS: tuple[Direction, ...] = (
    "query: new->old",
    "gallery: old->new",
    "basis: new->compatible",
    "binary: vectors->codes",
)
MIN_PAIRS = 16


def check_pairs(source: Any, target: Any, what: str) -> tuple[FloatArray, FloatArray]:
    src = np.asarray(source, dtype=np.float32)
    tgt = np.asarray(target, dtype=np.float32)
    if src.ndim != 2 or tgt.ndim != 2:
        raise InvalidVectors(f"{what} needs 2-d source and target, got {src.shape} and {tgt.shape}")
    if len(src) != len(tgt):
        raise InvalidVectors(f"{what} needs paired rows: {len(src)} source vs {len(tgt)} target")
    if len(src) < MIN_PAIRS:
        raise InsufficientPairs(
            f"{what} needs at least {MIN_PAIRS} pairs, got {len(src)}",
            hint="pair more items of the gallery with the new version",
        )
    return check_vectors(src, src.shape[1], what), check_vectors(tgt, tgt.shape[1], what)


class Adapter(ABC):
    kind: ClassVar[str]

    def __init__(self, source_dim: int, target_dim: int, direction: Direction) -> None:
        self.source_dim = source_dim
        self.target_dim = target_dim
        self.direction = direction

    @property
    def name(self) -> str:
        return f"{self.kind} ({self.direction})"

    def transform(self, x: Any) -> FloatArray:
        """x: (n, source_dim) → (n, target_dim) float32; refuses wrong dims and NaN/Inf."""
        return self._apply(check_vectors(x, self.source_dim, f"adapter {self.name}"))

    @abstractmethod
    def _apply(self, x: FloatArray) -> FloatArray: ...

    @abstractmethod
    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The learned weights, by name."""

    def config(self) -> dict[str, Any]:
        """Declared, JSON-serialisable hyper-parameters (beyond kind, dims, direction)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source_dim": self.source_dim,
            "target_dim": self.target_dim,
            "direction": self.direction,
            "config": self.config(),
            "arrays": {k: np.array(v, copy=True) for k, v in self.arrays().items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Self:
        if state.get("kind") != cls.kind:
            raise InvalidVectors(
                f"state is for adapter kind {state.get('kind')!r}, not {cls.kind!r}"
            )
        obj = cls.__new__(cls)
        Adapter.__init__(
            obj, int(state["source_dim"]), int(state["target_dim"]), state["direction"]
        )
        obj._load(state["config"], {k: np.asarray(v) for k, v in state["arrays"].items()})
        return obj

    @abstractmethod
    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None: ...
