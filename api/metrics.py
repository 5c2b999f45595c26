"""Prometheus metrics of one app: requests and searches counted as they happen, upgrade
progress read from the DB at scrape time, and the process's own metrics. Each app has
its own registry, so two apps in one process (tests) count apart."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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
        failed = GaugeMetricFamily(
            "embcompat_upgrade_failed", "failed upgrades waiting for an operator", labels=["job"]
        )
        with self.ctx.session() as s:
            for job in s.scalars(select(Job).where(Job.state.not_in(ended))):
                progress = job.items_done / job.items_total if job.items_total else 0.0
                gauge.add_metric([str(job.id), job.state], min(progress, 1.0))
                if job.state == JobState.FAILED:
                    failed.add_metric([str(job.id)], 1)
        yield gauge
        yield failed


class Damage(Collector):
    """Damaged spaces and index fallbacks this process has met (`Context.health`)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        degraded = GaugeMetricFamily(
            "embcompat_degraded_spaces", "spaces whose files failed a check", labels=["gallery"]
        )
        for gallery, spaces in self.ctx.health.degraded().items():
            degraded.add_metric([gallery], len(spaces))
        yield degraded
        fallbacks = CounterMetricFamily(
            "embcompat_index_fallbacks", "searches answered from the store: index damaged"
        )
        fallbacks.add_metric([], self.ctx.health.index_fallbacks)
        yield fallbacks


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
        self.unhandled = Counter(
            "embcompat_unhandled_errors", "requests answered 500 by an unexpected error",
            registry=self.registry,
        )  # fmt: skip
        self.registry.register(UpgradeProgress(ctx))
        self.registry.register(Damage(ctx))
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
