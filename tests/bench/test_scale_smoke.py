"""bench/scale.py at a small N: every stage runs through the service and the JSON rows
carry the documented keys (the figures themselves come from runs at 1M and more)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEYS = {"n", "index", "db", "ingest_items_s", "publish_s", "bytes_per_vector", "search_ratio",
        "filtered_ratio_10", "filtered_ratio_01", "mixed_ratio", "map_ratio",
        "mapped_upgrade_s", "peak_rss_mb"}  # fmt: skip


def test_scale_bench_runs_every_stage_at_a_small_n(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "bench/scale.py", "--n", "12000", "--kinds", "flat", "ivfpq",
         "--queries", "3", "--database-url", PG_ADMIN_URL, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    sqlite = [r for r in rows if r["db"] == "sqlite"]
    assert [r["index"] for r in sqlite] == ["flat", "ivfpq"]
    assert all(set(r) >= KEYS for r in sqlite)
    assert sqlite[1]["bytes_per_vector"] < sqlite[0]["bytes_per_vector"] / 8  # codes, not floats
    assert all(r[k] > 0 for r in sqlite for k in KEYS - {"n", "index", "db"})
    (pg,) = [r for r in rows if r["db"] == "postgresql"]
    assert pg["ingest_items_s"] > 0
