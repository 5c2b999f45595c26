"""POST /training: a compatible version trained from a gallery's stored labelled probe
and stored texts (the gallery's own v1 vectors are the targets), registered with
lineage, and its registration report says `basis`. Over HTTP, tasks in-process (no
broker), as the embedded default runs them."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.service import migrate
from embcompat.settings import Settings
from tests.api.conftest import ADMIN, READ, TOKENS
from tests.conftest import wordnet_items


def test_training_from_a_gallery_probe_registers_a_compatible_version(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens=TOKENS)
    migrate.upgrade(settings.resolved_database_url)
    client = TestClient(create_app(settings))
    v1 = {"version": "v1", "dim": 384, "source": "shipped", "location": "all-MiniLM-L6-v2"}
    assert client.post("/models/text/versions", json=v1, headers=ADMIN).status_code == 201
    client.post("/galleries", json={"name": "docs", "model": "text", "version": "v1"},
                headers=ADMIN)  # fmt: skip
    items, queries, relevant = wordnet_items(240, seed=21)
    body = {"items": [{"id": it.id, "text": it.text} for it in items]}
    assert client.post("/galleries/docs/items", json=body, headers=ADMIN).status_code == 200
    request = {"old": "text:v1", "version": "v1c", "gallery": "docs", "batch_size": 8,
               "extra_dims": 32, "weights": {"new": 2.0}}  # fmt: skip

    no_probe = client.post("/training", json=request, headers=ADMIN)
    assert no_probe.status_code == 422 and "stores no labelled probe" in no_probe.json()["detail"]
    probe = {"queries": [{"text": q, "relevant": [items[r].id]}
                         for q, r in zip(queries, relevant, strict=True)]}  # fmt: skip
    client.put("/galleries/docs/probe", json=probe, headers=ADMIN)

    assert client.post("/training", json=request, headers=READ).status_code == 403
    for bad in ({"method": "magic"}, {"pairs": [["only one"]]}, {"old": "no-version"},
                {"batch_size": 1}, {"extra_dims": -1}, {"weights": {"bogus": 1.0}}):  # fmt: skip
        assert client.post("/training", json={**request, **bad}, headers=ADMIN).status_code == 422
    both = client.post("/training", json={**request, "pairs": [["q", "d"]] * 40}, headers=ADMIN)
    assert both.status_code == 422 and "not both" in both.json()["detail"]

    started = client.post("/training", json=request, headers=ADMIN)
    assert started.status_code == 202, started.text
    run = client.get(f"/training/{started.json()['id']}", headers=READ).json()
    assert run["state"] == "done", run
    assert run["result"]["registered"] == "text:v1c" and run["result"]["pairs"] == len(queries)
    assert run["progress"]["steps_done"] == run["progress"]["steps_total"] > 0
    assert run["params"]["weights"] == {"new": 2.0}
    version = client.get("/models/text/versions/v1c", headers=READ).json()
    assert version["lineage"] == ["v1", "v1c"] and version["dim"] == 384 + 32
    assert version["tags"]["compatible_with"] == "text:v1"
    assert version["tags"]["training_run"] == str(run["id"])
    report = client.get("/models/text/versions/v1c/report", headers=READ).json()
    assert report["state"] == "done" and report["galleries"]["docs"]["plan"] == "basis", report
    assert client.get("/training/999999", headers=READ).status_code == 404
    again = client.post("/training", json=request, headers=ADMIN)
    assert again.status_code == 409  # the version exists now
    actions = [e["action"] for e in client.get("/audit", headers=ADMIN).json()]
    assert "train_compatible" in actions
