"""Registering a version of a model that serves a gallery produces its upgrade report
(the plan the gate would choose, expected R@10 from the gallery's stored probe, the
projected backfill), logged as an MLflow run and served by the API; POST /adapters fits
and logs adapters between two versions without an upgrade. All over HTTP, with tasks
run in-process (no broker), as the embedded default runs them."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from embcompat.api.app import create_app
from embcompat.registry import versions
from embcompat.service import galleries, migrate, reports
from embcompat.service.context import Context
from embcompat.settings import Settings
from tests.api.conftest import ADMIN, READ, TOKENS
from tests.conftest import wordnet_items
from tests.service.hash_models import register_hash_pair


def test_registration_report_probe_and_standalone_adapters_over_http(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens=TOKENS)
    migrate.upgrade(settings.resolved_database_url)
    app = create_app(settings)
    client = TestClient(app)
    v1 = {"version": "v1", "dim": 384, "source": "shipped", "location": "all-MiniLM-L6-v2"}
    first = client.post("/models/text/versions", json=v1, headers=ADMIN)
    assert first.status_code == 201 and first.json()["report"] is None  # serves nothing yet
    client.post("/models/text/versions/v1/aliases/serving", headers=ADMIN)
    client.post("/galleries", json={"name": "docs", "model": "text", "version": "v1"},
                headers=ADMIN)  # fmt: skip
    items, queries, relevant = wordnet_items(400)
    body = {"items": [{"id": it.id, "text": it.text} for it in items]}
    assert client.post("/galleries/docs/items", json=body, headers=ADMIN).status_code == 200

    probe = {"queries": [{"text": q, "relevant": [items[r].id, "not-ingested"]}
                         for q, r in zip(queries, relevant, strict=True)]}  # fmt: skip
    assert client.put("/galleries/docs/probe", json=probe, headers=READ).status_code == 403
    bad = client.put("/galleries/docs/probe", json={"queries": [{"text": "x", "relevant": []}]},
                     headers=ADMIN)  # fmt: skip
    assert bad.status_code == 422
    stored = client.put("/galleries/docs/probe", json=probe, headers=ADMIN).json()
    assert stored["queries"] == len(queries) and stored["resolved"] == len(set(relevant))
    assert stored["relevant"] == len(set(relevant)) + 1  # the missing id is kept, not resolved
    assert client.get("/galleries/docs/probe", headers=ADMIN).json()["queries"] == len(queries)

    v2 = {"version": "v2", "dim": 768, "source": "shipped", "location": "all-mpnet-base-v2",
          "parent": "v1"}  # fmt: skip
    reg = client.post("/models/text/versions", json=v2, headers=ADMIN)
    assert reg.status_code == 201 and reg.json()["report"] == "pending"
    report = client.get("/models/text/versions/v2/report", headers=READ).json()
    assert report["state"] == "done", report
    docs = report["galleries"]["docs"]
    assert docs["from"] == "text:v1" and docs["items"] == 400 and docs["sample"] == 400
    assert docs["projected_backfill_s"] > 0 and docs["encoder_items_per_s"]["new"] > 0
    assert docs["label_free"]["advice_only"] is True
    plans = docs["labelled"]["plans"]
    assert set(plans) == {"dual", "cascade", "bridge", "mapped"}
    assert docs["plan"] in plans and plans[docs["plan"]]["no_regret"]
    best = max(p["lowest"] for p in plans.values() if p["no_regret"])
    assert plans[docs["plan"]]["lowest"] == best  # the gate's rule, on the stored probe
    assert docs["expected_r10"]["r10_day_one"] == plans[docs["plan"]]["r10_day_one"]

    mlflow = MlflowClient(settings.resolved_mlflow_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.tags["version"] == "v2" and "docs.projected_backfill_s" in run.data.metrics
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id, "curves")} >= {
        "curves/docs-bridge-curve.png", "curves/docs-mapper-curve.png"}  # fmt: skip
    reg_name = reg.json()["mlflow_name"]
    tags = mlflow.get_model_version(reg_name, reg.json()["mlflow_version"]).tags
    assert tags["report_run_id"] == report["mlflow_run_id"]
    missing = client.get("/models/text/versions/v1/report", headers=READ)
    assert missing.status_code == 404 and missing.json()["code"] == "unknown_report"

    fit = {"model": "text", "old_version": "v1", "new_version": "v2", "gallery": "docs",
           "sample": 200, "kind": "procrustes"}  # fmt: skip
    assert client.post("/adapters", json=fit, headers=READ).status_code == 403
    out = client.post("/adapters", json=fit, headers=ADMIN)
    assert out.status_code == 201, out.text
    fitted = out.json()
    assert fitted["pairs"] == 200 and fitted["adapters"]["bridge"]["kind"] == "procrustes"
    shown = client.get(f"/adapters/{fitted['adapters']['bridge']['id']}", headers=READ).json()
    assert shown["metrics"]["curve_auc"] > 0 and shown["mlflow_model_uri"].startswith("models:/")
    both = client.post("/adapters", json={**fit, "texts": ["a b"] * 60}, headers=ADMIN)
    assert both.status_code == 422 and "exactly one" in both.json()["detail"]
    actions = {e["action"] for e in client.get("/audit", headers=ADMIN).json()}
    assert {"set_probe", "fit_adapter", "register_version"} <= actions


def test_a_candidate_alias_set_in_mlflow_is_found_for_its_report(tmp_path: Path) -> None:
    """A registration workflow that marks a version `candidate` in MLflow itself, not
    through the API, still gets its report: the beat finds it once, then not again."""
    with Context(Settings(data_dir=tmp_path / "data")) as ctx:
        migrate.upgrade(ctx.settings.resolved_database_url)
        register_hash_pair(ctx)
        assert reports.candidates_without_report(ctx) == []  # no gallery served yet
        galleries.create_gallery(ctx, "g", "hash", "v1")
        assert reports.candidates_without_report(ctx) == []  # no candidate alias yet
        with ctx.session() as s:
            v2 = versions.get_version(s, ctx.registry, "hash", "v2")
        ctx.registry.set_alias(v2.mlflow_name, "candidate", v2.mlflow_version)
        assert reports.candidates_without_report(ctx) == [("hash", "v2")]
        assert reports.request_report(ctx, "hash", "v2")
        assert reports.candidates_without_report(ctx) == []
