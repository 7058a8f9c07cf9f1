"""Ingest's own figures: reported into the store and, optionally, as Prometheus metrics."""

from __future__ import annotations

import threading
from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, Histogram, Info, start_http_server
from prometheus_client import Counter as PromCounter

from citygrid.clock import SYSTEM_CLOCK, Clock
from citygrid.store import Point

LAG_SAMPLE_CAP = 100_000


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class IngestMetrics:
    def __init__(self, worker: str, clock: Clock = SYSTEM_CLOCK):
        self.worker = worker
        self.clock = clock
        self.messages = 0
        self.readings = 0
        self.batches = 0
        self.dead = Counter()
        self.spool_depth = 0
        self.spool_drained = 0
        self.store_auth_failures = 0  # store requests refused for our credentials
        self.store_auth_failed = False  # the store refuses them now (we spool)
        self.mqtt_node = ""  # the broker node connected to (host:port; a cluster has several)
        self.mqtt_failovers = 0  # connections lost and taken up on the next node
        self._lock = threading.Lock()
        self._lags_ms: list[int] = []
        self._latencies_s: list[float] = []
        self._last = (clock.monotonic(), 0, 0)
        self._server = None
        self.registry = CollectorRegistry()
        self._p_messages = PromCounter("citygrid_ingest_messages", "MQTT messages handled",
                                       registry=self.registry)
        self._p_readings = PromCounter("citygrid_ingest_readings", "Readings written or spooled",
                                       registry=self.registry)
        self._p_dead = PromCounter("citygrid_ingest_dead_letters", "Dead letters by reason",
                                   ["reason"], registry=self.registry)
        self._p_batch = Histogram("citygrid_ingest_batch_seconds", "Time to write one batch",
                                  registry=self.registry)
        self._p_spool = Gauge("citygrid_ingest_spool_points", "Points waiting in the spool",
                              registry=self.registry)
        self._p_spool.set_function(lambda: self.spool_depth)
        self._p_auth_failures = PromCounter(
            "citygrid_ingest_store_auth_failures",
            "Store requests refused for ingest's credentials (InfluxDB 401/403)",
            registry=self.registry)
        self._p_auth_failed = Gauge(
            "citygrid_ingest_store_auth_failed",
            "1 while the store refuses ingest's credentials (readings are spooled), else 0",
            registry=self.registry)
        self._p_auth_failed.set_function(lambda: int(self.store_auth_failed))
        self._p_node = Info("citygrid_ingest_mqtt", "The broker node ingest is connected to",
                            registry=self.registry)
        self._p_failovers = Gauge("citygrid_ingest_mqtt_failovers",
                                  "Broker connections lost and taken up on the next node",
                                  registry=self.registry)
        self._p_failovers.set_function(lambda: self.mqtt_failovers)

    def connected(self, node: str, failovers: int) -> None:
        """On every connection: the node it is to, and the failovers so far."""
        self.mqtt_node, self.mqtt_failovers = node, failovers
        self._p_node.info({"node": node})

    def auth_failure(self) -> None:
        with self._lock:
            self.store_auth_failures += 1
        self._p_auth_failures.inc()

    def serve(self, port: int) -> None:
        self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def batch_written(self, points: list[Point], dead: list, messages: int, seconds: float,
                      *, stored: bool) -> None:
        now_ms = self.clock.now_ms()
        readings = [p for p in points if p.measurement != "citygrid_ingest"]
        with self._lock:
            self.messages += messages
            self.readings += len(readings)
            self.batches += 1
            for d in dead:
                self.dead[d.reason] += 1
                self._p_dead.labels(d.reason).inc()
            self._latencies_s.append(seconds)
            if stored and len(self._lags_ms) < LAG_SAMPLE_CAP:
                self._lags_ms.extend(now_ms - p.ts_ms for p in readings)
        self._p_messages.inc(messages)
        self._p_readings.inc(len(readings))
        self._p_batch.observe(seconds)

    def snapshot_points(self, measurement: str, *, buffered: int) -> list[Point]:
        """One point of figures for the interval since the last snapshot (+ one per reason)."""
        now = self.clock.monotonic()
        with self._lock:
            lags, self._lags_ms = sorted(self._lags_ms), []
            latencies, self._latencies_s = sorted(self._latencies_s), []
            then, messages_then, readings_then = self._last
            self._last = (now, self.messages, self.readings)
            dead = dict(self.dead)
            messages, readings = self.messages, self.readings
            auth_failures = self.store_auth_failures
        elapsed = max(now - then, 1e-6)
        ts = self.clock.now_ms()
        tags = {"worker": self.worker}
        fields = {
            "messages_total": messages,
            "readings_total": readings,
            "messages_per_s": (messages - messages_then) / elapsed,
            "readings_per_s": (readings - readings_then) / elapsed,
            "batch_latency_p50_ms": quantile(latencies, 0.5) * 1000,
            "batch_latency_max_ms": (latencies[-1] if latencies else 0.0) * 1000,
            "lag_p50_ms": float(quantile(lags, 0.5)),
            "lag_p99_ms": float(quantile(lags, 0.99)),
            "buffered_messages": buffered,
            "spool_points": self.spool_depth,
            "spool_drained_total": self.spool_drained,
            "dead_letters_total": sum(dead.values()),
            "store_auth_failed": int(self.store_auth_failed),
            "store_auth_failures_total": auth_failures,
            "mqtt_node": self.mqtt_node,
            "mqtt_failovers_total": self.mqtt_failovers,
        }
        points = [Point(measurement, tags, fields, ts)]
        points += [Point(measurement, {**tags, "reason": reason}, {"dead_letters_total": n}, ts)
                   for reason, n in sorted(dead.items())]
        return points
