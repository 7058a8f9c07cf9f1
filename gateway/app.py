"""`citygrid gateway`: the operators' HTTP API (FastAPI). Errors are RFC 9457 problem details.

Access: bearer tokens with roles viewer < operator < admin, stored as SHA-256
hashes and created with `citygrid tokens create --role R`; every route but
`/health` needs one (401 without, 403 for too low a role).
"""

import contextlib
import hashlib
import secrets
import socket
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from citygrid.contract import ContractError
from citygrid.fleet import FleetDevice
from citygrid.settings import Settings
from citygrid.store import StoreError, open_store
from gateway.provisioning import ProvisioningError, Registry

ROLES = {"viewer": 1, "operator": 2, "admin": 3}
PROBLEM = "application/problem+json"

_TOKENS = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_ms INTEGER NOT NULL);
"""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(registry: Registry, role: str, name: str) -> str:
    """A new bearer token; only its hash is kept, the token is shown once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = "cg_" + secrets.token_urlsafe(32)
    registry.db.executescript(_TOKENS)
    with registry.db:
        registry.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)",
                            (_digest(token), name, role, int(time.time() * 1000)))
    return token


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


class Device(BaseModel):
    device_id: str
    kind: Literal["streetlight", "meter"]
    district: str
    lat: float
    lon: float
    status: str = "registered"
    rated_w: float | None = None
    account_id: str | None = None
    tariff: str | None = None
    latest: dict[str, Any] | None = Field(None, description="The newest stored reading.")


class NewDevice(BaseModel):
    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["sl-10001"])]
    kind: Literal["streetlight", "meter"]
    district: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["norrebro"])]
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    rated_w: Annotated[float, Field(gt=0, le=2000)] | None = None
    account_id: str | None = None
    tariff: str | None = None


class NewCredentials(BaseModel):
    device_id: str
    mqtt_username: str
    mqtt_password: str = Field(description="Shown once; only its hash is kept.")


class Health(BaseModel):
    ok: bool
    broker: bool
    store: bool


class LedgerStatus(BaseModel):
    ok: bool
    entries: int
    head: str | None
    error: str | None = None


def _problem(status: int, title: str, detail: str | None, request: Request) -> JSONResponse:
    return JSONResponse(Problem(title=title, status=status, detail=detail,
                                instance=str(request.url.path)).model_dump(),
                        status_code=status, media_type=PROBLEM)


def create_app(settings: Settings) -> FastAPI:
    registry = Registry(settings.data_dir)
    registry.db.executescript(_TOKENS)
    store = open_store(settings)
    errors = {401: {"model": Problem, "description": "No or unknown bearer token"},
              403: {"model": Problem, "description": "The token's role is too low"}}
    app = FastAPI(title="CityGrid gateway", version="1.0.0",
                  description="The operators' API: devices, provisioning, billing status.",
                  responses={422: {"model": Problem, "description": "Invalid request"}})
    bearer = HTTPBearer(auto_error=False)
    # No `from __future__ import annotations` here: FastAPI must see the closures in the
    # route signatures' Annotated[…, Depends(role(...))] as objects, not strings.

    def role(minimum: str):
        def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
            if creds is None:
                raise HTTPException(401, "a bearer token is required",
                                    headers={"WWW-Authenticate": "Bearer"})
            row = registry.db.execute("SELECT role FROM tokens WHERE hash = ?",
                                      (_digest(creds.credentials),)).fetchone()
            if row is None:
                raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
            if ROLES[row[0]] < ROLES[minimum]:
                raise HTTPException(403, f"this needs the {minimum} role; the token is {row[0]}")
            return row[0]

        return check

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, exc: HTTPException) -> JSONResponse:
        response = _problem(exc.status_code, {401: "Unauthorized", 403: "Forbidden",
                                              404: "Not Found", 409: "Conflict"}.get(
            exc.status_code, "Error"), str(exc.detail), request)
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                           for e in exc.errors())
        return _problem(422, "Invalid request", detail, request)

    @app.get("/health", response_model=Health, tags=["health"])
    def health() -> Health:
        """Whether the broker and the store answer (no token needed)."""
        broker = False
        try:
            with socket.create_connection((settings.mqtt.host, settings.mqtt.port), timeout=1):
                broker = True
        except OSError:
            pass
        try:
            store.count("streetlight")
            store_ok = True
        except StoreError:
            store_ok = False
        return Health(ok=broker and store_ok, broker=broker, store=store_ok)

    def _device(row: tuple, latest: dict | None) -> Device:
        keys = ("device_id", "kind", "district", "lat", "lon", "rated_w", "account_id",
                "tariff", "status")
        return Device(**dict(zip(keys, row, strict=True)), latest=latest)

    _COLUMNS = "device_id, kind, district, lat, lon, rated_w, account_id, tariff, status"

    @app.get("/api/v1/devices", response_model=list[Device], tags=["devices"],
             responses=errors)
    def list_devices(_: Annotated[str, Depends(role("viewer"))],
                     kind: Literal["streetlight", "meter"] | None = None,
                     district: Annotated[str | None, Query(max_length=64)] = None,
                     status: Annotated[str | None, Query(max_length=32)] = None
                     ) -> list[Device]:
        """Registered devices with their latest reading; filter by kind, district, status."""
        sql, args = f"SELECT {_COLUMNS} FROM devices WHERE 1=1", []
        for column, value in (("kind", kind), ("district", district), ("status", status)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        rows = registry.db.execute(sql + " ORDER BY device_id", args).fetchall()
        latest: dict[str, Any] = {}
        for k in {r[1] for r in rows}:
            with contextlib.suppress(StoreError):  # the registry answers even if the store won't
                latest.update({d: {"ts": p.ts_ms, **p.fields} for d, p in
                               store.latest(k, district=district).items()})
        return [_device(r, latest.get(r[0])) for r in rows]

    @app.get("/api/v1/devices/{device_id}", response_model=Device, tags=["devices"],
             responses={**errors, 404: {"model": Problem, "description": "No such device"}})
    def one_device(device_id: Annotated[str, PathParam(max_length=64)],
                   _: Annotated[str, Depends(role("viewer"))]) -> Device:
        """One device with its latest reading."""
        row = registry.db.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone()
        if row is None:
            raise HTTPException(404, f"no device {device_id!r}")
        try:
            point = store.latest(row[1], device_id=device_id).get(device_id)
        except StoreError:
            point = None
        return _device(row, {"ts": point.ts_ms, **point.fields} if point else None)

    @app.post("/api/v1/devices", response_model=NewCredentials, status_code=201,
              tags=["devices"], responses={**errors, 409: {"model": Problem,
                                                           "description": "Not provisionable"}})
    def provision(device: NewDevice, _: Annotated[str, Depends(role("admin"))]
                  ) -> NewCredentials:
        """Register a device and return its MQTT credentials — once."""
        try:
            creds = registry.provision(FleetDevice(**device.model_dump()))
        except (ContractError, ProvisioningError) as e:
            raise HTTPException(409, str(e)) from None
        return NewCredentials(device_id=device.device_id, mqtt_username=creds.username,
                              mqtt_password=creds.password)

    @app.get("/api/v1/billing/ledger", response_model=LedgerStatus, tags=["billing"],
             responses=errors)
    def ledger_status(_: Annotated[str, Depends(role("viewer"))]) -> LedgerStatus:
        """Whether the ledger's hash chain verifies, its size and head."""
        from billing.ledger import LedgerError, verify

        path = Path(settings.data_dir) / "billing.sqlite"
        if not path.exists():
            return LedgerStatus(ok=True, entries=0, head=None)
        try:
            count, head = verify(path)
        except LedgerError as e:
            return LedgerStatus(ok=False, entries=0, head=None, error=str(e))
        return LedgerStatus(ok=True, entries=count, head=head)

    return app
