"""The label-free upgrade curve logged with each adapter, and the no-regret summary."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.adapters import BasisAdapter, ProcrustesAdapter
from embcompat.index.curve import curve_summary, proxy_curve
from tests.adapters.test_binary import clustered


def test_proxy_curve_runs_from_the_old_model_to_the_new_one() -> None:
    new = clustered(300, d=24, seed=1)
    rng = np.random.default_rng(2)
    rot, _ = np.linalg.qr(rng.standard_normal((24, 16)))
    old = (new @ rot + 0.15 * rng.standard_normal((300, 16))).astype(np.float32)
    bridge = ProcrustesAdapter.fit(new, old)
    for plan, adapter in (
        ("bridge", bridge),
        ("mapped", ProcrustesAdapter.fit(old, new, direction="gallery: old->new")),
        ("basis", BasisAdapter.fit(new, old)),
    ):
        rows = proxy_curve(old, new, plan, adapter)
        r10 = [r["r10"] for r in rows]
        assert [r["fraction"] for r in rows] == pytest.approx([i / 10 for i in range(11)])
        assert r10[-1] == 1.0  # all upgraded: the new model's own neighbours
        assert 0.2 < r10[0] < 0.95  # served through the adapter: part of them
        assert r10[-1] > r10[0]
        (summary,) = curve_summary([{**r, "pair": "p"} for r in rows])
        assert summary["min_r10"] == min(r10) and summary["r10_old_old"] == rows[0]["r10_old_old"]


def test_no_regret_needs_a_curve_that_never_dips() -> None:
    base = {"pair": "p", "plan": "x", "merge": "m", "order": "o", "r10_old_old": 0.5}
    rising = [{**base, "fraction": f, "r10": 0.5 + f / 10, "r10_new_new": 0.6} for f in (0, 0.5, 1)]
    dip = [
        {**r, "plan": "y", "r10": r["r10"] - (0.08 if r["fraction"] == 1 else 0)} for r in rising
    ]
    by_plan = {s["plan"]: s for s in curve_summary(rising + dip)}
    assert by_plan["x"]["no_regret"] and not by_plan["y"]["no_regret"]
    assert by_plan["y"]["largest_drop"] > 0.0 and by_plan["y"]["below_old_old"] == 0.0
