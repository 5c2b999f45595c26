"""Tokens from the environment and from a file (a mounted secret): rotation revokes,
a broken configuration is refused without printing any token, and a file that breaks
while serving answers 503, never a wrong 2xx or a misleading 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.service import migrate
from embcompat.settings import Settings

OLD = "rotated-out-3b9d7e"
NEW = "rotated-in-a81c44"


def entry(name: str, token: str, scopes: list[str] | None = None) -> dict:
    return {"name": name, "token": token, "scopes": scopes or ["read"]}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps([entry("deploy", OLD)]))
    return path


def test_a_token_removed_from_the_file_is_revoked(tmp_path: Path, token_file: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens_file=token_file)
    migrate.upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings)) as c:
        assert c.get("/galleries", headers={"Authorization": f"Bearer {OLD}"}).status_code == 200
        token_file.write_text(json.dumps([entry("deploy", NEW), entry("other", OLD + "x")]))
        assert c.get("/galleries", headers={"Authorization": f"Bearer {OLD}"}).status_code == 401
        assert c.get("/galleries", headers={"Authorization": f"Bearer {NEW}"}).status_code == 200

        token_file.write_text('[{"name": "deploy", "token": "' + NEW)  # a half-written file
        broken = c.get("/galleries", headers={"Authorization": f"Bearer {NEW}"})
        assert broken.status_code == 503 and broken.json()["code"] == "service_unavailable"
        assert NEW not in broken.text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"name": "ops", "token": "short7!", "scopes": ["admin"]}], "8 or more characters"),
        ([{"token": "s3cr3t-admin-token-abc", "scopes": ["admin"]}], "exactly the keys"),
        ([entry("a", "s3cr3t-one-aaaa"), entry("a", "s3cr3t-two-bbbb")], "its own name"),
        ([entry("a", "s3cr3t-one-aaaa", ["write"])], "scopes must be"),
        ('[{"name": "a", "token": "s3cr3t-unterminated', "not JSON"),
    ],
)
def test_a_broken_token_configuration_stops_the_start_without_printing_secrets(
    tmp_path: Path, raw: object, message: str
) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens=raw)
    with pytest.raises(ValueError, match=message) as caught:
        create_app(settings)
    assert "s3cr3t" not in str(caught.value) and "short7" not in str(caught.value)
    assert "s3cr3t" not in repr(settings)


def test_the_older_map_still_reads_with_positional_names(tmp_path: Path) -> None:
    legacy = '{"first-token-1": ["read"], "second-tok": ["admin"]}'
    settings = Settings(data_dir=tmp_path / "data", api_tokens=legacy)
    assert settings.principal("second-tok") is not None
    assert settings.principal("second-tok").name == "token-2"  # type: ignore[union-attr]
    assert settings.principal("second-to") is None and settings.principal("") is None
