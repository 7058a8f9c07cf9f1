"""The gateway's API over fakes: a fake store, feed and publisher (and a real registry, which is
only SQLite) handed to ``create_app``; no broker, no InfluxDB."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from citygrid.fleet import FleetDevice
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store import Bucket, Point, StoreError, StoreUnavailable
from gateway.app import create_app
from gateway.tokens import create_token
from tests.helpers import wait_until

PROBLEM = "application/problem+json"


class FakeStore:
    def __init__(self) -> None:
        self.buckets = [Bucket(1_790_000_000_000, 12.5), Bucket(1_790_000_300_000, None)]
        self.failing: StoreError | None = None
        self.calls: list[tuple] = []

    def _check(self) -> None:
        if self.failing is not None:
            raise self.failing

    def latest(self, measurement: str, *, district: str | None = None,
               device_id: str | None = None) -> dict[str, Point]:
        self._check()
        return {"sl-1": Point(measurement, {"device_id": "sl-1"}, {"seq": 3, "power_w": 9.0},
                              1_790_000_000_000)} if device_id in (None, "sl-1") else {}

    def aggregate(self, measurement: str, field: str, fn: str, *, start_ms: int, end_ms: int,
                  every_ms: int, **tags: Any) -> list[Bucket]:
        self.calls.append((measurement, field, fn, start_ms, end_ms, every_ms, tags))
        self._check()
        return self.buckets if measurement != "citygrid_lighting" else []

    def count(self, measurement: str, **kw: Any) -> int:
        self._check()
        return 0


class FakeFeed:
    def __init__(self, latest: dict[str, dict[str, Any]]) -> None:
        self.latest = latest
        self.started = self.closed = 0

    def start(self) -> None:
        self.started += 1

    def node(self) -> str | None:
        return "127.0.0.1:1883" if self.started else None

    def close(self) -> None:
        self.closed += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.latest)

    def changes(self, since: int) -> dict[str, Any]:
        return {"version": 1, "devices": {} if since else self.latest, "commands": [],
                "settlements": []}

    def newest_ts(self) -> int | None:
        return max((r["ts"] for r in self.latest.values()), default=None)


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.failing: Exception | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        if self.failing is not None:
            raise self.failing
        self.sent.append((topic, orjson.loads(payload)))


@pytest.fixture
def gw(tmp_path):
    registry = Registry(tmp_path)
    for d in (FleetDevice("sl-1", "streetlight", "valby", 55.66, 12.5, rated_w=40),
              FleetDevice("sl-2", "streetlight", "valby", 55.67, 12.5, rated_w=40),
              FleetDevice("sl-3", "streetlight", "amager", 55.65, 12.6, rated_w=40),
              FleetDevice("m-1", "meter", "valby", 55.66, 12.51, account_id="acc-1",
                          tariff="residential")):
        registry.upsert(d)
    store, publisher = FakeStore(), FakePublisher()
    feed = FakeFeed({"sl-1": {"ts": 1_790_000_000_000, "brightness_pct": 30.0, "power_w": 12}})
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path))
    app = create_app(settings, store=store, registry=registry, feed=feed, publisher=publisher)
    tokens = {r: {"Authorization": f"Bearer {create_token(tmp_path, r, r)}"}
              for r in ("viewer", "operator", "admin")}
    with TestClient(app) as client:
        yield client, tokens, store, feed, publisher
    assert feed.started and feed.closed  # the app's lifespan starts and closes the feed
    registry.close()


def test_an_override_reaches_the_publisher_on_the_lights_topic(gw):
    client, tokens, _, _, publisher = gw
    r = client.put("/api/v1/lights/sl-1/override", headers=tokens["operator"],
                   json={"level": 80, "expires_in_s": 3600})
    assert r.status_code == 202 and r.json() == {"accepted": True, "lights": ["sl-1"]}
    assert publisher.sent == [("city/v1/valby/streetlight/sl-1/override",
                               {"level": 80.0, "expires_in_s": 3600.0})]
    assert client.delete("/api/v1/lights/sl-1/override",
                         headers=tokens["operator"]).status_code == 202
    assert publisher.sent[-1] == ("city/v1/valby/streetlight/sl-1/override", {"clear": True})
    r = client.put("/api/v1/districts/valby/override", headers=tokens["operator"],
                   json={"level": 10})
    assert r.json()["lights"] == ["sl-1", "sl-2"]
    assert [t for t, _ in publisher.sent[-2:]] == ["city/v1/valby/streetlight/sl-1/override",
                                                   "city/v1/valby/streetlight/sl-2/override"]
    assert publisher.sent[-1][1] == {"level": 10.0, "expires_in_s": None}


def test_overrides_of_what_is_not_a_light_or_a_broker_that_refuses_are_problems(gw):
    client, tokens, _, _, publisher = gw
    for path in ("/api/v1/lights/m-1/override", "/api/v1/lights/nope/override",
                 "/api/v1/districts/nowhere/override"):
        r = client.put(path, headers=tokens["operator"], json={"level": 50})
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, path
    publisher.failing = OSError("connection refused")
    r = client.put("/api/v1/lights/sl-1/override", headers=tokens["operator"],
                   json={"level": 50})
    assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
    assert "connection refused" in r.json()["detail"]
    assert publisher.sent == []


def test_listing_devices_includes_the_feeds_latest_reading(gw):
    client, tokens, _, feed, _ = gw
    devices = client.get("/api/v1/devices", headers=tokens["viewer"]).json()
    assert [d["device_id"] for d in devices] == ["m-1", "sl-1", "sl-2", "sl-3"]
    one = next(d for d in devices if d["device_id"] == "sl-1")
    assert one == {"device_id": "sl-1", "kind": "streetlight", "district": "valby",
                   "lat": 55.66, "lon": 12.5, "rated_w": 40.0, "account_id": None,
                   "tariff": None, "status": "registered", "device_profile": None,
                   "native_id": None, "road": None, "cabinet": None, "lamp_type": None,
                   "latest": feed.latest["sl-1"]}
    assert next(d for d in devices if d["device_id"] == "sl-2")["latest"] is None
    valby = client.get("/api/v1/devices", params={"district": "valby", "kind": "streetlight"},
                       headers=tokens["viewer"]).json()
    assert [d["device_id"] for d in valby] == ["sl-1", "sl-2"]
    single = client.get("/api/v1/devices/sl-1", headers=tokens["viewer"]).json()
    assert single["latest"] == {"ts": 1_790_000_000_000, "seq": 3, "power_w": 9.0}  # the store


def test_history_returns_the_stores_buckets_and_a_store_error_is_a_503_problem(gw):
    client, tokens, store, _, _ = gw
    params = {"field": "power_w", "start_ms": 1_789_999_000_000, "end_ms": 1_790_001_000_000,
              "fn": "max", "every_s": 300}
    r = client.get("/api/v1/devices/sl-1/history", headers=tokens["viewer"], params=params)
    assert r.status_code == 200
    assert r.json() == [{"start_ms": 1_790_000_000_000, "value": 12.5},
                        {"start_ms": 1_790_000_300_000, "value": None}]
    assert store.calls[-1] == ("streetlight", "power_w", "max", 1_789_999_000_000,
                               1_790_001_000_000, 300_000, {"device_id": "sl-1"})
    store.failing = StoreUnavailable("influxd is down")
    r = client.get("/api/v1/devices/sl-1/history", headers=tokens["viewer"], params=params)
    assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
    assert r.json() == {"type": "about:blank", "title": "Error", "status": 503,
                        "detail": "the store did not answer: influxd is down",
                        "instance": "/api/v1/devices/sl-1/history"}
    r = client.get("/api/v1/devices/nope/history", headers=tokens["viewer"], params=params)
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM


def test_a_missing_unknown_or_too_low_token_is_a_problem(gw):
    client, tokens, _, _, publisher = gw
    r = client.get("/api/v1/devices")
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["title"] == "Unauthorized"
    r = client.get("/api/v1/devices", headers={"Authorization": "Bearer cg_nobody"})
    assert r.status_code == 401 and r.json()["detail"] == "unknown token"
    r = client.put("/api/v1/lights/sl-1/override", headers=tokens["viewer"], json={"level": 5})
    assert r.status_code == 403 and r.headers["content-type"] == PROBLEM
    assert r.json() == {"type": "about:blank", "title": "Forbidden", "status": 403,
                        "detail": "this needs the operator role; the token is viewer",
                        "instance": "/api/v1/lights/sl-1/override"}
    r = client.post("/api/v1/devices", headers=tokens["operator"], json={
        "device_id": "sl-9", "kind": "streetlight", "district": "valby", "lat": 55.6,
        "lon": 12.5})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    assert publisher.sent == []


def test_guessing_tokens_gets_429_with_retry_after(gw):
    client, tokens, _, _, _ = gw
    for _ in range(10):
        assert client.get("/api/v1/devices",
                          headers={"Authorization": "Bearer cg_guess"}).status_code == 401
    r = client.get("/api/v1/devices", headers=tokens["viewer"])
    assert r.status_code == 429 and r.headers["content-type"] == PROBLEM
    assert 1 <= int(r.headers["retry-after"]) <= 60


def _sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from the Prometheus text format (labels in any order)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m[1] == name:
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            if found == labels:
                return float(m[3])
    return None


def test_metrics_are_the_gateways_own(gw, tmp_path):
    client, tokens, store, _, _ = gw
    params = {"field": "power_w", "start_ms": 1, "end_ms": 2}
    for _ in range(3):
        client.get("/api/v1/devices/sl-1/history", headers=tokens["viewer"], params=params)
    client.get("/api/v1/devices/nope", headers=tokens["viewer"])
    client.get("/api/v1/devices")
    client.get("/no/such/path")
    store.failing = StoreError("down")
    client.get("/api/v1/devices/sl-1/history", headers=tokens["viewer"], params=params)
    text = client.get("/metrics", headers=tokens["viewer"]).text
    history = "/api/v1/devices/{device_id}/history"
    assert _sample(text, "citygrid_gateway_requests_total", route=history, method="GET",
                   status="200") == 3
    assert _sample(text, "citygrid_gateway_requests_total", route=history, method="GET",
                   status="503") == 1
    assert _sample(text, "citygrid_gateway_requests_total", route="/api/v1/devices/{device_id}",
                   method="GET", status="404") == 1
    assert _sample(text, "citygrid_gateway_requests_total", route="/api/v1/devices",
                   method="GET", status="401") == 1
    assert _sample(text, "citygrid_gateway_requests_total", route="<unmatched>",
                   method="GET", status="404") == 1
    assert _sample(text, "citygrid_gateway_request_duration_seconds_count", route=history,
                   method="GET") == 4
    assert _sample(text, "citygrid_gateway_store_errors_total", operation="aggregate") == 1
    assert _sample(text, "citygrid_gateway_live_clients") == 0
    assert _sample(text, "citygrid_registry_devices", kind="streetlight") == 3
    assert _sample(text, "citygrid_registry_devices", kind="meter") == 1
    assert "python_info" in text  # the process figures are still there
    # Each app counts for itself.
    other = create_app(Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path)),
                       store=FakeStore(), registry=Registry(tmp_path), feed=FakeFeed({}),
                       publisher=FakePublisher())
    with TestClient(other) as fresh:
        text = fresh.get("/metrics", headers=tokens["viewer"]).text
    assert _sample(text, "citygrid_gateway_requests_total", route=history, method="GET",
                   status="200") is None


def _rules_state_with_alerts(data_dir) -> None:
    """The rule engine's state database with three alerts, as `rules run` would leave it."""
    from rules.state import RuleStateStore

    RuleStateStore(data_dir / "rules.sqlite").close()
    with sqlite3.connect(data_dir / "rules.sqlite") as db:
        db.executemany("INSERT INTO rule_alerts VALUES (?, ?, 'warning', ?, 'city', ?, '[]', ?, ?)",
                       [("a:old", "lamp-fault", "old", 1_000, 1, None),
                        ("a:cleared", "lamp-fault", "cleared", 2_000, 0, 2_500),
                        ("a:new", "lamp-fault", "new", 3_000, 1, None)])


def test_alerts_filter_and_limit_and_acknowledge(gw, tmp_path):
    client, tokens, _, _, _ = gw
    assert client.get("/api/v1/alerts", headers=tokens["viewer"]).json() == []
    _rules_state_with_alerts(tmp_path)
    keys = lambda **p: [a["key"] for a in client.get(  # noqa: E731
        "/api/v1/alerts", headers=tokens["viewer"], params=p).json()]
    assert keys() == ["a:new", "a:cleared", "a:old"]
    assert keys(active=True) == ["a:new", "a:old"]
    assert keys(active=False) == ["a:cleared"]
    assert keys(active=True, limit=1) == ["a:new"]
    r = client.post("/api/v1/alerts/a:old/ack", headers=tokens["operator"])
    assert r.status_code == 200 and r.json()["key"] == "a:old"
    [old] = [a for a in client.get("/api/v1/alerts", headers=tokens["viewer"]).json()
             if a["key"] == "a:old"]
    assert old["acknowledged_ms"] == r.json()["acknowledged_ms"] and old["active"]
    assert client.post("/api/v1/alerts/nope/ack", headers=tokens["operator"]).status_code == 404


def test_the_status_summary_comes_from_the_queries(gw, tmp_path):
    client, tokens, store, _, _ = gw
    _rules_state_with_alerts(tmp_path)
    store.failing = StoreUnavailable("influxd is down")
    s = client.get("/api/v1/status", headers=tokens["viewer"]).json()
    assert s["devices"] == {"streetlights": 3, "meters": 1}
    assert s["window"]["end_ms"] == 1_790_000_000_000  # the feed's newest reading
    assert s["store_error"] == "influxd is down" and s["lighting"] is None
    assert [a["key"] for a in s["alerts"]] == ["a:new", "a:old"]
    assert s["ledger"] == {"ok": True, "entries": 0, "head": None, "error": None}
    assert s["settlements"] == []


def test_live_feed_clients_are_counted(gw):
    client, tokens, _, feed, _ = gw

    def live() -> float | None:
        return _sample(client.get("/metrics", headers=tokens["viewer"]).text,
                       "citygrid_gateway_live_clients")

    with client.stream("GET", "/api/v1/stream", headers=tokens["viewer"]) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: snapshot"
        assert orjson.loads(next(lines).removeprefix("data: "))["devices"] == feed.latest
        assert live() == 1
    wait_until(lambda: live() == 0, 10, message="the stream's end counted")


def test_an_edit_that_clears_a_district_or_position_is_a_422_problem_not_a_500(gw):
    client, tokens, _, _, _ = gw
    for body in ({"lat": None}, {"lon": None, "rated_w": 30}, {"district": None}):
        r = client.patch("/api/v1/devices/sl-1", headers=tokens["admin"], json=body)
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, body
        assert "cannot be null" in r.json()["detail"]
    # A streetlight without rated power is refused as the fleet file refuses it.
    r = client.patch("/api/v1/devices/sl-1", headers=tokens["admin"], json={"rated_w": None})
    assert r.status_code == 422 and "a streetlight needs rated_w" in r.json()["detail"]
    r = client.patch("/api/v1/devices/sl-1", headers=tokens["admin"], json={"lat": 555})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert client.get("/api/v1/devices/sl-1", headers=tokens["viewer"]).json()["lat"] == 55.66
