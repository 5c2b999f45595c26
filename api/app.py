"""The FastAPI app: routers, RFC 9457 problem responses, health, readiness, metrics.

`embcompat serve` runs `create_app()` under uvicorn; tests build one over their own
settings. Tokens are read from settings and never logged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import text

from embcompat import __version__
from embcompat.api import routes
from embcompat.api.deps import Ctx, Read
from embcompat.api.metrics import CONTENT_TYPE, Metrics
from embcompat.errors import EmbcompatError
from embcompat.service.context import Context
from embcompat.settings import Settings, get_settings

PROBLEM = "application/problem+json"


def _problem(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.context.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        lifespan=_lifespan,
        title="embcompat admin API",
        version=__version__,
        description="Backward-compatible embedding model upgrades: registry, galleries, "
        "upgrades and search. Bearer tokens with scopes `read` and `admin`.",
    )
    app.state.context = Context(settings or get_settings())
    app.state.metrics = Metrics(app.state.context)
    for router in (routes.models, routes.gals, routes.adapters, routes.jobs):
        app.include_router(router)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        app.state.metrics.observe(
            request.method, path, response.status_code, time.perf_counter() - t0
        )
        return response

    @app.exception_handler(EmbcompatError)
    async def embcompat_error(_: Request, exc: EmbcompatError) -> JSONResponse:
        return _problem(exc.http_status, exc.to_problem())

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
    def ready(ctx: Ctx) -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            with ctx.session() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = "ok"
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
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], dependencies=[Read], response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)

    return app
