"""The telemetry store interface every backend implements (DESIGN.md §3)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

AGGREGATES = ("mean", "min", "max", "sum", "count", "last")


class Point(NamedTuple):
    """A point's identity is measurement + tags + ts_ms; rewriting it overwrites."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, Any]
    ts_ms: int
    key: str | None = None  # the encoded line-protocol series key, when known in advance


def series_id(tags: dict[str, str]) -> str:
    """A series' tags as one string: ``k=v,…`` sorted by key, empty values left out."""
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()) if v != "")


def latest_key(tags: dict[str, str]) -> str:
    """How ``latest()`` names a series: its device, else its tags."""
    return tags.get("device_id") or series_id(tags)


def check_aggregate(fn: str) -> None:
    if fn not in AGGREGATES:
        raise ValueError(f"aggregate {fn!r} is not one of {AGGREGATES}")


class StoreError(Exception):
    """Base of the store's errors."""


class StoreUnavailable(StoreError):
    """The store could not take the write now (down, timeout, 5xx): retry later."""


class StoreAuthError(StoreUnavailable):
    """The store refused our credentials (InfluxDB 401, or 403: not allowed).

    Retrying with the same settings cannot help, so a service refuses to start on it; once
    running, it is still an outage to a writer (a subclass of StoreUnavailable): a writer
    that spools keeps everything until someone fixes the credentials.
    """

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.detail = detail  # the server's own words


class DatabaseNotFound(StoreUnavailable):
    """The store says the database does not exist (and it could not be created here)."""


class StoreRejected(StoreError):
    """The store refused the data itself (HTTP 400): retrying cannot help."""

    def __init__(self, message: str, points: Sequence[Point] = ()):
        super().__init__(message)
        self.message = message
        self.points = list(points)


@dataclass(frozen=True)
class Bucket:
    start_ms: int
    value: float | None


class TelemetryStore(Protocol):
    """Write points, ask the few questions the services need."""

    def ensure_ready(self) -> None:
        """Create what the store needs (database, tables); idempotent. Raises StoreAuthError
        for refused credentials, DatabaseNotFound if the database is missing and cannot be
        created, StoreUnavailable if the store does not answer."""

    def write(self, points: Sequence[Point]) -> None:
        """Durably write all points or raise StoreUnavailable (or one of its kinds:
        StoreAuthError, DatabaseNotFound) / StoreRejected."""

    def latest(self, measurement: str, *, district: str | None = None,
               device_id: str | None = None) -> dict[str, Point]:
        """The newest point of each device (by ``device_id`` tag)."""

    def aggregate(self, measurement: str, field: str, fn: str, *, start_ms: int, end_ms: int,
                  every_ms: int, district: str | None = None,
                  device_id: str | None = None) -> list[Bucket]:
        """``fn`` of ``field`` per time bucket in [start, end); empty buckets left out."""

    def count(self, measurement: str, *, start_ms: int | None = None, end_ms: int | None = None,
              district: str | None = None, device_id: str | None = None) -> int:
        """How many points (distinct timestamps per series) are stored."""

    def points(self, measurement: str, *, start_ms: int, end_ms: int,
               device_id: str | None = None) -> Iterator[Point]:
        """Every point in [start, end), oldest first (replays and backtests); only one
        device's with ``device_id`` (a meter's export)."""

    def close(self) -> None: ...
