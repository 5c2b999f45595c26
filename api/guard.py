"""The edge every request crosses before any route code runs: a request id, the bearer
token and its scope, the body's size and pace, and an audit row for each admin action.

It is plain ASGI on purpose: authentication and the size check happen before FastAPI
reads or parses a byte of the body, so an anonymous 100 MB body costs nothing and a
token without the scope gets 401/403 rather than a validation error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embcompat.api.deps import check_scope, require_admin, require_read
from embcompat.errors import (
    BodyTimeout,
    BodyTooLarge,
    EmbcompatError,
    ServiceUnavailable,
    Unauthorized,
)
from embcompat.registry.audit import record_event
from embcompat.service.context import Context
from embcompat.settings import Principal

log = logging.getLogger("embcompat.api")
PUBLIC = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
PROBLEM = b"application/problem+json"


def required_scope(route: APIRoute | None) -> str | None:
    """`admin` or `read`, from the `Admin`/`Read` dependency the route declares."""
    calls = {d.call for d in route.dependant.dependencies} if route else set()
    if require_admin in calls:
        return "admin"
    if require_read in calls:
        return "read"
    return None


async def send_problem(send: Send, exc: EmbcompatError, request_id: str) -> None:
    body = json.dumps({**exc.to_problem(), "request_id": request_id}).encode()
    headers = [(b"content-type", PROBLEM), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]  # fmt: skip
    if exc.http_status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware; see the module docstring. Routes add counts for the audit row
    to `request.state.audit`."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, routers: tuple[APIRouter, ...]) -> None:
        self.app = app
        self.fastapi = fastapi
        self.routers = routers  # the app's own router and those it includes

    @property
    def ctx(self) -> Context:
        return self.fastapi.state.context  # type: ignore[no-any-return]

    def _route(self, scope: Scope) -> tuple[APIRoute | None, dict[str, Any]]:
        """The route that will answer, and its path parameters."""
        for router in self.routers:
            for route in router.routes:
                if isinstance(route, APIRoute):
                    match, child = route.matches(scope)
                    if match is Match.FULL:
                        return route, dict(child.get("path_params", {}))
        return None, {}

    def _principal(self, scope: Scope) -> Principal:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not header.partition(" ")[2].strip():
            raise Unauthorized("missing bearer token", hint="send Authorization: Bearer <token>")
        try:
            principal = self.ctx.settings.bearer(header)
        except (OSError, ValueError) as exc:  # the token file broke while serving
            log.error("API tokens unreadable: %s", exc)
            raise ServiceUnavailable(
                "the server cannot read its API tokens", hint="the operator is told in the log"
            ) from None
        if principal is None:
            raise Unauthorized("unknown bearer token")
        return principal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        settings = self.ctx.settings
        route, params = self._route(scope)
        state["path_params"] = params
        need = required_scope(route)
        principal = None
        try:
            if scope["path"] not in PUBLIC:
                principal = self._principal(scope)
                state["principal"] = principal
                if need is not None:
                    check_scope(principal, need)
            length = _content_length(scope)
            if length > settings.max_body_bytes:
                raise BodyTooLarge(
                    f"the body is {length} bytes, over the limit of {settings.max_body_bytes}",
                    hint="send smaller batches (EMBCOMPAT_MAX_BODY_BYTES sets the limit)",
                )
        except EmbcompatError as exc:
            if principal is not None and need == "admin":  # a known name tried: recorded
                await self._audit(scope, route, principal, exc.http_status)
            await send_problem(send, exc, request_id)
            return

        status = 500
        body = _BoundedBody(
            receive, settings.max_body_bytes, settings.body_timeout_s, settings.body_deadline_s
        )
        replaced = False
        audited = not (principal is not None and need == "admin" and scope["method"] != "GET")

        async def watch(message: Message) -> None:
            """Pass the app's answer on, unless the body broke a limit: the app saw an
            error reading it (FastAPI answers 400), the client gets the limit's problem.
            The audit row is written once the answer is sent, before background tasks."""
            nonlocal status, replaced, audited
            if message["type"] == "http.response.start" and body.error is not None:
                replaced = True
                status = body.error.http_status
                await send_problem(send, body.error, request_id)
            if not replaced:
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)
            done = message["type"] == "http.response.body" and not message.get("more_body")
            if done and not audited and principal is not None:
                audited = True
                await self._audit(scope, route, principal, status)

        try:
            await self.app(scope, body.receive, watch)
        finally:
            if not audited and principal is not None:  # the app failed before answering
                await self._audit(scope, route, principal, status)

    async def _audit(
        self, scope: Scope, route: APIRoute | None, principal: Principal, status: int
    ) -> None:
        state = scope.get("state", {})
        detail = {
            k: v[:200] if isinstance(v, str) else v
            for k, v in {**state.get("path_params", {}), **state.get("audit", {})}.items()
        }
        event = {
            "actor": principal.name,
            "action": route.name if route else "unknown",
            "method": scope["method"],
            "path": scope["path"][:1000],
            "status": status,
            "request_id": state.get("request_id", ""),
            "detail": detail,
        }
        try:
            await to_thread.run_sync(lambda: self._write(event))
        except Exception:  # the action happened; a lost audit row is logged, not raised
            log.exception("audit row not written: %s", {k: event[k] for k in ("actor", "path")})

    def _write(self, event: dict[str, Any]) -> None:
        with self.ctx.session() as s:
            record_event(s, **event)


def _content_length(scope: Scope) -> int:
    """The declared body size (0 without one); h11 has already refused malformed ones."""
    value = dict(scope["headers"]).get(b"content-length", b"0")
    try:
        return int(value)
    except ValueError:
        raise BodyTooLarge("the content-length header is not a number") from None


class _BoundedBody:
    """`receive` that refuses a body past `limit` bytes (chunked bodies have no length to
    check up front), a client that pauses more than `timeout` s between chunks, and one
    whose whole body takes more than `deadline` s. Once the body is complete, calls pass
    through (they wait for a disconnect)."""

    def __init__(self, receive: Receive, limit: int, timeout: float, deadline: float) -> None:
        self._receive, self.limit, self.timeout = receive, limit, timeout
        self.total = deadline
        self.deadline = time.monotonic() + deadline
        self.seen = 0
        self.complete = False
        self.error: EmbcompatError | None = None

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        left = self.deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, min(self.timeout, left)))
        except TimeoutError:
            self.error = BodyTimeout(
                f"the body took longer than {self.total:g} s"
                if left < self.timeout
                else f"no body data for {self.timeout:g} s"
            )
            raise self.error from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.error = BodyTooLarge(f"the body is over the limit of {self.limit} bytes")
                raise self.error
            self.complete = not message.get("more_body", False)
        return message
