"""The FastAPI app: routers, RFC 9457 problem responses, health, readiness, metrics.

`embcompat serve` runs `create_app()` under uvicorn; tests build one over their own
settings. Tokens are read from settings and never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text

from embcompat import __version__
from embcompat.api import routes
from embcompat.api.deps import Ctx, Read, scrubbed
from embcompat.api.guard import Guard
from embcompat.api.metrics import CONTENT_TYPE, Metrics
from embcompat.errors import CorruptArtifact, EmbcompatError
from embcompat.service import galleries, migrate
from embcompat.service.context import Context
from embcompat.settings import Settings, get_settings
from embcompat.workers.app import dispatch_read_through

PROBLEM = "application/problem+json"
log = logging.getLogger("embcompat.api")


def _problem(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.context.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.tokens()  # a broken token configuration stops the start, naming the entry
    app = FastAPI(
        lifespan=_lifespan,
        title="embcompat admin API",
        version=__version__,
        description="Backward-compatible embedding model upgrades: registry, galleries, "
        "upgrades and search. Bearer tokens with scopes `read` and `admin`.",
    )
    app.state.context = Context(settings)
    if not settings.eager_tasks:  # an asynchronous read-through goes to the workers
        app.state.context.read_through_queue = partial(dispatch_read_through, app.state.context)
    app.state.metrics = Metrics(app.state.context)
    routers = (
        routes.models,
        routes.gals,
        routes.adapters,
        routes.jobs,
        routes.audit_trail,
        routes.trainings,
    )
    for router in routers:
        app.include_router(router)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        """Every request gets an id (X-Request-ID) and is counted; an error no handler
        knows becomes a problem+json 500 carrying that id, logged with its traceback."""
        t0 = time.perf_counter()
        request_id = request.state.request_id  # set by the guard
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error, request %s %s %s", request_id, request.method,
                          request.url.path)  # fmt: skip
            response = _problem(
                500,
                {
                    "type": "https://embcompat.dev/errors/internal_error",
                    "title": "internal error",
                    "status": 500,
                    "code": "internal_error",
                    "detail": "the server failed to answer this request; it is logged",
                    "request_id": request_id,
                },
            )
            app.state.metrics.unhandled.inc()
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        app.state.metrics.observe(
            request.method, path, response.status_code, time.perf_counter() - t0
        )
        response.headers["X-Request-ID"] = request_id
        return response

    # outermost: it answers before anything reads the body
    app.add_middleware(Guard, fastapi=app, routers=(app.router, *routers))

    @app.exception_handler(EmbcompatError)
    async def embcompat_error(request: Request, exc: EmbcompatError) -> JSONResponse:
        if isinstance(exc, CorruptArtifact):
            app.state.context.health.report(exc)
        problem = {**exc.to_problem(), "request_id": request.state.request_id}
        return _problem(exc.http_status, scrubbed(problem, app.state.context.settings))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(map(str, e.get("loc", []))), "msg": str(e.get("msg"))}
            for e in exc.errors()
        ]
        field = ".".join(errors[0]["loc"][1:]) if errors else None
        return _problem(
            422,
            {
                "type": "https://embcompat.dev/errors/invalid_request",
                "title": "invalid request",
                "status": 422,
                "code": "invalid_request",
                "detail": errors[0]["msg"] if errors else "invalid request",
                "field": field,
                "errors": errors,
            },
        )

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/ready", tags=["ops"])
    def ready(ctx: Ctx, request: Request) -> JSONResponse:
        """503 when a shared dependency (DB, MLflow, broker) is down or the schema is
        behind. Galleries whose files failed a check (the others serve as usual): their
        number for anyone, the galleries and problems under `degraded` for a token with
        a scope (orchestrators probe without one)."""
        checks: dict[str, str] = {}
        try:
            with ctx.session() as s:
                s.execute(text("SELECT 1"))
            behind = migrate.pending(ctx.engine)
            checks["database"] = "ok"
            checks["schema"] = "ok" if behind is None else f"{behind}: run `embcompat db upgrade`"
        except Exception as exc:  # readiness reports every failure, it never raises
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            ctx.registry.client.search_experiments(max_results=1)
            checks["mlflow"] = "ok"
        except Exception as exc:
            checks["mlflow"] = f"unreachable: {type(exc).__name__}"
        if ctx.settings.broker_url:
            try:
                import redis

                redis.Redis.from_url(ctx.settings.broker_url, socket_timeout=2).ping()
                checks["broker"] = "ok"
            except Exception as exc:
                checks["broker"] = f"unreachable: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        degraded = galleries.degraded(ctx) if checks.get("schema") == "ok" else {}
        known = ctx.settings.bearer(request.headers.get("authorization", "")) is not None
        body: dict[str, Any] = {"ready": ok, "checks": checks, "degraded_galleries": len(degraded)}
        if known:
            body["degraded"] = scrubbed(degraded, ctx.settings)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], dependencies=[Read], response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)

    return app
