"""An API over a real DB and MLflow store; the broker points at a queue nobody consumes,
so a started upgrade waits and the tests drive its steps as a worker would."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.service import migrate
from embcompat.settings import Settings
from tests.conftest import REDIS_URL

ADMIN = {"Authorization": "Bearer admin-token"}
READ = {"Authorization": "Bearer read-token"}
TOKENS = {"admin-token": ["read", "admin"], "read-token": ["read"]}


def api_settings(data_dir: Path) -> Settings:
    settings = Settings(
        data_dir=data_dir,
        api_tokens=TOKENS,
        broker_url=REDIS_URL,
        queue=f"embcompat-api-test-{uuid.uuid4().hex[:8]}",
    )
    migrate.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return TestClient(create_app(api_settings(tmp_path / "data")))
