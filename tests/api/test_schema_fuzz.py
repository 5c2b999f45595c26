"""Schemathesis over the OpenAPI schema, bounded in examples and time: no 500 on any
generated input, with an admin token and a small real gallery to hit.

The app is built when the module is collected (schemathesis parametrizes at import):
its stores live in a temp dir of their own."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from embcompat.api.app import create_app
from tests.api.conftest import ADMIN, api_settings

APP = create_app(api_settings(Path(tempfile.mkdtemp(prefix="embcompat-fuzz-")) / "data"))
_client = TestClient(APP)
_client.post(
    "/models/vendor/versions", json={"version": "a", "dim": 4, "source": "external"}, headers=ADMIN
)
_client.post("/galleries", json={"name": "g", "model": "vendor", "version": "a"}, headers=ADMIN)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_on_generated_input(case) -> None:  # type: ignore[no-untyped-def]
    response = case.call(headers=ADMIN)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
