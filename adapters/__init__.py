"""Compatibility adapters between embedding versions: pure math on arrays and tensors.

Every adapter is fitted by `Kind.fit(source, target, direction=...)` (a new object),
applied by `transform(x)` (never aliasing its input) and round-trips through
`state_dict()` / `from_state_dict()`; `adapters.io` saves one to a folder. Binarizers
(`adapters.binary`) are adapters too, fitted on one space's vectors.
"""

from embcompat.adapters.base import Adapter, Direction
from embcompat.adapters.basis import BasisAdapter
from embcompat.adapters.binary import BINARIZERS, Binarizer, ITQBinarizer, RecurrentBinarizer
from embcompat.adapters.linear import AffineAdapter, LinearMap, LowRankAdapter, ProcrustesAdapter
from embcompat.adapters.mlp import ResidualMLPAdapter
from embcompat.arrays import check_vectors

KINDS: dict[str, type[Adapter]] = {
    "procrustes": ProcrustesAdapter,
    "affine": AffineAdapter,
    "lowrank": LowRankAdapter,
    "residual_mlp": ResidualMLPAdapter,
    "basis": BasisAdapter,
}


def adapter_class(kind: str) -> type[Adapter]:
    from embcompat.errors import InvalidInput

    known: dict[str, type[Adapter]] = {**KINDS, **BINARIZERS}
    if kind not in known:
        raise InvalidInput(f"unknown adapter kind {kind!r}", hint=f"one of {', '.join(known)}")
    return known[kind]


__all__ = [
    "BINARIZERS",
    "KINDS",
    "AffineAdapter",
    "Adapter",
    "BasisAdapter",
    "Binarizer",
    "Direction",
    "ITQBinarizer",
    "LinearMap",
    "LowRankAdapter",
    "ProcrustesAdapter",
    "RecurrentBinarizer",
    "ResidualMLPAdapter",
    "adapter_class",
    "check_vectors",
]
