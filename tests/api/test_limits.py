"""Bounded requests against the server `embcompat serve` runs (same uvicorn config, a
free port): who you are is checked before the body is read, bodies and searches have
limits, and slow clients are cut off."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embcompat.settings import Settings
from tests.api.conftest import ADMIN, READ, TOKENS, live_server

pytestmark = pytest.mark.integration


@pytest.fixture
def live(hash_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A live server with small limits over a copy of the hash registry, and a gallery
    `g` of 40 items served by hash:v1."""
    data = tmp_path / "data"
    shutil.copytree(hash_dir, data)
    settings = Settings(
        data_dir=data, api_tokens=TOKENS, max_body_bytes=200_000, max_search_queries=20,
        max_search_hits=200, max_response_bytes=20_000, header_timeout_s=1.0,
        body_timeout_s=1.0, body_deadline_s=2.5,
    )  # fmt: skip
    with live_server(settings) as url:
        with httpx.Client(base_url=url, headers=ADMIN, timeout=60) as c:
            body = {"name": "g", "model": "hash", "version": "v1"}
            assert c.post("/galleries", json=body).is_success
            items = [{"id": f"item-{n}", "text": f"w{n % 7} w{n % 11} u{n}"} for n in range(40)]
            assert c.post("/galleries/g/items", json={"items": items}).is_success
        yield url


def test_who_you_are_comes_before_what_you_sent(live: str) -> None:
    huge = b"{" + b" " * 5_000_000  # not JSON, and over the limit
    with httpx.Client(base_url=live, timeout=30) as c:
        anonymous = c.post("/galleries/g/items", content=huge)
        assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized"
        assert c.post("/galleries/g/items", content=b"{", headers=READ).status_code == 403
        assert c.post("/galleries/g/items", content=b"{", headers=ADMIN).status_code == 422
        too_big = c.post("/galleries/g/items", content=huge, headers=ADMIN)
        assert too_big.status_code == 413 and too_big.json()["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
            yield b'{"items": ['
            for _ in range(100):
                yield b'{"id": "x", "text": "' + b"a" * 5000 + b'"},'

        streamed = c.post("/galleries/g/items", content=chunks(), headers=ADMIN)
        assert streamed.status_code == 413
        assert c.get("/galleries/g", headers=READ).json()["items"] == 40  # nothing stored


def test_searches_are_bounded(live: str) -> None:
    with httpx.Client(base_url=live, headers=READ, timeout=30) as c:
        ok = c.post("/galleries/g/search", json={"texts": ["w1 w2"] * 5, "k": 10})
        assert ok.status_code == 200 and len(ok.json()["hits"]) == 5
        many = c.post("/galleries/g/search", json={"texts": ["w1"] * 21, "k": 1})
        assert many.status_code == 422 and "21 queries" in many.json()["detail"]
        hits = c.post("/galleries/g/search", json={"texts": ["w1"] * 3, "k": 100})
        assert hits.status_code == 422 and "300 hits" in hits.json()["detail"]
        long = c.post("/galleries/g/search", json={"texts": ["w1 " * 5000], "k": 1})
        assert long.status_code == 422 and long.json()["field"] == "texts.0"
        values = c.post(
            "/galleries/g/search", json={"texts": ["w1"], "filters": {"c": ["r"] * 101}}
        )
        assert values.status_code == 422 and values.json()["field"].startswith("filters")
        big = c.post("/galleries/g/search", json={"texts": ["w1 w2"] * 20, "k": 10})
        assert big.status_code == 422 and "bytes" in big.json()["detail"]


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return False, b""
    return True, data


def test_slow_clients_are_cut_off(live: str) -> None:
    port = int(live.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow_headers:
        slow_headers.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes
        closed, data = _closed_within(slow_headers, 5.0)
        assert closed and data == b""  # dropped with no answer after ~1 s

    with socket.create_connection(("127.0.0.1", port)) as idle:
        closed, _ = _closed_within(idle, 5.0)  # connected, sent nothing
        assert closed

    with socket.create_connection(("127.0.0.1", port)) as slow_body:
        slow_body.sendall(
            b"POST /galleries/g/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer read-token"
            b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"texts"'
        )
        closed, data = _closed_within(slow_body, 5.0)
        assert closed and data.startswith(b"HTTP/1.1 408"), data[:200]

    with socket.create_connection(("127.0.0.1", port)) as trickle:  # never pauses 1 s
        trickle.sendall(
            b"POST /galleries/g/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer read-token"
            b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        trickle.settimeout(0.5)
        started, data = time.monotonic(), b""
        while not data and time.monotonic() - started < 10:
            try:
                trickle.sendall(b" ")
                data = trickle.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert 2.0 < time.monotonic() - started < 5.0

    with httpx.Client(base_url=live, timeout=10) as c:  # the server still answers
        assert c.get("/health").status_code == 200
