"""Telemetry store: one interface, backends registered by name (DESIGN.md §3)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from citygrid.store.base import (
    Bucket,
    Point,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    TelemetryStore,
)

if TYPE_CHECKING:
    from citygrid.settings import Settings

BACKENDS: dict[str, Callable[[Settings], TelemetryStore]] = {}


def backend(name: str):
    def wrap(factory: Callable[[Settings], TelemetryStore]):
        BACKENDS[name] = factory
        return factory

    return wrap


@backend("influx")
def _influx(settings: Settings) -> TelemetryStore:
    from citygrid.store.influx import InfluxStore

    return InfluxStore(settings.influx_url, settings.influx_db, token=settings.influx_token,
                       username=settings.influx_user, password=settings.influx_password,
                       lifecycle=settings.lifecycle)


@backend("sqlite")
def _sqlite(settings: Settings) -> TelemetryStore:
    from citygrid.store.sqlite import SqliteStore

    return SqliteStore(Path(settings.data_dir) / "telemetry.sqlite", lifecycle=settings.lifecycle)


def open_store(settings: Settings) -> TelemetryStore:
    """InfluxDB when ``CITYGRID_INFLUX_URL`` is set, else the embedded SQLite store."""
    store = BACKENDS["influx" if settings.influx_url else "sqlite"](settings)
    return store


__all__ = ["BACKENDS", "Bucket", "Point", "StoreError", "StoreRejected", "StoreUnavailable",
           "TelemetryStore", "open_store"]
