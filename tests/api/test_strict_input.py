"""Input whose coercion would change its meaning is refused with a 422 naming the field;
an error nobody expected is a problem+json 500 carrying a request id, and counted."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.settings import Settings
from tests.api.conftest import ADMIN, TOKENS


@pytest.fixture
def client(hash_dir: Path, tmp_path: Path) -> TestClient:
    root = tmp_path / "data"
    shutil.copytree(hash_dir, root)
    c = TestClient(create_app(Settings(data_dir=root, api_tokens=TOKENS)))
    assert c.post("/galleries", json={"name": "g", "model": "hash", "version": "v1"},
                  headers=ADMIN).status_code == 201  # fmt: skip
    items = [{"id": "a", "text": "w1 u1", "metadata": {"flag": True, "n": 1}},
             {"id": "b", "text": "w2 u2", "metadata": {"flag": 1, "n": 1.0}}]  # fmt: skip
    assert c.post("/galleries/g/items", json={"items": items}, headers=ADMIN).is_success
    return c


def post(client: TestClient, path: str, body: dict | str) -> httpx.Response:
    """JSON bodies as objects, or as raw text where they carry escapes no client sends."""
    if isinstance(body, str):
        headers = {**ADMIN, "content-type": "application/json"}
        return client.post(path, content=body.encode(), headers=headers)
    return client.post(path, json=body, headers=ADMIN)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"texts": ["w1"], "k": "5"}, "k"),
        ({"texts": ["w1"], "k": True}, "k"),
        ({"vectors": [["0.1"] * 16]}, "vectors.0.0"),
        ({"vectors": [[True] * 16]}, "vectors.0.0"),
        ({"vectors": [[0.1] * 16, [0.1] * 3]}, "vectors"),
        ('{"texts": ["w1 \\ud800"]}', "texts.0"),  # a lone surrogate, escaped in JSON
    ],
)
def test_search_input_is_strict(client: TestClient, body: dict | str, field: str) -> None:
    res = post(client, "/galleries/g/search", body)
    assert res.status_code == 422, res.text
    problem = res.json()
    assert (problem["field"] or "").startswith(field) or field in problem["detail"], problem


def test_ragged_items_and_bad_ids_are_refused(client: TestClient) -> None:
    ragged = {"items": [{"id": "x", "vector": [0.1] * 8}, {"id": "y", "vector": [0.1] * 7}]}
    res = client.post("/galleries/g/items", json=ragged, headers=ADMIN)
    assert res.status_code == 422 and "items.vector" in res.json()["detail"]
    res = post(client, "/galleries/g/items", '{"items": [{"id": "\\ud800", "text": "t"}]}')
    assert res.status_code == 422 and res.json()["field"] == "items.0.id"


def test_filter_values_keep_their_type(client: TestClient) -> None:
    def hits(filters: dict) -> list[str]:
        res = client.post("/galleries/g/search", json={"texts": ["w1 u1"], "k": 5,
                          "filters": filters}, headers=ADMIN)  # fmt: skip
        return sorted(h["item"] for h in res.json()["hits"][0])

    assert hits({"flag": True}) == ["a"]  # true does not match 1
    assert hits({"flag": 1}) == ["b"]
    assert hits({"n": 1}) == ["a", "b"]  # 1 and 1.0 are one number


def test_staging_text_for_a_model_that_cannot_encode_is_refused(client: TestClient) -> None:
    body = {"version": "v1", "dim": 8, "source": "external"}
    assert client.post("/models/vec/versions", json=body, headers=ADMIN).status_code == 201
    assert client.post("/galleries", json={"name": "v", "model": "vec", "version": "v1"},
                       headers=ADMIN).status_code == 201  # fmt: skip
    res = client.post("/galleries/v/items/stage", json={"items": [{"id": "a", "text": "t"}]},
                      headers=ADMIN)  # fmt: skip
    assert res.status_code == 422 and "cannot encode" in res.json()["detail"]


def test_an_unexpected_error_is_a_counted_problem_with_a_request_id(
    client: TestClient, hash_dir: Path
) -> None:
    ctx = client.app.state.context  # type: ignore[attr-defined]
    lock = ctx.data_dir / "galleries" / "g" / ".writer.lock"
    lock.unlink()
    lock.mkdir()  # the gallery's lock file is now a folder: an OS error nobody handles
    res = client.post("/galleries/g/items", json={"items": [{"id": "c", "text": "t"}]},
                      headers=ADMIN)  # fmt: skip
    assert res.status_code == 500
    assert res.headers["content-type"] == "application/problem+json"
    problem = res.json()
    assert (
        problem["code"] == "internal_error" and problem["request_id"] == res.headers["X-Request-ID"]
    )
    assert str(ctx.data_dir) not in res.text
    metrics = client.get("/metrics", headers=ADMIN).text
    assert "embcompat_unhandled_errors_total 1.0" in metrics


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/galleries/g/items", {"items": [{"id": "a\x00", "text": "w1"}]}),
        ("post", "/galleries/g/items/delete", {"ids": ["a\x00"]}),
        ("post", "/galleries/g/search", {"texts": ["w1"], "filters": {"id": ["a\x00"]}}),
        ("put", "/galleries/g/probe", {"queries": [{"text": "w1", "relevant": ["a\x00"]}]}),
        ("post", "/galleries/a%00b/items", {"items": [{"id": "a", "text": "w1"}]}),
        ("get", "/galleries/a%00b", None),
        ("get", "/models/hash/versions/v%001", None),
        ("get", "/models/versions?model=h%00", None),
    ],
)
def test_a_nul_character_is_refused_at_the_edge(
    client: TestClient, method: str, path: str, body: dict | None
) -> None:
    """PostgreSQL refuses a NUL anywhere in a statement's text, and a path on disk cannot
    hold one: a NUL in a body's text or in a name in the path is a 422 naming it, never
    a 500 from the database or the file system."""
    response = client.request(method, path, json=body, headers=ADMIN)
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert client.get("/galleries/g", headers=ADMIN).json()["items"] == 2
