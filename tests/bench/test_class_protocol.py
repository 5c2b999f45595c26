"""bench/class_protocol.py --quick runs end to end and writes the documented rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quick_protocol_writes_every_method_and_step(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "bench/class_protocol.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    keys = {"method", "step", "top1_old_old", "top1_new_new", "top1_new_old", "map_new_old",
            "ecc", "new_new_ratio"}  # fmt: skip
    assert all(keys <= set(r) for r in rows)
    assert {(r["method"], r["step"]) for r in rows} == {
        (m, s)
        for m in ("independent", "bct", "bt2", "oca", "dsimplex")
        for s in ("v1->v2", "v2->v3", "v1->v3")
    }
    independent = [r for r in rows if r["method"] == "independent"]
    # unrelated models: new/old far below old/old, and the criterion says so
    assert all(not r["ecc"] and r["top1_new_old"] < r["top1_old_old"] - 0.2 for r in independent)
    assert all(r["new_new_ratio"] == 1.0 for r in independent)
    assert all(0.0 <= r["map_new_old"] <= 1.0 for r in rows)
