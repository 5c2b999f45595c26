"""`embcompat serve`: uvicorn with the limits of `Settings`, over a migrated database.

uvicorn closes idle keep-alive connections but waits forever for a client that sends
its request headers a byte at a time; `HeaderDeadline` closes a connection whose
headers are not complete within `header_timeout_s` (slow bodies are the guard's).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from embcompat.api.app import create_app
from embcompat.settings import Settings

MAX_HEADER_BYTES = 64 * 1024


class HeaderDeadline(H11Protocol):
    """h11 with a deadline for each request's headers, from its first byte (or from the
    connection) to the end of its headers."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # a new request starts on this connection
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # its headers are in: the app has it

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def server_config(settings: Settings, host: str, port: int, **extra: Any) -> uvicorn.Config:
    """The uvicorn config `serve` runs (tests run the same one on a free port)."""
    protocol = type("Deadline", (HeaderDeadline,), {"header_timeout": settings.header_timeout_s})
    return uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=int(max(1, settings.keep_alive_s)),
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        **extra,
    )
