"""Compatibility adapters between embedding versions: pure math on arrays and tensors.

Every adapter is fitted by `Kind.fit(source, target, direction=...)` (a new object),
applied by `transform(x)` (never aliasing its input) and round-trips through
`state_dict()` / `from_state_dict()`; `adapters.io` saves one to a folder.
"""

from adapters.base import Adapter, Direction, check_vectors
from adapters.basis import BasisAdapter
from adapters.linear import AffineAdapter, LowRankAdapter, ProcrustesAdapter
from adapters.mlp import ResidualMLPAdapter

KINDS: dict[str, type[Adapter]] = {
    "procrustes": ProcrustesAdapter,
    "affine": AffineAdapter,
    "lowrank": LowRankAdapter,
    "residual_mlp": ResidualMLPAdapter,
    "basis": BasisAdapter,
}


def adapter_class(kind: str) -> type[Adapter]:
    from embcompat.errors import InvalidInput

    if kind not in KINDS:
        raise InvalidInput(f"unknown adapter kind {kind!r}", hint=f"one of {', '.join(KINDS)}")
    return KINDS[kind]


__all__ = [
    "KINDS",
    "AffineAdapter",
    "Adapter",
    "BasisAdapter",
    "Direction",
    "LowRankAdapter",
    "ProcrustesAdapter",
    "ResidualMLPAdapter",
    "adapter_class",
    "check_vectors",
]
