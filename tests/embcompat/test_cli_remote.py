"""The CLI against a live `embcompat serve` (`--url`, `--token`) runs the README's
walkthrough with the same output and exit codes as the CLI in-process; and a server on
a fresh data directory starts ready (it migrates) or refuses, naming the command."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from embcompat.cli import app

pytestmark = pytest.mark.integration
TOKEN = "walkthrough-admin-4f9e2c"
ROOT = Path(__file__).resolve().parents[2]  # the hash models' pickles name tests.service
EMBCOMPAT = [str(Path(sys.executable).parent / "embcompat")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(data: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "EMBCOMPAT_DATA_DIR": str(data), "PYTHONPATH": str(ROOT),
           "EMBCOMPAT_API_TOKENS": json.dumps([{"name": "ops", "token": TOKEN,
                                                "scopes": ["read", "admin"]}])}  # fmt: skip
    proc = subprocess.Popen([*EMBCOMPAT, "serve", "--port", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(f"{url}/health", timeout=2).is_success:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("the server did not start")


@pytest.fixture
def server(hash_dir: Path, tmp_path: Path) -> Iterator[str]:
    data = tmp_path / "server"
    shutil.copytree(hash_dir, data)
    proc, url = serve(data)
    try:
        wait_ready(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def walkthrough(items: Path) -> list[list[str]]:
    """The README's CLI walkthrough on the tiny hash models (hash:v2 is a rotation of
    v1 into 24 dims), with two refusals."""
    return [
        ["db", "upgrade"],
        ["models", "register", "hash", "ext", "--dim", "24", "--external", "--parent", "v1"],
        ["models", "promote", "hash", "v1", "--alias", "serving"],
        ["models", "list", "hash"],
        ["models", "show", "hash", "v2"],
        ["gallery", "create", "docs", "hash", "v1"],
        ["gallery", "ingest", "docs", str(items)],
        ["gallery", "list"],
        ["search", "docs", "w1 w2", "--k", "5", "--filter", "color=red"],
        ["upgrade", "plan", "docs", "hash", "v2"],
        ["upgrade", "start", "docs", "hash", "v2", "--plan", "dual", "--pairs", "50"],
        ["upgrade", "watch", "1", "--interval", "0.2"],
        ["upgrade", "status", "1"],
        ["search", "docs", "w1 w2", "--k", "5"],
        ["gallery", "verify", "docs"],
        ["gallery", "repair", "docs"],
        ["upgrade", "rollback", "1"],
        ["upgrade", "pause", "1"],
        ["gallery", "create", "docs", "hash", "v1"],
        ["models", "register", "hash", "evil", "--dim", "8", "--mlflow-uri", "/etc"],
        ["audit"],
    ]


VOLATILE = [
    (re.compile(r"\d+ ms"), "N ms"),  # latency
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d[.\d+:]*"), "TIME"),
    (
        re.compile(
            r'"(rate_per_s|eta_s|items_per_s|seconds|projected_s|elapsed_s|bytes|'
            r'index_bytes|[a-z_]*_s)": [\d.e+-]+'
        ),
        r'"\1": N',
    ),  # fmt: skip
    (re.compile(r"cli:\S+|\bops\b"), "WHO"),  # the audit trail's actor
    (re.compile(r"│ (CLI|GET|POST) *│"), "│ M │"),
]


def normalized(output: str) -> str:
    for pattern, replacement in VOLATILE:
        output = pattern.sub(replacement, output)
    return output


def test_the_walkthrough_reads_the_same_remote_and_local(
    server: str, hash_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = tmp_path / "items.jsonl"
    colors = ("red", "blue")
    items.write_text("\n".join(
        json.dumps({"id": f"d{n}", "text": f"w{n % 7} w{n % 11} u{n}",
                    "metadata": {"color": colors[n % 2]}})
        for n in range(80)
    ))  # fmt: skip
    local = tmp_path / "local"
    shutil.copytree(hash_dir, local)
    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("EMBCOMPAT_DATA_DIR", str(local))
    got_local = [runner.invoke(app, argv) for argv in walkthrough(items)]
    remote = ["--url", server, "--token", TOKEN]
    got_remote = [runner.invoke(app, remote + argv) for argv in walkthrough(items)]

    for argv, a, b in zip(walkthrough(items), got_local, got_remote, strict=True):
        assert a.exit_code == b.exit_code, (argv, a.output, b.output)
    assert [r.exit_code for r in got_local[-3:]] == [2, 2, 0]
    assert "untrusted_model" in got_remote[-2].output
    for argv, a, b in zip(walkthrough(items), got_local, got_remote, strict=True):
        if argv[:2] in (["db", "upgrade"], ["upgrade", "start"], ["upgrade", "plan"]):
            continue  # where it runs, and measured throughput
        if argv[0] == "audit":
            continue  # checked below
        assert normalized(a.output) == normalized(b.output), argv
    start_local, start_remote = got_local[10].output, got_remote[10].output
    assert start_local.splitlines()[0] == start_remote.splitlines()[0]
    plan_local, plan_remote = json.loads(got_local[9].output), json.loads(got_remote[9].output)
    assert plan_local.keys() == plan_remote.keys()
    assert plan_local["items_to_reembed"] == plan_remote["items_to_reembed"] == 80
    for audit in (got_local[-1].output, got_remote[-1].output):
        assert all(a in audit for a in ("register_version", "ingest", "start_upgrade"))
    assert "cli:" in got_local[-1].output and "│ ops" in got_remote[-1].output


def test_a_fresh_server_starts_ready_or_names_the_command(tmp_path: Path) -> None:
    refused = subprocess.run(
        [*EMBCOMPAT, "serve", "--no-migrate", "--port", str(free_port())],
        env={**os.environ, "EMBCOMPAT_DATA_DIR": str(tmp_path / "strict")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "embcompat db upgrade" in " ".join(refused.stdout.split())
    proc, url = serve(tmp_path / "fresh")
    try:
        wait_ready(proc, url)
        ready = httpx.get(f"{url}/ready", timeout=30).json()
        assert ready["ready"] and ready["checks"]["schema"] == "ok", ready
        listed = httpx.get(f"{url}/galleries", headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200 and listed.json() == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
