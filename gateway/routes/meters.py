"""Meters' interval data: the energy per 15 minutes or hour, as CSV or Green Button XML."""

import argparse
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi import Path as PathParam

from billing import MAX_GAP_MS, BillingConfig, Interval, intervals
from citygrid.clock import SYSTEM_CLOCK, iso_time
from citygrid.registry import Registry
from citygrid.store import StoreError, TelemetryStore
from gateway.deps import (
    AUTH_ERRORS,
    BillingConfigDep,
    MetricsDep,
    Reader,
    RegistryDep,
    StoreDep,
    meter_account,
    owns,
)
from gateway.export import to_csv, to_greenbutton
from gateway.metrics import Metrics
from gateway.problems import documented
from gateway.tokens import Holder

router = APIRouter(tags=["meters"], responses=AUTH_ERRORS)
MeterId = Annotated[str, PathParam(max_length=64)]
EVERY_MS = {"15m": 900_000, "1h": 3_600_000}
MAX_RANGE_DAYS = 366
TIME_HELP = "ISO 8601 with its UTC offset, e.g. 2026-11-27T00:00+01:00 (send '+' as %2B)"
From = Annotated[str, Query(alias="from", max_length=64, description=f"Start, {TIME_HELP}.")]
To = Annotated[str, Query(max_length=64, description=f"End (exclusive), {TIME_HELP}.")]
Every = Annotated[Literal["15m", "1h"], Query(description="The interval length.")]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: documented("No such meter"),
    422: documented("A bad from, to or interval (the detail names it and says why)"),
    503: documented("The store did not answer"),
}


def _filename(meter_id: str, suffix: str) -> str:
    return f'attachment; filename="{re.sub(r"[^A-Za-z0-9._-]", "_", meter_id)}-{suffix}"'


def _time(name: str, text: str) -> int:
    try:
        return iso_time(text)
    except argparse.ArgumentTypeError as e:
        hint = " (a '+' in a URL must be sent as %2B)" if " " in text else ""
        raise HTTPException(422, f"{name}: {e}{hint}") from None


def _intervals(meter_id: str, start: str, end: str, interval: str, registry: Registry,
               store: TelemetryStore, metrics: Metrics, reader: Holder, config: BillingConfig
               ) -> tuple[list[Interval], int, int, int]:
    record = registry.record(meter_id)
    if record is None or record["kind"] != "meter":
        raise HTTPException(404, f"no meter {meter_id!r}")
    owns(reader, meter_account(meter_id, registry, config), f"meter {meter_id!r}")
    start_ms, end_ms, every_ms = _time("from", start), _time("to", end), EVERY_MS[interval]
    if end_ms <= start_ms:
        raise HTTPException(422, "to: must be after from")
    if end_ms - start_ms > MAX_RANGE_DAYS * 86_400_000:
        raise HTTPException(422, f"to: the range is at most {MAX_RANGE_DAYS} days")
    for name, ts in (("from", start_ms), ("to", end_ms)):
        if ts % every_ms:
            raise HTTPException(422, f"{name}: must be on a {interval} boundary (in UTC, e.g. "
                                f"a whole {'quarter ' if interval == '15m' else ''}hour)")
    try:
        readings = [(p.ts_ms, p.fields["energy_kwh"], p.fields.get("energy_export_kwh"))
                    for p in store.points("meter", start_ms=start_ms - MAX_GAP_MS,
                                          end_ms=end_ms + MAX_GAP_MS + 1, device_id=meter_id)
                    if "energy_kwh" in p.fields]
    except StoreError as e:
        metrics.store_error("points")
        raise HTTPException(503, f"the store did not answer: {e}") from None
    rows = intervals(readings, start_ms=start_ms, end_ms=end_ms, every_ms=every_ms)
    return rows, start_ms, end_ms, every_ms


@router.get("/api/v1/meters/{meter_id}/intervals.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                             "description": "start,end,import_kwh[,export_kwh]"}, **ERRORS})
def intervals_csv(meter_id: MeterId, start: From, to: To, reader: Reader,
                  registry: RegistryDep, store: StoreDep, metrics: MetricsDep,
                  config: BillingConfigDep, interval: Every = "15m") -> Response:
    """The meter's energy per interval: start and end (UTC), import kWh (the register's
    increase, interpolated at the boundaries) and export kWh when the meter reports it.
    Intervals the readings do not cover (no reading within an hour on either side of a
    boundary) are left out."""
    rows, *_ = _intervals(meter_id, start, to, interval, registry, store, metrics, reader,
                          config)
    return Response(to_csv(rows), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": _filename(meter_id, "intervals.csv")})


@router.get("/api/v1/meters/{meter_id}/greenbutton.xml", response_class=Response,
            responses={200: {"content": {"application/atom+xml": {"schema": {"type": "string"}}},
                             "description": "A Green Button (NAESB REQ.21 ESPI) Atom feed"},
                       **ERRORS})
def greenbutton(meter_id: MeterId, start: From, to: To, reader: Reader,
                registry: RegistryDep, store: StoreDep, metrics: MetricsDep,
                config: BillingConfigDep, interval: Every = "15m") -> Response:
    """The same intervals as Green Button data: UsagePoint, MeterReading and ReadingType per
    direction (import; export when reported), an IntervalBlock per UTC day, values in Wh
    with powerOfTenMultiplier -3 (mWh)."""
    rows, start_ms, end_ms, every_ms = _intervals(meter_id, start, to, interval, registry,
                                                  store, metrics, reader, config)
    body = to_greenbutton(meter_id, rows, start_ms=start_ms, end_ms=end_ms, every_ms=every_ms,
                          now_ms=SYSTEM_CLOCK.now_ms())
    return Response(body, media_type="application/atom+xml", headers={
        "Content-Disposition": _filename(meter_id, "greenbutton.xml")})
