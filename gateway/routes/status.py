"""The status page (served at `/`) and the two routes it reads: a summary and a live stream.

The page is static (HTML, JS, CSS and a vendored uPlot, nothing from a CDN) and holds no
data; everything it shows comes from token-protected routes. The stream is server-sent
events over a fetch() the page makes with its bearer token. The summary's figures come from
the query functions in :mod:`gateway.queries`.
"""

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from gateway import queries
from gateway.deps import (
    AUTH_ERRORS,
    AcksDep,
    FeedDep,
    MetricsDep,
    Reader,
    RegistryDep,
    SettingsDep,
    StoreDep,
    Viewer,
)
from gateway.models import WhoAmI

STATIC = Path(__file__).resolve().parent.parent / "static"
CACHE_S = 10

router = APIRouter(tags=["status"], responses=AUTH_ERRORS)
_caches_lock = threading.Lock()


class _Cached:
    """The summary, encoded, for ``CACHE_S`` (one per app)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.at = 0.0
        self.body = b""


def _cache(request: Request) -> _Cached:
    state = request.app.state
    with _caches_lock:
        if not hasattr(state, "status_cache"):
            state.status_cache = _Cached()
        return state.status_cache


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The page itself: no data in it, so no token is needed to load it."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/v1/status")
def status(request: Request, _: Viewer, settings: SettingsDep, registry: RegistryDep,
           store: StoreDep, feed: FeedDep, acks: AcksDep, metrics: MetricsDep) -> Response:
    """The status page's figures: lighting energy against the all-night-full baseline
    (% saved, CO₂ avoided) over the last 24 h of data, consumption per district, active
    alerts, the newest settlements and the ledger's verification. Cached for 10 s."""
    cache = _cache(request)
    with cache.lock:
        if cache.at < time.monotonic() - CACHE_S:
            summary = queries.status_summary(settings, registry, store, feed, acks)
            if summary["store_error"] is not None:
                metrics.store_error("aggregate")
            cache.body, cache.at = orjson.dumps(summary), time.monotonic()
        body = cache.body
    return Response(body, media_type="application/json")


@router.get("/api/v1/whoami", response_model=WhoAmI)
def whoami(reader: Reader) -> WhoAmI:
    """The token's role and name (and a customer token's account): the page shows operators'
    buttons only to operators."""
    return WhoAmI(role=reader.role, name=reader.name, account=reader.account)


@router.get("/api/v1/stream",
            responses={200: {"content": {"text/event-stream": {}}, "description":
                             "Server-sent events: `snapshot`, then `update`"}})
async def stream(request: Request, _: Viewer, feed: FeedDep, metrics: MetricsDep
                 ) -> StreamingResponse:
    """Live changes for the status page: every device's state (level, commanded level
    and reason, power), new commands and settlements, twice a second."""

    async def events():
        with metrics.live_clients.track_inprogress():
            seen, beat = 0, time.monotonic()
            while True:
                changes: dict[str, Any] = await asyncio.to_thread(feed.changes, seen)
                if changes["version"] != seen:
                    kind = "snapshot" if seen == 0 else "update"
                    seen = changes["version"]
                    yield (b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(changes)
                           + b"\n\n")
                    beat = time.monotonic()
                elif time.monotonic() - beat > 15:
                    yield b": keep-alive\n\n"
                    beat = time.monotonic()
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
