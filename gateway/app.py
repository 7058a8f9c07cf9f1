"""`citygrid gateway`: the operators' HTTP API (FastAPI). Errors are RFC 9457 problem details.

Access: bearer tokens with roles viewer < operator < admin, stored as SHA-256
hashes and created with `citygrid tokens create --role R`; every route but
`/health` needs one (401 without, 403 for too low a role).
"""

import contextlib
import json
import socket
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from citygrid.contract import ContractError
from citygrid.fleet import FleetDevice
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store import StoreError, open_store
from gateway.feed import CityFeed
from gateway.provisioning import Provisioner, ProvisioningError
from gateway.tokens import ROLES, Tokens

PROBLEM = "application/problem+json"

_ACKS = "CREATE TABLE IF NOT EXISTS alert_acks (key TEXT PRIMARY KEY, acked_ms INTEGER NOT NULL);"


class FailedTokenLimiter:
    """Guessing tokens is slow: after ``limit`` unknown tokens from one address within
    ``window_s``, that address gets 429 until the oldest failure leaves the window."""

    def __init__(self, limit: int = 10, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._failures.setdefault(client, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # forget quiet addresses, bound the memory
                for k in [k for k, q in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[k]

    def blocked_for(self, client: str) -> int:
        now = time.monotonic()
        with self._lock:
            q = self._recent(client, now)
            if len(q) < self.limit:
                return 0
            return max(1, int(q[-self.limit] + self.window_s - now + 0.999))


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


class DeviceChange(BaseModel):
    district: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    rated_w: Annotated[float, Field(gt=0, le=2000)] | None = None
    account_id: Annotated[str, Field(max_length=64)] | None = None
    tariff: Annotated[str, Field(max_length=64)] | None = None

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"rated_w": 55}]}}


class NewCredentials(BaseModel):
    device_id: str
    mqtt_username: str
    mqtt_password: str = Field(description="Shown once; only its hash is kept.")


class OverrideBody(BaseModel):
    level: Annotated[float, Field(ge=0, le=100, examples=[80])]
    expires_in_s: Annotated[float, Field(gt=0, le=31 * 86_400, examples=[3600])] | None = None


class OverrideAccepted(BaseModel):
    accepted: bool = True
    lights: list[str]


class RuleHealthOut(BaseModel):
    id: str
    description: str | None
    evaluations: int
    fired: int
    last_fired_ms: int | None
    errors: int
    last_error: str | None


class RuleText(BaseModel):
    name: str = "uploaded.yaml"
    text: Annotated[str, Field(max_length=1_000_000)]


class RuleValidation(BaseModel):
    ok: bool
    rules: list[str] = []
    problems: list[str] = []


class AlertOut(BaseModel):
    key: str
    rule: str
    severity: str
    message: str
    scope: str
    since_ms: int
    active: bool
    cleared_ms: int | None
    acknowledged_ms: int | None


class AlertAck(BaseModel):
    key: str
    acknowledged_ms: int


class AccountOut(BaseModel):
    account_id: str
    balance_minor: int
    low_balance_minor: int
    currency: str
    low: bool


class BucketOut(BaseModel):
    start_ms: int
    value: float | None


class Health(BaseModel):
    ok: bool
    broker: bool
    store: bool


class LedgerStatus(BaseModel):
    ok: bool
    entries: int
    head: str | None
    error: str | None = None


def _serve_docs(app: FastAPI) -> None:
    """Swagger UI from the installed swagger-ui-bundle: nothing loads from a CDN."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
              name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="CityGrid gateway",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _problem(status: int, title: str, detail: str | None, request: Request) -> JSONResponse:
    return JSONResponse(Problem(title=title, status=status, detail=detail,
                                instance=str(request.url.path)).model_dump(),
                        status_code=status, media_type=PROBLEM)


def create_app(settings: Settings) -> FastAPI:
    registry = Registry(settings.data_dir)
    provisioner = Provisioner(settings.data_dir, registry)
    tokens = Tokens(settings.data_dir)
    registry.db.executescript(_ACKS)
    store = open_store(settings)
    errors = {401: {"model": Problem, "description": "No or unknown bearer token"},
              403: {"model": Problem, "description": "The token's role is too low"},
              429: {"model": Problem, "description": "Too many unknown tokens from this "
                    "address lately (see Retry-After)"}}
    feed = CityFeed(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        feed.start()  # from the first moment: the status page lists commands it saw
        yield
        feed.close()

    app = FastAPI(title="CityGrid gateway", version="1.0.0", lifespan=lifespan,
                  description="The operators' API: devices, provisioning, lights and their "
                  "overrides, rules, alerts, billing. Every route but /health needs a bearer "
                  "token (`citygrid tokens create --role viewer|operator|admin`). Errors are "
                  "RFC 9457 problem details.",
                  docs_url=None, redoc_url=None,
                  responses={422: {"model": Problem, "description": "Invalid request"}})
    _serve_docs(app)

    def openapi() -> dict[str, Any]:
        """Errors are documented as what they are: application/problem+json."""
        from fastapi.openapi.utils import get_openapi

        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
        for ops in doc["paths"].values():
            for op in ops.values():
                for code, response in op.get("responses", {}).items():
                    if code[:1] in "45":
                        response["content"] = {PROBLEM: problem}
                        response.setdefault("description", "Problem")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = Problem.model_json_schema()
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    bearer = HTTPBearer(auto_error=False)
    # No `from __future__ import annotations` here: FastAPI must see the closures in the
    # route signatures' Annotated[…, Depends(role(...))] as objects, not strings.

    limiter = FailedTokenLimiter()

    def role(minimum: str):
        def check(request: Request,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
            if creds is None:
                raise HTTPException(401, "a bearer token is required",
                                    headers={"WWW-Authenticate": "Bearer"})
            client = request.client.host if request.client else "?"
            wait_s = limiter.blocked_for(client)
            if wait_s:
                raise HTTPException(429, f"too many unknown tokens from {client}; try again in "
                                    f"{wait_s} s", headers={"Retry-After": str(wait_s)})
            found = tokens.role(creds.credentials)
            if found is None:
                limiter.failed(client)
                raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
            if ROLES[found] < ROLES[minimum]:
                raise HTTPException(403, f"this needs the {minimum} role; the token is {found}")
            return found

        return check

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, exc: HTTPException) -> JSONResponse:
        response = _problem(exc.status_code, {401: "Unauthorized", 403: "Forbidden",
                                              404: "Not Found", 409: "Conflict",
                                              429: "Too Many Requests"}.get(
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
        latest = feed.snapshot()
        keys = ("device_id", "kind", "district", "lat", "lon", "rated_w", "account_id",
                "tariff", "status")
        # 10,000 devices: built as plain dicts and encoded by orjson (the response model
        # documents the shape; validating each item again would cost most of the time).
        body = [{**dict(zip(keys, r, strict=True)), "latest": latest.get(r[0])} for r in rows]
        return Response(orjson.dumps(body), media_type="application/json")

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
            creds = provisioner.provision(FleetDevice(**device.model_dump()))
        except (ContractError, ProvisioningError) as e:
            raise HTTPException(409, str(e)) from None
        return NewCredentials(device_id=device.device_id, mqtt_username=creds.username,
                              mqtt_password=creds.password)

    @app.patch("/api/v1/devices/{device_id}", response_model=Device, tags=["devices"],
               responses={**errors, 404: {"model": Problem, "description": "No such device"},
                          409: {"model": Problem, "description": "Not a valid change"}})
    def edit_device(device_id: Annotated[str, PathParam(max_length=64)], change: DeviceChange,
                    _: Annotated[str, Depends(role("admin"))]) -> Device:
        """Change a device's district, position, rated power, account or tariff."""
        from citygrid.contract import Topic

        row = registry.db.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone()
        if row is None:
            raise HTTPException(404, f"no device {device_id!r}")
        updates = change.model_dump(exclude_unset=True)
        if not updates:
            return _device(row, None)
        if "district" in updates:
            try:
                Topic(updates["district"], row[1], device_id)
            except ContractError as e:
                raise HTTPException(409, str(e)) from None
        with registry.db:
            registry.db.execute(
                "UPDATE devices SET " + ", ".join(f"{k} = ?" for k in updates)
                + " WHERE device_id = ?", (*updates.values(), device_id))
        if "district" in updates and row[8] == "provisioned":
            provisioner.write_broker_files()  # its topics moved with it
        row = registry.db.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone()
        return _device(row, feed.snapshot().get(device_id))

    @app.delete("/api/v1/devices/{device_id}/credentials", status_code=204, tags=["devices"],
                responses={**errors, 404: {"model": Problem, "description": "No such device"}})
    def revoke(device_id: Annotated[str, PathParam(max_length=64)],
               _: Annotated[str, Depends(role("admin"))]) -> Response:
        """Revoke a device: its MQTT account is gone and the broker reloads at once."""
        try:
            provisioner.revoke(device_id)
        except ProvisioningError as e:
            raise HTTPException(404, str(e)) from None
        return Response(status_code=204)

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

    # ------------------------------------------------------------------ lights

    publisher: dict[str, Any] = {}

    def publish(topic: str, payload: bytes) -> None:
        """Overrides go to the rule engine over MQTT (it arbitrates them above every rule)."""
        from citygrid import mqtt

        client = publisher.get("client")
        if client is None:
            client = publisher["client"] = mqtt.make_client(settings.mqtt, "citygrid-gateway")
            mqtt.connect(client, settings.mqtt)
            client.loop_start()
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)

    def _light(device_id: str) -> tuple:
        row = registry.db.execute("SELECT device_id, district FROM devices WHERE device_id = ? "
                                  "AND kind = 'streetlight'", (device_id,)).fetchone()
        if row is None:
            raise HTTPException(404, f"no streetlight {device_id!r}")
        return row

    def _send_override(device_id: str, district: str, body: dict) -> None:
        from citygrid.contract import Topic

        try:
            publish(str(Topic(district, "streetlight", device_id, "override")),
                    json.dumps(body).encode())
        except (OSError, RuntimeError, ValueError) as e:
            raise HTTPException(503, f"the broker did not take the override: {e}") from None

    light_errors = {**errors, 404: {"model": Problem, "description": "No such light"},
                    503: {"model": Problem, "description": "Broker unreachable"}}

    @app.put("/api/v1/lights/{device_id}/override", response_model=OverrideAccepted,
             status_code=202, tags=["lights"], responses=light_errors)
    def set_override(device_id: Annotated[str, PathParam(max_length=64)], body: OverrideBody,
                     _: Annotated[str, Depends(role("operator"))]) -> OverrideAccepted:
        """Hold a light at a level (optionally for a while); it wins over every rule."""
        _, district = _light(device_id)
        _send_override(device_id, district, {"level": body.level,
                                             "expires_in_s": body.expires_in_s})
        return OverrideAccepted(lights=[device_id])

    @app.delete("/api/v1/lights/{device_id}/override", response_model=OverrideAccepted,
                status_code=202, tags=["lights"], responses=light_errors)
    def clear_override(device_id: Annotated[str, PathParam(max_length=64)],
                       _: Annotated[str, Depends(role("operator"))]) -> OverrideAccepted:
        """End the operator's override: the rules decide again."""
        _, district = _light(device_id)
        _send_override(device_id, district, {"clear": True})
        return OverrideAccepted(lights=[device_id])

    @app.put("/api/v1/districts/{district}/override", response_model=OverrideAccepted,
             status_code=202, tags=["lights"], responses=light_errors)
    def district_override(district: Annotated[str, PathParam(max_length=64)],
                          body: OverrideBody, _: Annotated[str, Depends(role("operator"))]
                          ) -> OverrideAccepted:
        """The same override for every light of a district."""
        rows = registry.db.execute("SELECT device_id FROM devices WHERE district = ? AND "
                                   "kind = 'streetlight' ORDER BY device_id",
                                   (district,)).fetchall()
        if not rows:
            raise HTTPException(404, f"no streetlights in {district!r}")
        for (device_id,) in rows:
            _send_override(device_id, district, {"level": body.level,
                                                 "expires_in_s": body.expires_in_s})
        return OverrideAccepted(lights=[r[0] for r in rows])

    @app.get("/api/v1/lights/{device_id}/explain", tags=["lights"], responses=light_errors)
    def explain(device_id: Annotated[str, PathParam(max_length=64)],
                _: Annotated[str, Depends(role("viewer"))]) -> dict[str, Any]:
        """Why the light is at its level: the winning wish and every other, with expiries."""
        _light(device_id)
        return _engine().explain(device_id)

    def _engine():
        from citygrid.city import city
        from rules.loader import DEFAULT_RULES, load
        from rules.state import engine_from_state

        # No state yet (the engine has not run here): no wishes, the default level.
        return engine_from_state(load(settings.rules or DEFAULT_RULES), registry.fleet(),
                                 city(settings.city), Path(settings.data_dir) / "rules.sqlite")

    # ------------------------------------------------------------------ rules and alerts

    def _state_db(name: str) -> sqlite3.Connection | None:
        """A state database another service writes (rules, billing), if it exists yet."""
        path = Path(settings.data_dir) / name
        return sqlite3.connect(path) if path.exists() else None

    @app.get("/api/v1/rules", response_model=list[RuleHealthOut], tags=["rules"],
             responses=errors)
    def rules(_: Annotated[str, Depends(role("viewer"))]) -> list[RuleHealthOut]:
        """The running rules with their health."""
        from rules.loader import DEFAULT_RULES, load

        ruleset = load(settings.rules or DEFAULT_RULES)
        health: dict[str, tuple] = {}
        db = _state_db("rules.sqlite")
        if db is not None:
            with contextlib.suppress(sqlite3.OperationalError):
                health = {r[0]: r for r in db.execute("SELECT * FROM rule_health")}
            db.close()
        out = []
        for r in ruleset.rules:
            _, evals, fired, last, errs, last_error = health.get(r.id, (r.id, 0, 0, None, 0,
                                                                        None))
            out.append(RuleHealthOut(id=r.id, description=r.rule.description,
                                     evaluations=evals, fired=fired, last_fired_ms=last,
                                     errors=errs, last_error=last_error))
        return out

    @app.post("/api/v1/rules/validate", response_model=RuleValidation, tags=["rules"],
              responses=errors)
    def validate_rules(body: RuleText, _: Annotated[str, Depends(role("operator"))]
                       ) -> RuleValidation:
        """Check a rule file without applying it: every problem with line and column."""
        from rules.loader import RuleFileError, parse_text

        try:
            ruleset = parse_text(body.text, body.name)
        except RuleFileError as e:
            return RuleValidation(ok=False, problems=[str(p) for p in e.problems])
        return RuleValidation(ok=True, rules=[r.id for r in ruleset.rules])

    @app.get("/api/v1/alerts", response_model=list[AlertOut], tags=["alerts"],
             responses=errors)
    def alerts(_: Annotated[str, Depends(role("viewer"))], active: bool | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AlertOut]:
        """Active and recent alerts, newest first."""
        db = _state_db("rules.sqlite")
        if db is None:
            return []
        with contextlib.suppress(sqlite3.OperationalError):
            rows = db.execute("SELECT key, rule_id, severity, message, scope, since_ms, active, "
                              "cleared_ms FROM rule_alerts ORDER BY since_ms DESC").fetchall()
            db.close()
            acked = dict(registry.db.execute("SELECT key, acked_ms FROM alert_acks"))
            out = [AlertOut(key=k, rule=r, severity=sev, message=m, scope=sc, since_ms=since,
                            active=bool(a), cleared_ms=c, acknowledged_ms=acked.get(k))
                   for k, r, sev, m, sc, since, a, c in rows
                   if active is None or bool(a) == active]
            return out[:limit]
        return []

    @app.post("/api/v1/alerts/{key}/ack", response_model=AlertAck, tags=["alerts"],
              responses={**errors, 404: {"model": Problem, "description": "No such alert"}})
    def ack_alert(key: Annotated[str, PathParam(max_length=200)],
                  _: Annotated[str, Depends(role("operator"))]) -> AlertAck:
        """Acknowledge an alert (it stays until its condition clears)."""
        db = _state_db("rules.sqlite")
        found = None
        if db is not None:
            with contextlib.suppress(sqlite3.OperationalError):
                found = db.execute("SELECT 1 FROM rule_alerts WHERE key = ?", (key,)).fetchone()
            db.close()
        if not found:
            raise HTTPException(404, f"no alert {key!r}")
        now = int(time.time() * 1000)
        with registry.db:
            registry.db.execute("INSERT OR REPLACE INTO alert_acks VALUES (?, ?)", (key, now))
        return AlertAck(key=key, acknowledged_ms=now)

    # ------------------------------------------------------------------ billing, history

    @app.get("/api/v1/billing/accounts", response_model=list[AccountOut], tags=["billing"],
             responses=errors)
    def accounts(_: Annotated[str, Depends(role("viewer"))]) -> list[AccountOut]:
        """Accounts with their balances (minor units)."""
        db = _state_db("billing.sqlite")
        if db is None:
            return []
        with contextlib.closing(db):
            return [AccountOut(account_id=a, balance_minor=b, low_balance_minor=low,
                               currency=c, low=b < low) for a, b, low, c in
                    db.execute("SELECT * FROM accounts ORDER BY account_id")]

    @app.get("/api/v1/billing/settlements", tags=["billing"], responses=errors)
    def settlements(_: Annotated[str, Depends(role("viewer"))],
                    meter: Annotated[str | None, Query(max_length=64)] = None,
                    account: Annotated[str | None, Query(max_length=64)] = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """Ledger entries, newest first, each with its hash."""
        db = _state_db("billing.sqlite")
        if db is None:
            return []
        with contextlib.closing(db):
            return [{**json.loads(e), "hash": h} for e, h in db.execute(
                "SELECT entry, hash FROM ledger WHERE (?1 IS NULL OR json_extract(entry, "
                "'$.meter') = ?1) AND (?2 IS NULL OR json_extract(entry, '$.account') = ?2) "
                "ORDER BY seq DESC LIMIT ?3", (meter or None, account or None, limit))]

    @app.get("/api/v1/devices/{device_id}/history", response_model=list[BucketOut],
             tags=["devices"], responses={**errors, 404: {"model": Problem,
                                                           "description": "No such device"}})
    def history(device_id: Annotated[str, PathParam(max_length=64)],
                field: Annotated[str, Query(pattern=r"^[a-z0-9_]{1,64}$")],
                start_ms: int, end_ms: int,
                _: Annotated[str, Depends(role("viewer"))],
                fn: Literal["mean", "min", "max", "sum", "count", "last"] = "mean",
                every_s: Annotated[int, Query(ge=1, le=86_400 * 31)] = 300) -> list[BucketOut]:
        """A field of the device's readings in time buckets."""
        row = registry.db.execute("SELECT kind FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone()
        if row is None:
            raise HTTPException(404, f"no device {device_id!r}")
        if end_ms <= start_ms:
            raise HTTPException(422, "end_ms must be after start_ms")
        try:
            buckets = store.aggregate(row[0], field, fn, start_ms=start_ms, end_ms=end_ms,
                                      every_ms=every_s * 1000, device_id=device_id)
        except StoreError as e:
            raise HTTPException(503, f"the store did not answer: {e}") from None
        return [BucketOut(start_ms=b.start_ms, value=b.value) for b in buckets]

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             responses={**errors, 200: {"content": {"text/plain": {}},
                                        "description": "Prometheus text format"}})
    def metrics(_: Annotated[str, Depends(role("viewer"))]) -> Response:
        """Prometheus metrics of the gateway."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    from gateway.status import add_status

    add_status(app, settings, registry, store, feed, role, errors,
               ledger_status=lambda: ledger_status("viewer"),
               alerts=lambda **kw: alerts("viewer", **kw),
               settlements=lambda limit: settlements("viewer", limit=limit))
    return app
