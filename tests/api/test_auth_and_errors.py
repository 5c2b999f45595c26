"""Every state-changing route refuses a missing token (401) and a read token (403);
bad input gets its documented 4xx as problem+json, and nothing stored changes."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, READ


def _state_changing_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI schema but reads (GET) and search (read scope)."""
    paths = client.get("/openapi.json").json()["paths"]
    out = [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, ops in paths.items()
        for method in ops
        if method != "get" and not path.endswith("/search")
    ]
    actions = [("POST", f"/upgrades/1/{a}") for a in ("pause", "resume", "cancel", "rollback")]
    return [r for r in out if r != ("POST", "/upgrades/1/1")] + actions


def test_every_state_changing_route_needs_an_admin_token(client: TestClient) -> None:
    routes = _state_changing_routes(client)
    assert len(routes) >= 12
    for method, path in routes:
        missing = client.request(method, path, json={})
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["content-type"] == "application/problem+json"
        wrong = client.request(method, path, json={}, headers=READ)
        assert wrong.status_code == 403, (method, path, wrong.text)
        assert "admin" in wrong.json()["detail"]
    assert client.get("/galleries", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/galleries", headers=READ).status_code == 200
    assert client.get("/health").status_code == 200


def _external_gallery(client: TestClient) -> None:
    r = client.post(
        "/models/vendor/versions",
        json={"version": "a", "dim": 4, "source": "external"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    r = client.post(
        "/galleries", json={"name": "g", "model": "vendor", "version": "a"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    items = [{"id": f"i{i}", "vector": [float(i), 1.0, 0.0, 0.5]} for i in range(5)]
    assert (
        client.post("/galleries/g/items", json={"items": items}, headers=ADMIN).status_code == 200
    )


@pytest.mark.parametrize(
    ("vector", "status", "code"),
    [
        ([1.0, 2.0], 422, "dimension_mismatch"),
        ([1.0, float("nan"), 0.0, 0.0], 422, "invalid_vectors"),
    ],
)
def test_invalid_vectors_are_refused_and_nothing_changes(
    client: TestClient, vector: list[float], status: int, code: str
) -> None:
    _external_gallery(client)
    before = client.get("/galleries/g", headers=READ).json()
    body = json.dumps({"items": [{"id": "new", "vector": vector}]})  # NaN stays a literal
    r = client.post(
        "/galleries/g/items", content=body, headers={**ADMIN, "content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.headers["content-type"] == "application/problem+json"
    after = client.get("/galleries/g", headers=READ).json()
    assert after["items"] == before["items"] == 5 and after["spaces"] == before["spaces"]


def test_unknown_ids_duplicates_and_oversize_batches(client: TestClient) -> None:
    _external_gallery(client)
    assert client.get("/galleries/nope", headers=READ).json()["code"] == "unknown_gallery"
    assert client.get("/galleries/nope", headers=READ).status_code == 404
    assert client.get("/upgrades/999", headers=READ).status_code == 404
    assert client.get("/models/vendor/versions/zz", headers=READ).status_code == 404
    dup = client.post(
        "/models/vendor/versions",
        json={"version": "a", "dim": 4, "source": "external"},
        headers=ADMIN,
    )
    assert dup.status_code == 409 and dup.json()["code"] == "duplicate_version"
    big = {"items": [{"id": f"x{i}", "vector": [0.0, 0.0, 0.0, 1.0]} for i in range(10_001)]}
    r = client.post("/galleries/g/items", json=big, headers=ADMIN)
    assert r.status_code == 422 and "exceeds the limit" in r.json()["detail"]
    missing = client.post("/galleries/g/items/delete", json={"ids": ["i1", "ghost"]}, headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["item"] == "ghost"
    assert client.get("/galleries/g", headers=READ).json()["items"] == 5
