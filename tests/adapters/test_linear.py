"""Procrustes, affine and low-rank: known answers and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embcompat.adapters import AffineAdapter, LowRankAdapter, ProcrustesAdapter
from embcompat.errors import DimensionMismatch, InsufficientPairs, InvalidVectors


def _rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_procrustes_recovers_a_known_rotation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32)).astype(np.float32)
    r = _rotation(32, rng)
    adapter = ProcrustesAdapter.fit(x, x @ r, center=False, normalize_output=False)
    assert np.abs(adapter.rotation - r).max() < 1e-4
    np.testing.assert_allclose(adapter.rotation.T @ adapter.rotation, np.eye(32), atol=1e-5)


@pytest.mark.parametrize(("d_s", "d_t"), [(64, 24), (24, 64)])
def test_procrustes_is_semi_orthogonal_across_dims(d_s: int, d_t: int) -> None:
    rng = np.random.default_rng(1)
    w = ProcrustesAdapter.fit(rng.normal(size=(300, d_s)), rng.normal(size=(300, d_t))).rotation
    small = min(d_s, d_t)
    gram = w.T @ w if d_s >= d_t else w @ w.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)


def test_affine_recovers_a_linear_map_with_bias() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    a, b = rng.normal(size=(16, 8)), rng.normal(size=8)
    adapter = AffineAdapter.fit(x, x @ a + b, alpha=1e-8, normalize_output=False)
    np.testing.assert_allclose(adapter.transform(x[:5]), x[:5] @ a + b, atol=1e-3)


def test_lowrank_keeps_the_top_directions() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 20)).astype(np.float32)
    a = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 12))  # a rank-3 map
    adapter = LowRankAdapter.fit(x, x @ a, rank=3, alpha=1e-8, normalize_output=False)
    assert np.linalg.matrix_rank(adapter.weight, tol=1e-3) == 3
    np.testing.assert_allclose(adapter.transform(x[:5]), x[:5] @ a, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_transform_is_batch_invariant_and_never_aliases(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    adapter = ProcrustesAdapter.fit(rng.normal(size=(64, 12)), rng.normal(size=(64, 6)))
    x = rng.normal(size=(n, 12)).astype(np.float32)
    before = x.copy()
    whole = adapter.transform(x)
    parts = np.concatenate([adapter.transform(x[i : i + 1]) for i in range(n)])
    np.testing.assert_allclose(whole, parts, atol=1e-6)
    np.testing.assert_array_equal(x, before)


def test_transform_refuses_wrong_dim_and_non_finite() -> None:
    rng = np.random.default_rng(4)
    adapter = ProcrustesAdapter.fit(rng.normal(size=(64, 12)), rng.normal(size=(64, 6)))
    with pytest.raises(DimensionMismatch, match="expects dim 12, got 7"):
        adapter.transform(np.zeros((2, 7)))
    bad = np.ones((3, 12))
    bad[1, 4] = np.nan
    bad[2, 0] = np.inf
    with pytest.raises(InvalidVectors, match="2 vector\\(s\\) containing NaN or Inf"):
        adapter.transform(bad)


def test_fit_refuses_tiny_or_unpaired_samples() -> None:
    with pytest.raises(InsufficientPairs, match="at least 16 pairs, got 3"):
        ProcrustesAdapter.fit(np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(InvalidVectors, match="paired rows: 20 source vs 19 target"):
        AffineAdapter.fit(np.ones((20, 4)), np.ones((19, 4)))
