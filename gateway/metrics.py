"""The gateway's own Prometheus metrics (``citygrid_…``), one CollectorRegistry per app.

Requests by route template, method and status; request latency; live-feed (server-sent
events) clients; the registry's size by kind (read at each scrape); store errors. The
process, platform and GC figures prometheus_client collects by default are in it too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

UNMATCHED = "<unmatched>"  # no route: one label value, not one per path asked for


class _RegistrySize(Collector):
    def __init__(self, registry: Any):
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("citygrid_registry_devices",
                                   "Devices in the registry that are not revoked, by kind",
                                   labels=["kind"])
        by_kind: dict[str, int] = {"streetlight": 0, "meter": 0}
        try:
            for kind, _district, n in self.registry.counts():
                by_kind[kind] = by_kind.get(kind, 0) + n
        except sqlite3.Error:
            return
        for kind, n in sorted(by_kind.items()):
            family.add_metric([kind], n)
        yield family


class Metrics:
    def __init__(self, registry: Any):
        self.registry = CollectorRegistry()
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(default)
        self.registry.register(_RegistrySize(registry))
        self.requests = Counter("citygrid_gateway_requests",
                                "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("citygrid_gateway_request_duration_seconds",
                                 "Time to answer a request (for an event stream: to its start)",
                                 ["route", "method"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.live_clients = Gauge("citygrid_gateway_live_clients",
                                  "Status pages connected to the live feed (server-sent events)",
                                  registry=self.registry)
        self.store_errors = Counter("citygrid_gateway_store_errors",
                                    "Telemetry store calls that failed, by operation",
                                    ["operation"], registry=self.registry)

    def store_error(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request by the template of the route that answered it."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, timed = 500, False

        def observe() -> None:
            nonlocal timed
            if not timed:
                timed = True
                self.metrics.latency.labels(_route(scope), scope["method"]).observe(
                    time.perf_counter() - started)

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                       for k, v in message.get("headers", ())):
                    observe()
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                observe()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            observe()
            self.metrics.requests.labels(_route(scope), scope["method"], str(status)).inc()


def _route(scope: dict) -> str:
    """The matched route's template (``/api/v1/devices/{device_id}``), or a mount's path."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


__all__ = ["Metrics", "MetricsMiddleware"]
