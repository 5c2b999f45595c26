"""An API over a real DB and MLflow store; the broker points at a queue nobody consumes,
so a started upgrade waits and the tests drive its steps as a worker would."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.api.server import server_config
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


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The server `embcompat serve` runs (same uvicorn config) on a free local port, in
    a thread; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    srv = uvicorn.Server(server_config(settings, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
