"""Concurrent requests on one gallery against a live server (uvicorn on a local port):
threads released together by a barrier. Every race ends in a 2xx or a 409 problem, never
a 5xx, and the DB and the vector store agree afterwards."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from embcompat.api.app import create_app
from embcompat.registry.schema import Item
from embcompat.service import galleries
from embcompat.service.context import Context
from embcompat.settings import Settings
from tests.api.conftest import ADMIN, TOKENS

pytestmark = pytest.mark.integration


@pytest.fixture
def server(hash_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """A live server over a copy of the hash registry, embedded defaults (in-process
    tasks), and a gallery `g` of 45 items served by hash:v1."""
    data = tmp_path / "data"
    shutil.copytree(hash_dir, data)
    settings = Settings(data_dir=data, api_tokens=TOKENS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=ADMIN, timeout=60) as c:
        assert c.post("/galleries", json={"name": "g", "model": "hash", "version": "v1"}).is_success
        items = [{"id": f"i{n}", "text": f"w{n % 7} w{n % 11} u{n}"} for n in range(45)]
        assert c.post("/galleries/g/items", json={"items": items}).is_success
    try:
        yield url, settings
    finally:
        srv.should_exit = True
        thread.join(timeout=20)


def together(n: int, call: Callable[[httpx.Client, int], httpx.Response], url: str) -> list[int]:
    """Run `call` in n threads released at once; returns the status codes."""
    barrier = threading.Barrier(n)

    def one(i: int) -> int:
        with httpx.Client(base_url=url, headers=ADMIN, timeout=120) as c:
            barrier.wait()
            return call(c, i).status_code

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_eight_upgrade_starts_give_one_job(server: tuple[str, Settings]) -> None:
    url, _ = server
    body = {"model": "hash", "version": "v2", "plan": "dual", "pairs": 50}
    codes = together(8, lambda c, _: c.post("/galleries/g/upgrades", json=body), url)
    assert sorted(codes) == [202] + [409] * 7, codes
    with httpx.Client(base_url=url, headers=ADMIN) as c:
        for _ in range(200):  # the one job runs in-process after its reply
            job = c.get("/upgrades/1").json()
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert job["state"] == "done", job
        assert c.get("/upgrades/2").status_code == 404


def test_six_creates_of_one_gallery_give_one(server: tuple[str, Settings]) -> None:
    url, _ = server
    body = {"name": "twin", "model": "hash", "version": "v1"}
    codes = together(6, lambda c, _: c.post("/galleries", json=body), url)
    assert sorted(codes) == [201] + [409] * 5, codes


def test_four_publishes_all_succeed(server: tuple[str, Settings]) -> None:
    url, settings = server
    codes = together(4, lambda c, _: c.post("/galleries/g/publish"), url)
    assert codes == [200] * 4, codes
    with Context(settings) as ctx:
        stats = galleries.stats(ctx, "g")
        assert stats["spaces"]["v1"]["generation"] == 4
        hits = httpx.post(f"{url}/galleries/g/search", headers=ADMIN,
                          json={"texts": ["w3 w3 u3"], "k": 1}).json()["hits"]  # fmt: skip
        assert hits[0][0]["item"] == "i3"


def test_updates_racing_deletes_of_one_item_keep_db_and_store_agreed(
    server: tuple[str, Settings],
) -> None:
    url, settings = server

    def call(c: httpx.Client, i: int) -> httpx.Response:
        if i % 2:
            return c.post("/galleries/g/items/delete", json={"ids": ["i5"]})
        return c.post("/galleries/g/items", json={"items": [{"id": "i5", "text": f"x{i} u5"}]})

    for _ in range(3):
        codes = together(8, call, url)
        assert all(code in (200, 404) for code in codes), codes
    with Context(settings) as ctx, ctx.session() as s:
        row = s.scalars(select(Item).where(Item.external_id == "i5")).one_or_none()
        v1 = galleries.version_record(ctx, s, 1)
        snap = galleries.space_store(ctx, "g", v1).snapshot()
        if row is None:
            assert len(snap) == 44
        else:
            assert row.id in set(snap.ids.tolist()) and len(snap) == 45
            hits = httpx.post(f"{url}/galleries/g/search", headers=ADMIN,
                              json={"texts": [row.payload], "k": 1}).json()["hits"]  # fmt: skip
            assert hits[0][0]["item"] == "i5"
