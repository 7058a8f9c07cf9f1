"""The status page (served at `/`) and the two routes it reads: a summary and a live stream.

The page is static (HTML, JS, CSS and a vendored uPlot, nothing from a CDN) and holds no
data; everything it shows comes from token-protected routes. The stream is server-sent
events over a fetch() the page makes with its bearer token.
"""

import asyncio
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from citygrid.settings import Settings
from citygrid.store import StoreError
from citygrid.store.lifecycle import HOUR_MS
from gateway.feed import CityFeed

STATIC = Path(__file__).parent / "static"
WINDOW_MS = 24 * HOUR_MS


def _hourly(buckets: list, start_ms: int, end_ms: int) -> dict[int, float]:
    return {b.start_ms: b.value for b in buckets
            if b.value is not None and start_ms - HOUR_MS < b.start_ms < end_ms}


def lighting(store: Any, start_ms: int, end_ms: int) -> dict[str, Any]:
    """Lighting energy against the all-night-full baseline, per hour and in all: the rule
    engine's `citygrid_lighting` minutes (the same figures as the Grafana dashboards)."""
    fields = {}
    for name in ("energy_wh", "baseline_wh", "co2_avoided_g"):
        fields[name] = _hourly(store.aggregate("citygrid_lighting", name, "sum",
                                               start_ms=start_ms, end_ms=end_ms,
                                               every_ms=HOUR_MS), start_ms, end_ms)
    hours = sorted(set(fields["energy_wh"]) | set(fields["baseline_wh"]))
    used = sum(fields["energy_wh"].values()) / 1000
    baseline = sum(fields["baseline_wh"].values()) / 1000
    return {
        "hours_ms": hours,
        "actual_kwh": [round(fields["energy_wh"].get(h, 0) / 1000, 3) for h in hours],
        "baseline_kwh": [round(fields["baseline_wh"].get(h, 0) / 1000, 3) for h in hours],
        "actual_total_kwh": round(used, 3), "baseline_total_kwh": round(baseline, 3),
        "saved_kwh": round(max(0.0, baseline - used), 3),
        "saved_pct": round((baseline - used) / baseline * 100, 1) if baseline > 0 else None,
        "co2_avoided_kg": round(sum(fields["co2_avoided_g"].values()) / 1000, 3),
    }


def consumption(store: Any, meters: dict[str, int], start_ms: int, end_ms: int
                ) -> list[dict[str, Any]]:
    """kWh per district over the window: hourly mean meter power × meters in the district."""
    out = []
    for district, n in sorted(meters.items()):
        buckets = _hourly(store.aggregate("meter", "power_w", "mean", start_ms=start_ms,
                                          end_ms=end_ms, every_ms=HOUR_MS, district=district),
                          start_ms, end_ms)
        wh = sum(w * n * (min(end_ms, b + HOUR_MS) - max(start_ms, b)) / HOUR_MS
                 for b, w in buckets.items())
        out.append({"district": district, "meters": n, "kwh": round(wh / 1000, 3)})
    return out


def add_status(app: FastAPI, settings: Settings, registry: Any, store: Any, feed: CityFeed,
               role, errors: dict, ledger_status, alerts, settlements) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        """The page itself: no data in it, so no token is needed to load it."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    cache: dict[str, Any] = {}
    lock = threading.Lock()

    def summary() -> dict[str, Any]:
        from citygrid.city import city

        profile = city(settings.city)
        feed.start()
        end = feed.newest_ts() or int(time.time() * 1000)
        start = end - WINDOW_MS
        meters: dict[str, int] = {}
        lights = 0
        for kind, district, n in registry.db.execute(
                "SELECT kind, district, count(*) FROM devices WHERE status != 'revoked' "
                "GROUP BY kind, district"):
            if kind == "meter":
                meters[district] = n
            else:
                lights += n
        out: dict[str, Any] = {
            "city": {"name": profile.name, "lat": profile.lat, "lon": profile.lon,
                     "timezone": profile.timezone},
            "window": {"start_ms": start, "end_ms": end},
            "devices": {"streetlights": lights, "meters": sum(meters.values())},
        }
        try:
            out["lighting"] = lighting(store, start, end)
            out["districts"] = consumption(store, meters, start, end)
            out["store_error"] = None
        except StoreError as e:
            out["lighting"], out["districts"], out["store_error"] = None, [], str(e)
        out["ledger"] = ledger_status().model_dump()
        out["alerts"] = [a.model_dump() for a in alerts(active=True, limit=20)]
        out["settlements"] = settlements(limit=10)
        return out

    @app.get("/api/v1/status", tags=["status"], responses=errors)
    def status(_: Annotated[str, Depends(role("viewer"))]) -> Response:
        """The status page's figures: lighting energy against the all-night-full baseline
        (% saved, CO₂ avoided) over the last 24 h of data, consumption per district, active
        alerts, the newest settlements and the ledger's verification. Cached for 10 s."""
        with lock:
            if cache.get("at", 0) < time.monotonic() - 10:
                cache["body"] = orjson.dumps(summary())
                cache["at"] = time.monotonic()
            body = cache["body"]
        return Response(body, media_type="application/json")

    @app.get("/api/v1/stream", tags=["status"],
             responses={**errors, 200: {"content": {"text/event-stream": {}}, "description":
                                        "Server-sent events: `snapshot`, then `update`"}})
    async def stream(request: Request, _: Annotated[str, Depends(role("viewer"))]
                     ) -> StreamingResponse:
        """Live changes for the status page: every device's state (level, commanded level
        and reason, power), new commands and settlements, twice a second."""

        async def events():
            seen, beat = 0, time.monotonic()
            while True:
                changes = await asyncio.to_thread(feed.changes, seen)
                if changes["version"] != seen:
                    kind = "snapshot" if seen == 0 else "update"
                    seen = changes["version"]
                    yield b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(changes) \
                        + b"\n\n"
                    beat = time.monotonic()
                elif time.monotonic() - beat > 15:
                    yield b": keep-alive\n\n"
                    beat = time.monotonic()
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
