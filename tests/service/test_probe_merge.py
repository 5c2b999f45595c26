"""The cascade's merge is chosen by what it finds on probe queries it was not fitted
on: a learned fusion weight only when it beats RRF there."""

from __future__ import annotations

import numpy as np

from embcompat.service.upgrade.probe import choose_merge

N_QUERIES, N_CAND = 40, 20


def probe(rows: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Per query: candidate 0 is the relevant one; `rows` gives (old, new) scores of the
    first candidates, the rest are noise around 0."""
    rng = np.random.default_rng(3)
    s_old = rng.uniform(-0.5, 0.5, (N_QUERIES, N_CAND))
    s_new = rng.uniform(-0.5, 0.5, (N_QUERIES, N_CAND))
    for c, (o, n) in enumerate(rows):
        s_old[:, c], s_new[:, c] = o, n
    cand = np.tile(np.arange(N_CAND), (N_QUERIES, 1))
    return s_old, s_new, cand, [{0} for _ in range(N_QUERIES)]


def test_rrf_is_kept_when_no_weight_wins_on_held_out_queries() -> None:
    # the relevant item is second on both sides; each side's first is a distractor the
    # other side finds ordinary: ranks fuse it first, no single weight on z-scores does
    s_old, s_new, cand, relevant = probe([(1.0, 1.0), (10.0, 0.0), (0.0, 10.0)])
    got = choose_merge(s_old, s_new, cand, relevant, k=1)
    assert got["merge"] == "rrf" and got["cv_r10_rrf"] == 1.0
    assert got["cv_r10_learned"] < got["cv_r10_rrf"]
    assert got["r10_cascade"] == 1.0


def test_a_learned_weight_is_used_when_it_wins_on_held_out_queries() -> None:
    # the new model is sure of the relevant item, the old one misleads: ranks fuse the
    # item both sides like best, a weight on the new side finds the relevant one
    s_old, s_new, cand, relevant = probe([(-0.45, 10.0), (5.0, 5.0)])
    got = choose_merge(s_old, s_new, cand, relevant, k=1)
    assert got["merge"] == "learned" and got["weight"] > 0.5
    assert got["cv_r10_learned"] > got["cv_r10_rrf"] and got["r10_cascade"] == 1.0
