"""Prometheus metrics of one app: requests and searches counted as they happen, upgrade
progress read from the DB at scrape time, and the process's own metrics. Each app has
its own registry, so two apps in one process (tests) count apart."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import select

from embcompat.kinds import TERMINAL_STATES, JobState
from embcompat.registry.schema import Job
from embcompat.service.context import Context

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class UpgradeProgress(Collector):
    """`embcompat_upgrade_progress{job,state}`: share of items upgraded per live job."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "embcompat_upgrade_progress", "items upgraded / items", labels=["job", "state"]
        )
        ended = [s.value for s in TERMINAL_STATES] + [JobState.PLANNED.value]
        with self.ctx.session() as s:
            for job in s.scalars(select(Job).where(Job.state.not_in(ended))):
                progress = job.items_done / job.items_total if job.items_total else 0.0
                gauge.add_metric([str(job.id), job.state], min(progress, 1.0))
        yield gauge


class Metrics:
    def __init__(self, ctx: Context) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embcompat_requests", "HTTP requests", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Counter(
            "embcompat_request_seconds", "time spent answering requests", ["method", "route"],
            registry=self.registry,
        )  # fmt: skip
        self.searches = Counter(
            "embcompat_searches", "searches per serving plan", ["plan"], registry=self.registry
        )
        self.search_seconds = Counter(
            "embcompat_search_seconds", "time spent searching", ["plan"], registry=self.registry
        )
        self.search_encodes = Counter(
            "embcompat_search_encodes", "items encoded on the fly (read-through)", ["plan"],
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(UpgradeProgress(ctx))
        ProcessCollector(registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).inc(seconds)

    def observe_search(self, plan: str, encodes: int, seconds: float) -> None:
        """Searches per plan, their on-the-fly encodes (read-through) and their time."""
        self.searches.labels(plan).inc()
        self.search_seconds.labels(plan).inc(seconds)
        self.search_encodes.labels(plan).inc(encodes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
