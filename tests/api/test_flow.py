"""The whole flow over HTTP against real models, DB and MLflow store: register v1 →
ingest → register v2 → plan → upgrade → search mid-upgrade → done."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.service import upgrade
from tests.api.conftest import ADMIN, READ, api_settings
from tests.conftest import REDIS_URL, wordnet_items

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_register_ingest_upgrade_search_over_http(tmp_path: Path) -> None:
    settings = api_settings(tmp_path / "data")
    app = create_app(settings)
    client = TestClient(app)
    v1 = {"version": "v1", "dim": 384, "source": "shipped", "location": "all-MiniLM-L6-v2"}
    assert client.post("/models/text/versions", json=v1, headers=ADMIN).status_code == 201
    assert client.post("/models/text/versions/v1/aliases/serving", headers=ADMIN).status_code == 200
    assert (
        client.post(
            "/galleries", json={"name": "docs", "model": "text", "version": "v1"}, headers=ADMIN
        ).status_code
        == 201
    )
    items, queries, relevant = wordnet_items(160)
    body = {"items": [{"id": it.id, "text": it.text} for it in items]}
    assert client.post("/galleries/docs/items", json=body, headers=ADMIN).json() == {
        "added": 160,
        "updated": 0,
    }
    again = client.post("/galleries/docs/items", json=body, headers=ADMIN).json()
    assert again == {"added": 0, "updated": 160}, "ingest is idempotent on item ids"
    client.post("/galleries/docs/publish", headers=ADMIN)
    hits = client.post(
        "/galleries/docs/search", json={"texts": queries[:1], "k": 5}, headers=READ
    ).json()
    assert hits["plan"] == "single" and hits["hits"][0][0]["version"] == "v1"

    v2 = {
        "version": "v2",
        "dim": 768,
        "source": "shipped",
        "location": "all-mpnet-base-v2",
        "parent": "v1",
    }
    assert client.post("/models/text/versions", json=v2, headers=ADMIN).status_code == 201
    up = {"model": "text", "version": "v2", "pairs": 60, "chunk_size": 40}
    plan = client.post("/galleries/docs/upgrades/plan", json=up, headers=ADMIN).json()
    assert plan["items_to_reembed"] == 160 and plan["encoder_items_per_s"] > 0
    job = client.post("/galleries/docs/upgrades", json=up, headers=ADMIN)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    second = client.post("/galleries/docs/upgrades", json=up, headers=ADMIN)
    assert second.status_code == 409 and second.json()["job"] == job_id

    ctx = app.state.context  # a worker's part, driven here: the queue has no consumer
    upgrade.run_in_process(ctx, job_id, stop_after=1)
    status = client.get(f"/upgrades/{job_id}", headers=READ).json()
    assert status["state"] == "backfilling" and 0 < status["progress"] < 1
    assert status["eta_s"] is not None and status["rate_per_s"] > 0
    mid = client.post(
        "/galleries/docs/search", json={"texts": queries[:3], "k": 10}, headers=READ
    ).json()
    assert mid["plan"] == "cascade" and all(len(h) == 10 for h in mid["hits"])
    assert {h["path"] for row in mid["hits"] for h in row} == {"cascade"}
    assert all(h["score_old"] is not None for row in mid["hits"] for h in row)
    assert client.post(f"/upgrades/{job_id}/pause", headers=ADMIN).json()["state"] == "paused"
    assert client.post(f"/upgrades/{job_id}/resume", headers=ADMIN).json()["state"] == "backfilling"
    upgrade.run_in_process(ctx, job_id)
    assert client.get(f"/upgrades/{job_id}", headers=READ).json()["state"] == "done"
    final = client.post(
        "/galleries/docs/search", json={"texts": queries[:1], "k": 3}, headers=READ
    ).json()
    assert final["plan"] == "single" and final["hits"][0][0]["version"] == "v2"
    stats = client.get("/galleries/docs", headers=READ).json()
    assert stats["serving_version"] == "v2" and stats["items_per_version"] == {"v2": 160}
    adapters = client.get("/adapters", headers=READ).json()
    assert (
        adapters
        and adapters[0]["from"] == "text:v2"
        and adapters[0]["status"] in ("accepted", "refused")
    )
    # every fitted adapter is registered in MLflow with its metrics and upgrade-curve plot
    by_direction = {a["direction"]: a for a in adapters}
    assert set(by_direction) == {"query: new->old", "gallery: old->new", "basis: new->compatible"}
    for a in adapters:
        assert 0.0 <= a["metrics"]["curve_min_r10"] <= a["metrics"]["curve_auc"] + 1e-9
        _, name, number = a["mlflow_model_uri"].rsplit("/", 2)
        mv = ctx.registry.get_version(name, number)
        assert mv.tags["direction"] == a["direction"] and len(mv.tags["pairs_hash"]) == 16
        files = {f.path for f in ctx.registry.client.list_artifacts(mv.run_id, "adapter")}
        assert {"adapter/manifest.json", "adapter/weights.safetensors"} <= files
        assert any(f.endswith("-curve.png") for f in files)
    ready = client.get("/ready").json()
    assert ready["ready"], ready
    metrics = client.get("/metrics", headers=READ).text
    assert (
        'embcompat_requests_total{method="POST",route="/galleries/{name}/search",status="200"}'
        in metrics
    )
    redis.Redis.from_url(REDIS_URL).delete(settings.queue)
