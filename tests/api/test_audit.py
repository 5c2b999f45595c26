"""The audit trail over a real HTTP flow with named tokens read from a file (a mounted
secret): every admin action is a row naming the token's owner, and no token value
appears in logs, problems, metrics, audit rows or the database."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import httpx
import pytest

from embcompat.kinds import TERMINAL_STATES
from embcompat.settings import Settings
from tests.api.conftest import live_server

pytestmark = pytest.mark.integration

OPS = "ops-7f3a9c2e51d04b6b8e1f"
DEPLOY = "deploy-0c5d2b8a9e7f4a13b6c2"
READER = "reader-91e4f0a2c7d84b5e9a3f"
SECRETS = (OPS, DEPLOY, READER)


def test_every_admin_action_is_recorded_with_who(
    hash_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(hash_dir, data)
    token_file = tmp_path / "tokens.json"
    token_file.write_text(json.dumps([
        {"name": "alice-ops", "token": OPS, "scopes": ["read", "admin"]},
        {"name": "ci-deploy", "token": DEPLOY, "scopes": ["admin"]},
        {"name": "dashboard", "token": READER, "scopes": ["read"]},
    ]))  # fmt: skip
    settings = Settings(data_dir=data, api_tokens_file=token_file)
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []
    with live_server(settings) as url:
        ops = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {OPS}"}, timeout=60)
        deploy = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {DEPLOY}"})
        reader = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {READER}"})

        def call(client: httpx.Client, method: str, path: str, **kw: object) -> httpx.Response:
            response = client.request(method, path, **kw)  # type: ignore[arg-type]
            answers.append(response.text)
            return response

        version = {"version": "ext", "dim": 16, "source": "external", "parent": "v1"}
        assert call(deploy, "POST", "/models/hash/versions", json=version).status_code == 201
        assert call(deploy, "POST", "/models/hash/versions/v1/aliases/serving").is_success
        gallery = {"name": "g", "model": "hash", "version": "v1"}
        assert call(ops, "POST", "/galleries", json=gallery).status_code == 201
        items = [{"id": f"i{n}", "text": f"w{n % 5} u{n}"} for n in range(80)]
        assert call(ops, "POST", "/galleries/g/items", json={"items": items}).is_success
        ids = {"ids": ["i0", "i1"]}
        assert call(ops, "POST", "/galleries/g/items/delete", json=ids).is_success
        upgrade = {"model": "hash", "version": "v2", "plan": "dual", "pairs": 50}
        job = call(ops, "POST", "/galleries/g/upgrades", json=upgrade).json()["id"]
        control = [call(ops, "POST", f"/upgrades/{job}/{a}").status_code
                   for a in ("pause", "resume")]  # fmt: skip
        for _ in range(300):  # in-process: it runs after the reply
            if call(ops, "GET", f"/upgrades/{job}").json()["state"] in TERMINAL_STATES:
                break
            time.sleep(0.1)
        control += [call(ops, "POST", f"/upgrades/{job}/{a}").status_code
                    for a in ("rollback", "cancel")]  # fmt: skip
        assert call(ops, "POST", "/galleries/g/repair").is_success
        assert call(reader, "POST", "/galleries/g/publish").status_code == 403
        assert call(reader, "POST", "/galleries/g/search", json={"texts": ["w1"]}).is_success
        bad = {"Authorization": f"Bearer {OPS}x"}
        assert call(ops, "POST", "/galleries", json=gallery, headers=bad).status_code == 401
        answers.append(call(reader, "GET", "/metrics").text)
        assert call(reader, "GET", "/audit").status_code == 403
        events = call(ops, "GET", "/audit", params={"limit": 1000}).json()
        page = call(ops, "GET", "/audit", params={"after": events[2]["id"], "limit": 2}).json()
        mine = call(ops, "GET", "/audit", params={"actor": "dashboard"}).json()

    rows = [(e["actor"], e["action"], e["status"]) for e in events]
    assert rows == [
        ("ci-deploy", "register_version", 201),
        ("ci-deploy", "promote", 200),
        ("alice-ops", "create_gallery", 201),
        ("alice-ops", "ingest", 200),
        ("alice-ops", "delete_items", 200),
        ("alice-ops", "start_upgrade", 202),
        *[("alice-ops", "control", status) for status in control],
        ("alice-ops", "repair_gallery", 200),
        ("dashboard", "publish", 403),
        ("dashboard", "list_audit", 403),  # denied attempts at admin routes, reads too
    ]
    details = [e["detail"] for e in events]
    assert details[3] == {"name": "g", "added": 80, "updated": 0}
    assert details[4] == {"name": "g", "deleted": 2}
    assert [d["action"] for d in details[6:10]] == ["pause", "resume", "rollback", "cancel"]
    assert 409 in control  # refusals are recorded too
    assert [e["id"] for e in page] == [events[3]["id"], events[4]["id"]]
    assert [e["action"] for e in mine] == ["publish", "list_audit"]

    db = (data / "embcompat.db").read_bytes()
    text = "\n".join([*answers, caplog.text, json.dumps(events)])
    for secret in SECRETS:
        assert secret not in text and secret.encode() not in db
