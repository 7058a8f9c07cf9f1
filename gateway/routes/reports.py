"""Citizens' reports of streetlights, Open311 GeoReport v2 style: the service list, a new
service request (JSON or a form, as Open311 clients post it), and its status.

They are served under ``/api/v1`` and, for Open311 clients that take an endpoint, as
``/open311/v2/services.json``, ``requests.json`` and ``requests/{id}.json``.

These routes take no token: a city's reporting app, a 311 portal or a citizen's phone has no
operator's token. What protects them instead: a report must be within 50 m of a streetlight
in the registry (else 422), a body of at most 16 KiB (a description of 4,000 characters),
and at most ``REPORTS_PER_HOUR`` reports an hour from one address (429 with Retry-After).
What a request shows back (its status) leaves out the reporter's email and names.
"""

import json
import math
import threading
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from citygrid.clock import SYSTEM_CLOCK
from citygrid.fleet import FleetDevice, distance_m
from citygrid.maintenance import WorkOrders, device_trigger
from citygrid.registry import Registry
from gateway.deps import RegistryDep, ReportLimiterDep, WorkOrdersDep
from gateway.models import (
    Open311Accepted,
    Open311Request,
    Open311Service,
    ReportBody,
)
from gateway.problems import documented

router = APIRouter(tags=["citizen reports (Open311)"])
_BODY_SCHEMA = {"schema": ReportBody.model_json_schema()}
MATCH_RADIUS_M = 50.0
MAX_BODY = 16 * 1024
REPORTS_PER_HOUR = 20
AGENCY = "CityGrid street lighting"
SERVICES = {  # the codes are gateway.models.ServiceCode
    "streetlight-out": ("Streetlight out", "A streetlight that does not light at night.",
                        "dark,broken,lamp,out"),
    "streetlight-day-burning": ("Streetlight on by day", "A streetlight that burns in "
                                "daylight.", "day,burning,on,daylight"),
    "streetlight-flickering": ("Streetlight flickering", "A streetlight that flickers or "
                               "switches on and off.", "flicker,cycling,blinking"),
    "streetlight-damaged": ("Streetlight damaged", "A damaged pole, lantern or cabinet, or "
                            "exposed wiring.", "damaged,pole,knocked,wires"),
}
_lights_lock = threading.Lock()


def _services() -> list[Open311Service]:
    return [Open311Service(service_code=code, service_name=name, description=text,
                           keywords=keywords)
            for code, (name, text, keywords) in SERVICES.items()]


# Open311 clients configured with an endpoint ask for `services.json`, `requests.json` and
# `requests/{id}.json` under it: OPEN311 is that endpoint, the same routes.
OPEN311 = "/open311/v2"


@router.get("/api/v1/services", response_model=list[Open311Service])
@router.get(f"{OPEN311}/services.json", response_model=list[Open311Service])
def services() -> list[Open311Service]:
    """What a citizen can report (Open311 GET services); no token needed."""
    return _services()


async def report_body(request: Request) -> ReportBody:
    """The request as JSON or ``application/x-www-form-urlencoded`` (Open311 clients send
    forms); at most 16 KiB; blank form fields count as not given."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise HTTPException(413, f"a report's body is at most {MAX_BODY} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise HTTPException(413, f"a report's body is at most {MAX_BODY} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "application/json":
            data: Any = json.loads(raw)
            if not isinstance(data, dict):
                raise RequestValidationError([{"loc": ("body",), "msg": "must be a JSON object",
                                               "type": "type_error"}])
        elif ctype == "application/x-www-form-urlencoded":
            data = {k: v for k, v in parse_qsl(raw.decode(), keep_blank_values=True) if v}
        else:
            raise HTTPException(415, "send the report as application/json or "
                                "application/x-www-form-urlencoded")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestValidationError([{"loc": ("body",), "msg": f"not readable: {e}",
                                       "type": "value_error"}]) from None
    try:
        return ReportBody.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**x, "loc": ("body", *x["loc"])}
                                      for x in e.errors(include_url=False)]) from None


_POST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": _BODY_SCHEMA, "application/x-www-form-urlencoded": _BODY_SCHEMA}}}
_POST_ERRORS: dict[int | str, dict[str, Any]] = {
    413: documented("The body is over 16 KiB"), 415: documented("Neither JSON nor a form"),
    422: documented("Invalid, or no streetlight within 50 m"),
    429: documented("Too many reports from this address lately")}


def _lights(request: Request, registry: Registry) -> list[FleetDevice]:
    """The registry's streetlights, read again only when it changed."""
    state = request.app.state
    version = registry.version()
    with _lights_lock:
        cached = getattr(state, "report_lights", None)
        if cached is None or cached[0] != version:
            cached = state.report_lights = (version, registry.fleet().of_kind("streetlight"))
    return cached[1]


def nearest_light(lights: list[FleetDevice], lat: float, lon: float,
                  radius_m: float = MATCH_RADIUS_M) -> FleetDevice | None:
    """The streetlight nearest to (lat, lon) within ``radius_m``, or None."""
    here = FleetDevice("report", "streetlight", "-", lat, lon)
    dlat = radius_m / 111_320 * 1.5
    dlon = dlat / max(0.01, math.cos(math.radians(lat)))
    near = [(distance_m(here, d), d.device_id, d) for d in lights
            if abs(d.lat - lat) <= dlat and abs(d.lon - lon) <= dlon]
    best = min(near, default=None, key=lambda x: (x[0], x[1]))
    return best[2] if best is not None and best[0] <= radius_m else None


@router.post(f"{OPEN311}/requests.json", response_model=list[Open311Accepted],
             openapi_extra=_POST_BODY, responses=_POST_ERRORS)
@router.post("/api/v1/reports", response_model=list[Open311Accepted],
             openapi_extra=_POST_BODY, responses=_POST_ERRORS)
def create_report(request: Request, body: Annotated[ReportBody, Depends(report_body)],
                  registry: RegistryDep, orders: WorkOrdersDep,
                  limiter: ReportLimiterDep) -> list[Open311Accepted]:
    """Report a streetlight (Open311 POST requests); no token needed. The report goes to the
    nearest streetlight within 50 m and opens its work order, or joins the one it has."""
    client = request.client.host if request.client else "?"
    wait_s = limiter.blocked_for(client)
    if wait_s:
        raise HTTPException(429, f"too many reports from {client}; try again in {wait_s} s",
                            headers={"Retry-After": str(wait_s)})
    light = nearest_light(_lights(request, registry), body.lat, body.long)
    if light is None:
        raise HTTPException(422, f"body.lat, body.long: no streetlight within "
                            f"{MATCH_RADIUS_M:.0f} m of {body.lat}, {body.long}; "
                            "report at the light itself")
    report, order, new = orders.report(
        lambda rid: device_trigger(light, "citizen_report", rid, "citizen", lat=body.lat,
                                   lon=body.long),
        service_code=body.service_code, lat=body.lat, lon=body.long, device_id=light.device_id,
        now_ms=SYSTEM_CLOCK.now_ms(), description=body.description,
        address=body.address_string, email=body.email, first_name=body.first_name,
        last_name=body.last_name, media_url=body.media_url)
    limiter.failed(client)  # the window counts the reports accepted, not failures here
    notice = (f"Thank you: streetlight {light.device_id} has a work order "
              f"({order.id}){'' if new else ', already known to us'}.")
    return [Open311Accepted(service_request_id=report.id, service_notice=notice)]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def request_status(orders: WorkOrders, request_id: str) -> Open311Request | None:
    report = orders.get_report(request_id)
    if report is None:
        return None
    order = orders.get(report.order_id)
    assert order is not None  # written in one transaction with the report
    if order.state == "done":
        notes = f"repaired ({order.cause.replace('_', ' ')})" if order.cause else "closed"
    elif order.state == "assigned":
        notes = "a crew is assigned"
    else:
        notes = "reported; waiting for a crew"
    updated = max(t for t in (order.created_ms, order.assigned_ms, order.done_ms,
                              report.ts_ms) if t is not None)
    return Open311Request(
        service_request_id=report.id, status="closed" if order.state == "done" else "open",
        status_notes=f"{notes} (work order {order.id}, streetlight {report.device_id})",
        service_name=SERVICES.get(report.service_code, (report.service_code,))[0],
        service_code=report.service_code, description=report.description,
        agency_responsible=AGENCY, service_notice="", requested_datetime=_iso(report.ts_ms),
        updated_datetime=_iso(updated), address=report.address, lat=report.lat,
        long=report.lon, media_url=report.media_url)


@router.get("/api/v1/reports/{service_request_id}", response_model=list[Open311Request],
            responses={404: documented("No such request")})
@router.get(f"{OPEN311}/requests/{{service_request_id}}.json",
            response_model=list[Open311Request], responses={404: documented("No such request")})
def get_report(service_request_id: Annotated[str, PathParam(max_length=20,
                                                            examples=["SR-000007"])],
               orders: WorkOrdersDep) -> list[Open311Request]:
    """A request's status (Open311 GET request): open until its work order is done; no
    token needed, and no personal data in it."""
    found = request_status(orders, service_request_id)
    if found is None:
        raise HTTPException(404, f"no service request {service_request_id!r} "
                            "(ids look like SR-000007)")
    return [found]
