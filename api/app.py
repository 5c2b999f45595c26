"""The FastAPI app: routers, RFC 9457 problem responses, health, readiness, metrics.

`embcompat serve` runs `create_app()` under uvicorn; tests build one over their own
settings. Tokens are read from settings and never logged.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import select, text

from embcompat.api import routes
from embcompat.api.deps import Ctx, Read
from embcompat import __version__
from embcompat.context import Context
from embcompat.errors import EmbcompatError
from embcompat.settings import Settings, get_settings
from embcompat.registry.schema import Job, JobState

PROBLEM = "application/problem+json"


class Metrics:
    """Request counts and latencies per route, in Prometheus' text format."""

    def __init__(self) -> None:
        self.count: dict[tuple[str, str, int], int] = defaultdict(int)
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.encodes: dict[str, int] = defaultdict(int)

    def observe_search(self, plan: str, encodes: int, seconds: float) -> None:
        """Searches per plan, their on-the-fly encodes (read-through) and their time."""
        self.count[("SEARCH", plan, 0)] += 1
        self.seconds[("SEARCH", plan)] += seconds
        self.encodes[plan] += encodes

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.count[(method, route, status)] += 1
        self.seconds[(method, route)] += seconds

    def render(self, ctx: Context) -> str:
        lines = ["# TYPE embcompat_requests_total counter"]
        lines += [
            f'embcompat_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
            for (m, r, s), n in sorted(self.count.items())
            if m != "SEARCH"
        ]
        lines.append("# TYPE embcompat_request_seconds_total counter")
        lines += [
            f'embcompat_request_seconds_total{{method="{m}",route="{r}"}} {v:.6f}'
            for (m, r), v in sorted(self.seconds.items())
            if m != "SEARCH"
        ]
        lines.append("# TYPE embcompat_searches_total counter")
        lines += [
            f'embcompat_searches_total{{plan="{p}"}} {n}'
            for (m, p, _), n in sorted(self.count.items())
            if m == "SEARCH"
        ]
        lines.append("# TYPE embcompat_search_seconds_total counter")
        lines += [
            f'embcompat_search_seconds_total{{plan="{p}"}} {v:.6f}'
            for (m, p), v in sorted(self.seconds.items())
            if m == "SEARCH"
        ]
        lines.append("# TYPE embcompat_search_encodes_total counter")
        lines += [
            f'embcompat_search_encodes_total{{plan="{p}"}} {n}'
            for p, n in sorted(self.encodes.items())
        ]
        lines.append("# TYPE embcompat_upgrade_progress gauge")
        with ctx.session() as s:
            active = s.scalars(
                select(Job).where(
                    Job.state.in_(
                        [
                            JobState.PAIRING,
                            JobState.TRAINING,
                            JobState.GATED,
                            JobState.SERVING_BRIDGE,
                            JobState.BACKFILLING,
                            JobState.PAUSED,
                        ]
                    )
                )
            ).all()
            for job in active:
                progress = job.items_done / job.items_total if job.items_total else 0.0
                labels = f'job="{job.id}",state="{job.state}"'
                lines.append(f"embcompat_upgrade_progress{{{labels}}} {progress:.4f}")
        return "\n".join(lines) + "\n"


def _problem(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="embcompat admin API",
        version=__version__,
        description="Backward-compatible embedding model upgrades: registry, galleries, "
        "upgrades and search. Bearer tokens with scopes `read` and `admin`.",
    )
    app.state.context = Context(settings or get_settings())
    app.state.metrics = Metrics()
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
    def metrics(ctx: Ctx) -> str:
        return app.state.metrics.render(ctx)  # type: ignore[no-any-return]

    return app
