"""Retrieval metrics on hand-built rankings, and the compatibility report."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.adapters.metrics import (
    compat_report,
    hits_at_k,
    mrr,
    ndcg_at_k,
    negative_flip_rate,
    neighbour_recall,
    recall_at_k,
    search,
)

RANKED = np.array([[3, 1, 2], [0, 2, 1], [2, 0, 1]])


def test_recall_ndcg_mrr_on_known_rankings() -> None:
    relevant = np.array([1, 0, 3])
    assert recall_at_k(RANKED, relevant, 1) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, relevant, 2) == pytest.approx(2 / 3)
    assert mrr(RANKED, relevant) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert ndcg_at_k(RANKED, relevant, 3) == pytest.approx((1 / np.log2(3) + 1 + 0) / 3)
    assert recall_at_k(RANKED, [{1, 2}, {5}, {0, 1}], 2) == pytest.approx((0.5 + 0 + 0.5) / 3)


def test_negative_flips_count_only_right_then_wrong() -> None:
    before = np.array([True, True, False, False])
    after = np.array([True, False, True, False])
    assert negative_flip_rate(before, after) == 0.25


def test_search_is_exact_and_neighbour_recall_matches_itself() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(100, 8)).astype(np.float32)
    q = rng.normal(size=(10, 8)).astype(np.float32)
    _, idx = search(q, g, 5)
    brute = np.argsort(-(q @ g.T), axis=1)[:, :5]
    np.testing.assert_array_equal(idx, brute)
    assert neighbour_recall(idx, brute, 5) == 1.0


def test_compat_report_identity_bridge_is_compatible_and_flip_free() -> None:
    rng = np.random.default_rng(1)
    g = rng.normal(size=(50, 8)).astype(np.float32)
    q = g[:20] + 0.01 * rng.normal(size=(20, 8)).astype(np.float32)
    rel = np.arange(20)
    noisy = rng.normal(size=(20, 8)).astype(np.float32)  # old model: random queries
    rep = compat_report(noisy, q, g, g, rel, bridge_queries=q, bridge_gallery=g, k=10)
    assert rep.r10_new_old == rep.r10_new_new == 1.0
    assert rep.retention_r10 == 1.0 and rep.ecc and rep.negative_flip_rate == 0.0
    assert hits_at_k(search(q, g, 10)[1], rel, 10).all()
