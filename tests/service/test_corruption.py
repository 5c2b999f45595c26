"""Damaged files, found after a restart: a clear `corrupt_artifact` problem naming the
gallery and space (never a server path), `/ready` listing the gallery as degraded, the
index fallback counted, `publish` refusing a damaged space, and `repair` restoring
correct search."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.settings import Settings
from tests.api.conftest import ADMIN, READ, TOKENS

ITEMS = [{"id": f"i{n}", "text": f"w{n % 7} w{n % 11} u{n}"} for n in range(45)]


@pytest.fixture
def data(hash_dir: Path, tmp_path: Path) -> Path:
    """A gallery `g` of 45 items, published, in a data dir nothing holds open."""
    root = tmp_path / "data"
    shutil.copytree(hash_dir, root)
    with TestClient(create_app(Settings(data_dir=root, api_tokens=TOKENS))) as c:
        assert c.post("/galleries", json={"name": "g", "model": "hash", "version": "v1"},
                      headers=ADMIN).status_code == 201  # fmt: skip
        assert c.post("/galleries/g/items", json={"items": ITEMS}, headers=ADMIN).is_success
        assert c.post("/galleries/g/publish", headers=ADMIN).is_success
    return root


def _shard(root: Path) -> Path:
    return next((root / "galleries/g/vectors/v1").glob("shard-*[0-9].npy"))


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for at in range(len(raw) - 40, len(raw) - 8):  # inside the data, past the header
        raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flipped shard": lambda root: flip(_shard(root)),
    "truncated shard": lambda root: truncate(_shard(root)),
    "garbage manifest": lambda root: (root / "galleries/g/vectors/v1/manifest.json").write_text(
        "{not json"
    ),
}
INDEX_DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage CURRENT": lambda root: (root / "galleries/g/indexes/v1/CURRENT").write_text("x!"),
    "flipped index.faiss": lambda root: flip(
        next((root / "galleries/g/indexes/v1").glob("gen-*/index.faiss"))
    ),
}


def _top1_all(c: TestClient) -> bool:
    res = c.post("/galleries/g/search", json={"texts": [i["text"] for i in ITEMS], "k": 1},
                 headers=ADMIN).json()  # fmt: skip
    return [hits[0]["item"] for hits in res["hits"]] == [i["id"] for i in ITEMS]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_space_is_named_refused_and_repaired(data: Path, damage: str) -> None:
    DAMAGE[damage](data)
    with TestClient(create_app(Settings(data_dir=data, api_tokens=TOKENS))) as c:
        res = c.post("/galleries/g/search", json={"texts": ["w1 u1"]}, headers=ADMIN)
        problem = res.json()
        assert res.status_code == 500 and problem["code"] == "corrupt_artifact", problem
        assert problem["gallery"] == "g" and problem["space"] == "v1"
        assert str(data) not in res.text and "/galleries/" not in problem["detail"]
        anonymous = c.get("/ready").json()
        assert anonymous["degraded_galleries"] == 1 and "degraded" not in anonymous
        ready = c.get("/ready", headers=READ).json()
        assert ready["ready"] and "v1" in ready["degraded"]["g"], ready
        refused = c.post("/galleries/g/publish", headers=ADMIN)
        assert refused.status_code == 500 and refused.json()["code"] == "corrupt_artifact"
        report = c.post("/galleries/g/repair", headers=ADMIN).json()
        assert report["spaces"]["v1"]["unrebuildable"] == 0, report
        assert report["spaces"]["v1"]["kept"] + report["spaces"]["v1"]["encoded"] == 45
        assert _top1_all(c)
        assert c.get("/ready", headers=READ).json()["degraded"] == {}


@pytest.mark.parametrize("damage", INDEX_DAMAGE)
def test_a_damaged_index_falls_back_to_exact_search_counted(data: Path, damage: str) -> None:
    INDEX_DAMAGE[damage](data)
    with TestClient(create_app(Settings(data_dir=data, api_tokens=TOKENS))) as c:
        assert _top1_all(c)  # the store answers exactly: right, if slower
        ready = c.get("/ready", headers=READ).json()
        assert "v1" in ready["degraded"]["g"], ready
        metrics = c.get("/metrics", headers=ADMIN).text
        assert "embcompat_index_fallbacks_total 1.0" in metrics, metrics
        assert c.post("/galleries/g/repair", headers=ADMIN).is_success
        assert c.get("/ready", headers=READ).json()["degraded"] == {}
        assert _top1_all(c)
