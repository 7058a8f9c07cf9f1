"""The gateway's API: tokens and roles, problem details, devices with their latest reading."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from citygrid.city import COPENHAGEN
from citygrid.settings import Settings
from citygrid.store import Point
from citygrid.store.sqlite import SqliteStore
from gateway.app import create_app, create_token
from gateway.provisioning import Registry
from simulators.fleetgen import generate


@pytest.fixture
def api(tmp_path, mosquitto):
    settings = Settings(mqtt_url=mosquitto.url, data_dir=str(tmp_path))
    registry = Registry(tmp_path)
    registry.import_fleet(generate(COPENHAGEN, 5, 2, seed=1))
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    store.ensure_ready()
    store.write([Point("streetlight", {"device_id": "sl-00000", "district": "indre-by"},
                       {"seq": 7, "brightness_pct": 30.0, "power_w": 16.7}, 1_790_000_000_000)])
    tokens = {r: create_token(registry, r, f"test-{r}") for r in ("viewer", "operator", "admin")}
    client = TestClient(create_app(settings))
    yield client, tokens
    client.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_health_needs_no_token(api):
    client, _ = api
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"ok": True, "broker": True, "store": True}


@pytest.mark.parametrize("method, path, minimum", [
    ("get", "/api/v1/devices", "viewer"),
    ("get", "/api/v1/devices/sl-00000", "viewer"),
    ("get", "/api/v1/billing/ledger", "viewer"),
    ("post", "/api/v1/devices", "admin"),
])
def test_every_route_checks_its_role(api, method, path, minimum):
    client, tokens = api
    body = {"device_id": "sl-new", "kind": "streetlight", "district": "valby", "lat": 55.66,
            "lon": 12.5, "rated_w": 40}
    kwargs = {"json": body} if method == "post" else {}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Unauthorized"
    r = getattr(client, method)(path, headers=auth("cg_wrong"), **kwargs)
    assert r.status_code == 401
    order = ["viewer", "operator", "admin"]
    for role in order:
        r = getattr(client, method)(path, headers=auth(tokens[role]), **kwargs)
        if order.index(role) < order.index(minimum):
            assert r.status_code == 403 and minimum in r.json()["detail"]
        else:
            assert r.status_code in (200, 201), r.text
            break


def test_devices_with_their_latest_reading_and_filters(api):
    client, tokens = api
    r = client.get("/api/v1/devices", headers=auth(tokens["viewer"]))
    devices = r.json()
    assert len(devices) == 7
    first = next(d for d in devices if d["device_id"] == "sl-00000")
    assert first["latest"] == {"ts": 1_790_000_000_000, "seq": 7, "brightness_pct": 30.0,
                               "power_w": 16.7}
    meters = client.get("/api/v1/devices?kind=meter", headers=auth(tokens["viewer"])).json()
    assert {d["kind"] for d in meters} == {"meter"} and len(meters) == 2
    one = client.get("/api/v1/devices/sl-00000", headers=auth(tokens["viewer"])).json()
    assert one["latest"]["seq"] == 7


def test_errors_are_problem_details(api):
    client, tokens = api
    r = client.get("/api/v1/devices/nope", headers=auth(tokens["viewer"]))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json() == {"type": "about:blank", "title": "Not Found", "status": 404,
                        "detail": "no device 'nope'", "instance": "/api/v1/devices/nope"}
    r = client.get("/api/v1/devices?kind=toaster", headers=auth(tokens["viewer"]))
    assert r.status_code == 422 and "kind" in r.json()["detail"]
    r = client.post("/api/v1/devices", headers=auth(tokens["admin"]),
                    json={"device_id": "a/b", "kind": "meter", "district": "x", "lat": 1,
                          "lon": 1})
    assert r.status_code == 422 and "device_id" in r.json()["detail"]


def test_provisioning_returns_credentials_once(api, tmp_path):
    client, tokens = api
    r = client.post("/api/v1/devices", headers=auth(tokens["admin"]),
                    json={"device_id": "sl-new", "kind": "streetlight", "district": "valby",
                          "lat": 55.66, "lon": 12.5, "rated_w": 40})
    assert r.status_code == 201
    password = r.json()["mqtt_password"]
    assert password not in (tmp_path / "mosquitto" / "passwords").read_text()
    listed = client.get("/api/v1/devices/sl-new", headers=auth(tokens["viewer"])).json()
    assert listed["status"] == "provisioned" and "mqtt_password" not in listed
    assert password not in str(client.get("/api/v1/devices", headers=auth(tokens["admin"])).text)
