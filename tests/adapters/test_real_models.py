"""On real embeddings from two shipped models, the chosen adapter beats no adapter."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.adapters.metrics import compat_report
from embcompat.adapters.select import select_adapter

pytestmark = pytest.mark.slow


def test_auto_adapter_beats_raw_new_vectors_by_a_wide_margin(small_real_pair: dict) -> None:
    e = small_real_pair
    rel = e["task"].relevant
    # the paired sample: half of the gallery, encoded by both versions
    idx = np.random.default_rng(0).permutation(len(e["g_new"]))[:750]
    sel = select_adapter(
        e["g_new"][idx], e["g_old"][idx], "query: new->old",
        fit_kwargs={"residual_mlp": {"max_steps": 60}},
    )  # fmt: skip
    assert set(sel.scores) == {"procrustes", "affine", "lowrank", "residual_mlp"}
    assert sel.kind == max(sel.scores, key=sel.scores.__getitem__)
    args = (e["q_old"], e["q_new"], e["g_old"], e["g_new"], rel)
    raw = compat_report(*args, e["q_new"], e["g_old"])
    bridged = compat_report(*args, sel.adapter.transform(e["q_new"]), e["g_old"])
    assert bridged.r10_new_old >= raw.r10_new_old + 0.15, (raw, bridged)
    assert bridged.r10_new_old >= 1.4 * raw.r10_new_old
    assert bridged.negative_flip_rate < raw.negative_flip_rate
