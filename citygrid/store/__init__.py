"""Telemetry store: one interface, backends registered by name (DESIGN.md §3)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from citygrid.store.base import (
    Bucket,
    DatabaseNotFound,
    Point,
    StoreAuthError,
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


def credential_settings(settings: Settings) -> str:
    """The settings that hold the store's credentials, for a StoreAuthError's message."""
    if settings.influx_token:
        return "check CITYGRID_INFLUX_TOKEN"
    if settings.influx_user:
        return (f"check CITYGRID_INFLUX_USER ({settings.influx_user!r}) and "
                "CITYGRID_INFLUX_PASSWORD (InfluxDB 1.x; 2.x and 3.x take CITYGRID_INFLUX_TOKEN)")
    return ("no credentials are set: set CITYGRID_INFLUX_USER and CITYGRID_INFLUX_PASSWORD "
            "(InfluxDB 1.x) or CITYGRID_INFLUX_TOKEN (2.x, 3.x)")


__all__ = ["BACKENDS", "Bucket", "DatabaseNotFound", "Point", "StoreAuthError", "StoreError",
           "StoreRejected", "StoreUnavailable", "TelemetryStore", "credential_settings",
           "open_store"]
