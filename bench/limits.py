"""What abusive requests cost a live server (the one `embcompat serve` runs), with the
limits of `Settings` at their defaults: an anonymous 100 MB body, an oversized search
with a read token, and sockets that never finish their headers.

    python bench/limits.py [--sockets 300]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from common import print_table

from embcompat.api.server import server_config
from embcompat.service import migrate
from embcompat.settings import Settings

READ = {"Authorization": "Bearer bench-read-token"}


def rss_mb() -> float:
    """This process's resident memory (the server runs in it, in a thread)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="embcompat-limits-") as tmp:
        run(args.sockets, Path(tmp))


def run(sockets_n: int, data_dir: Path) -> None:
    """The server on `data_dir` (removed by the caller), each hostile request, the table."""
    settings = Settings(
        data_dir=data_dir,
        api_tokens=[{"name": "reader", "token": READ["Authorization"][7:], "scopes": ["read"]}],
    )
    migrate.upgrade(settings.resolved_database_url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(server_config(settings, "127.0.0.1", port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    rows = []

    body = b"{" + b" " * 100_000_000  # built before the baseline: the client's own memory
    before, t0 = rss_mb(), time.perf_counter()
    status = httpx.post(f"{url}/galleries/g/items", content=body, timeout=120).status_code
    took, grew = time.perf_counter() - t0, rss_mb() - before
    rows.append({"request": "anonymous 100 MB body", "status": status, "seconds": took,
                 "rss_growth_mb": grew})  # fmt: skip

    query = {"texts": ["x" * 10_000] * 1000, "k": 1000}
    t0 = time.perf_counter()
    status = httpx.post(f"{url}/galleries/g/search", json=query, headers=READ, timeout=120)
    rows.append({"request": "read token: 1,000 texts x 10 KB, k=1000",
                 "status": status.status_code, "seconds": time.perf_counter() - t0})  # fmt: skip

    sockets = []
    for _ in range(sockets_n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        sockets.append(s)
    t0 = time.perf_counter()
    for s in sockets:
        s.settimeout(60)
        with contextlib.suppress(OSError):
            s.recv(16)  # b"" once the server closes it
        s.close()
    rows.append({"request": f"{sockets_n} sockets with partial headers", "status": "closed",
                 "seconds": time.perf_counter() - t0})  # fmt: skip
    print(f"header timeout {settings.header_timeout_s:g} s, body limit "
          f"{settings.max_body_bytes // 2**20} MiB")  # fmt: skip
    print_table(rows, ["request", "status", "seconds", "rss_growth_mb"])
    server.should_exit = True


if __name__ == "__main__":
    main()
