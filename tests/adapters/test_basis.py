"""The basis adapter: orthogonal, head = Procrustes bridge, old vectors zero-padded."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.adapters import BasisAdapter, ProcrustesAdapter
from embcompat.arrays import l2_normalize


@pytest.fixture
def pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    new = l2_normalize(rng.normal(size=(400, 48)).astype(np.float32))
    mix = rng.normal(size=(48, 20))
    old = l2_normalize((new @ mix + 0.1 * rng.normal(size=(400, 20))).astype(np.float32))
    return new, old


def test_basis_preserves_new_new_inner_products(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    new, old = pairs
    basis = BasisAdapter.fit(new, old)
    z = basis.transform(new[:50])
    np.testing.assert_allclose(z @ z.T, new[:50] @ new[:50].T, atol=1e-5)
    q = basis.basis.astype(np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5)


def test_basis_head_is_the_procrustes_bridge(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    new, old = pairs
    basis = BasisAdapter.fit(new, old)
    proc = ProcrustesAdapter.fit(new, old)
    np.testing.assert_allclose(basis.transform(new)[:, :20], new @ proc.rotation, atol=1e-5)
    # an old vector zero-padded scores against a transformed new one as the bridge does
    padded = basis.pad_old(old[:10])
    np.testing.assert_allclose(
        basis.transform(new[:10]) @ padded.T, (new[:10] @ proc.rotation) @ old[:10].T, atol=1e-5
    )


def test_basis_handles_a_new_space_smaller_than_the_old() -> None:
    rng = np.random.default_rng(1)
    new, old = rng.normal(size=(300, 10)), rng.normal(size=(300, 16))
    basis = BasisAdapter.fit(new, old)
    assert basis.transform(new[:3]).shape == (3, 16)
    np.testing.assert_allclose(
        basis.transform(new[:20]) @ basis.transform(new[:20]).T, new[:20] @ new[:20].T, atol=1e-4
    )
