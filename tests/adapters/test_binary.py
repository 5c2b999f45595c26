"""Binarizers: deterministic codes, exact round-trips, refusals, and codes that rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embcompat.adapters import ProcrustesAdapter
from embcompat.adapters.binary import ITQBinarizer, RecurrentBinarizer, fit_binarizer, fit_shared
from embcompat.adapters.io import load_adapter, save_adapter
from embcompat.errors import DimensionMismatch, InsufficientPairs, InvalidInput


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.4 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def neighbour_recall(binarizer: object, q: np.ndarray, g: np.ndarray) -> float:
    """Share of the exact float top-10 that a Hamming ranking puts in its top-10."""
    true = np.argsort(-(q @ g.T), axis=1)[:, :10]
    cq, cg = binarizer.transform(q), binarizer.transform(g)  # type: ignore[attr-defined]
    got = np.argsort(-(cq @ cg.T), axis=1, kind="stable")[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, true, strict=True)]))


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    x = clustered(1200)
    return {
        "itq": ITQBinarizer.fit(x, 1.0),
        "itq2": ITQBinarizer.fit(x, 2.0),
        "recurrent": RecurrentBinarizer.fit(x, 2, hidden=32, epochs=3),
    }


@pytest.mark.parametrize("name", ["itq", "itq2", "recurrent"])
def test_codes_are_deterministic_and_round_trip(
    fitted: dict[str, object], name: str, tmp_path: Path
) -> None:
    b = fitted[name]
    x = clustered(50, seed=3)
    codes = b.codes(x)  # type: ignore[attr-defined]
    assert codes.dtype == np.uint8 and codes.shape == (50, b.bits // 8)  # type: ignore[attr-defined]
    assert np.array_equal(codes, b.codes(x))  # type: ignore[attr-defined]
    again = type(b).from_state_dict(b.state_dict())  # type: ignore[attr-defined]
    assert np.array_equal(again.codes(x), codes)
    loaded = load_adapter(save_adapter(b, tmp_path / name, "v2", "codes"))  # type: ignore[arg-type]
    assert isinstance(loaded, type(b))
    assert np.array_equal(loaded.codes(x), codes)  # type: ignore[attr-defined]


def test_codes_are_signs(fitted: dict[str, object]) -> None:
    out = fitted["recurrent"].transform(clustered(10, seed=4))  # type: ignore[attr-defined]
    assert out.shape == (10, 64) and set(np.unique(out)) <= {-1.0, 1.0}


def test_hamming_ranking_finds_float_neighbours(fitted: dict[str, object]) -> None:
    q, g = clustered(100, seed=5), clustered(1000, seed=6)
    chance = 10 / len(g)
    for name in ("itq", "itq2", "recurrent"):
        assert neighbour_recall(fitted[name], q, g) > 10 * chance, name
    # more bits keep more of the ranking
    assert neighbour_recall(fitted["itq2"], q, g) > neighbour_recall(fitted["itq"], q, g)


def test_recurrent_stages_code_the_residual() -> None:
    x = clustered(800, seed=7)
    errs = []
    for stages in (1, 2, 3):
        b = RecurrentBinarizer.fit(x, stages, hidden=16, epochs=1)
        errs.append(float(((b.reconstruct(x) - x) ** 2).sum(1).mean()))
    assert errs[0] > errs[1] > errs[2]


def test_itq_rotation_is_orthogonal() -> None:
    x = clustered(600, d=16)
    proj = ITQBinarizer.fit(x, 1.0).arrays()["projection"]
    assert np.allclose(proj.T @ proj, np.eye(16), atol=1e-4)


def test_wrong_dim_is_refused(fitted: dict[str, object]) -> None:
    for b in fitted.values():
        with pytest.raises(DimensionMismatch, match="expects dim 32, got 16"):
            b.codes(np.zeros((2, 16), np.float32))  # type: ignore[attr-defined]


def test_bad_fits_are_refused() -> None:
    x = clustered(200)
    with pytest.raises(InvalidInput, match="multiple of 8"):
        ITQBinarizer.fit(x, 0.3)
    with pytest.raises(InvalidInput, match="whole number of stages"):
        RecurrentBinarizer.fit(x, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InsufficientPairs, match="at least 64 vectors"):
        ITQBinarizer.fit(x[:10], 1.0)
    with pytest.raises(InvalidInput, match="unknown binarizer 'pq'"):
        fit_binarizer("pq", x, 1.0)
    with pytest.raises(InvalidInput, match="NaN"):
        ITQBinarizer.fit(np.full((100, 32), np.nan, np.float32), 1.0)


def test_shared_binarizer_codes_both_versions_comparably() -> None:
    """Old vectors mapped into the new space land near their new twins in Hamming space."""
    new = clustered(800, d=32, seed=8)
    rng = np.random.default_rng(9)
    rot, _ = np.linalg.qr(rng.standard_normal((32, 24)))
    old = (new @ rot + 0.05 * rng.standard_normal((800, 24))).astype(np.float32)
    mapper = ProcrustesAdapter.fit(old[:400], new[:400], direction="gallery: old->new")
    shared = fit_shared("itq", new[:400], old[:400], mapper, 1.0)
    c_new = shared.transform(new[400:])
    c_old = shared.transform(mapper.transform(old[400:]))
    agree = (c_new == c_old).mean(1)  # bits a new vector shares with its old twin
    other = (c_new == np.roll(c_old, 1, axis=0)).mean(1)
    assert agree.mean() > 0.85 and agree.mean() > other.mean() + 0.25
    with pytest.raises(InvalidInput, match="gallery-side adapter"):
        fit_shared("itq", new, old, ProcrustesAdapter.fit(new, old), 1.0)
