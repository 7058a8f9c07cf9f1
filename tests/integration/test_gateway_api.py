"""The gateway's API: tokens and roles, problem details, devices with their latest reading."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from cityctl.localservices import free_port
from citygrid.city import COPENHAGEN
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store import Point
from citygrid.store.sqlite import SqliteStore
from gateway.app import create_app
from gateway.tokens import create_token
from simulators.fleetgen import generate
from tests.helpers import NIGHT, Collector, light_reading, rules_fleet, wait_until


@pytest.fixture
def api(tmp_path, mosquitto):
    settings = Settings(mqtt_url=mosquitto.url, data_dir=str(tmp_path))
    registry = Registry(tmp_path)
    registry.import_fleet(generate(COPENHAGEN, 5, 2, seed=1))
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    store.ensure_ready()
    store.write([Point("streetlight", {"device_id": "sl-00000", "district": "indre-by"},
                       {"seq": 7, "brightness_pct": 30.0, "power_w": 16.7}, 1_790_000_000_000)])
    tokens = {r: create_token(tmp_path, r, f"test-{r}") for r in ("viewer", "operator", "admin")}
    with TestClient(create_app(settings)) as client:  # runs the lifespan: feed and
        yield client, tokens                           # publisher are closed after


# What answers without a token: health, and citizens' reports (Open311; gateway/routes/reports).
PUBLIC = {"/health", "/api/v1/services", "/api/v1/reports", "/api/v1/reports/{service_request_id}",
          "/open311/v2/services.json", "/open311/v2/requests.json",
          "/open311/v2/requests/{service_request_id}.json", "/api/v1/billing/payments/callback"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_health_needs_no_token(api):
    client, _ = api
    r = client.get("/health")
    body = r.json()
    node = body.get("broker_node")
    assert r.status_code == 200 and body == {"ok": True, "broker": True, "store": True,
                                             "broker_node": node, "broker_nodes": {node: True},
                                             "feed_node": body["feed_node"]}
    assert node is not None and node.startswith("127.0.0.1:")
    # The live feed connects in the background: on that node once it has.
    wait_until(lambda: client.get("/health").json()["feed_node"] == node, 10,
               message="the feed's node in health")


def test_health_names_each_node_of_a_cluster(tmp_path, mosquitto):
    down = free_port()
    settings = Settings(mqtt_url=f"mqtt://127.0.0.1:{down},127.0.0.1:{mosquitto.port}",
                        data_dir=str(tmp_path))
    SqliteStore(tmp_path / "telemetry.sqlite").ensure_ready()
    with TestClient(create_app(settings)) as client:
        body = client.get("/health").json()
        # The gateway's own feed, given the dead node first, is on the one that answers.
        wait_until(lambda: client.get("/health").json()["feed_node"]
                   == f"127.0.0.1:{mosquitto.port}", 10, message="the feed on the live node")
    assert body["broker"] and body["broker_node"] == f"127.0.0.1:{mosquitto.port}"
    assert body["broker_nodes"] == {f"127.0.0.1:{down}": False,
                                    f"127.0.0.1:{mosquitto.port}": True}


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


def test_an_override_reaches_the_light_and_clearing_returns_it_to_the_rules(
        mosquitto, uid, tmp_path, publisher):
    import time

    import orjson

    from citygrid.city import COPENHAGEN
    from citygrid.contract import Topic
    from rules.loader import DEFAULT_RULES
    from rules.runner import RuleRunner, RunnerConfig

    fleet = rules_fleet(uid)
    settings = Settings(mqtt_url=mosquitto.url, data_dir=str(tmp_path))
    registry = Registry(tmp_path)
    registry.import_fleet(fleet)
    token = create_token(tmp_path, "operator", "test")
    runner = RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(
        DEFAULT_RULES, f"city/v1/{uid}/+/+/telemetry", client_id=f"rules-{uid}"))
    runner.start()
    commands = Collector(mosquitto.url, f"city/v1/{uid}/streetlight/+/cmd")
    client = TestClient(create_app(settings))
    client.__enter__()  # the app's lifespan: its city feed and publisher closed at the end
    try:
        publisher.send(str(Topic(uid, "streetlight", "sl-1")), light_reading(1, NIGHT))
        wait_until(lambda: commands.messages, message="the baseline command")
        r = client.put("/api/v1/lights/sl-1/override", headers=auth(token),
                       json={"level": 80, "expires_in_s": 3600})
        assert r.status_code == 202 and r.json() == {"accepted": True, "lights": ["sl-1"]}
        wait_until(lambda: len(commands.messages) == 2, message="the override command")
        body = orjson.loads(commands.messages[1][1])
        assert (body["brightness_pct"], body["reason"]) == (80.0, "override:operator")
        time.sleep(0.5)  # the engine saves its state every 0.2 s
        explained = client.get("/api/v1/lights/sl-1/explain", headers=auth(token)).json()
        assert explained["winner"]["class"] == "override"
        assert [w["reason"] for w in explained["wishes"]] == ["override:operator",
                                                              "rule:dark-baseline"]
        r = client.delete("/api/v1/lights/sl-1/override", headers=auth(token))
        assert r.status_code == 202
        wait_until(lambda: len(commands.messages) == 3, message="back to the rules")
        body = orjson.loads(commands.messages[2][1])
        assert (body["brightness_pct"], body["reason"]) == (30.0, "rule:dark-baseline")
        r = client.put(f"/api/v1/districts/{uid}/override", headers=auth(token),
                       json={"level": 10})
        assert r.json()["lights"] == ["sl-1", "sl-2", "sl-3"]
        wait_until(lambda: len(commands.messages) == 6, message="the district override")
        assert {orjson.loads(p)["reason"] for _, p, _ in commands.messages[3:]} == {
            "override:operator"}
        rules = client.get("/api/v1/rules", headers=auth(token)).json()
        assert {r["id"] for r in rules} >= {"dark-baseline", "motion-boost", "settle-meters"}
    finally:
        client.__exit__(None, None, None)
        runner.stop()
        commands.close()


def test_rules_validation_alerts_billing_history_metrics(api, tmp_path):
    client, tokens = api
    bad = client.post("/api/v1/rules/validate", headers=auth(tokens["operator"]),
                      json={"name": "mine.yaml", "text": "rules:\n  - id: X\n"})
    assert bad.status_code == 200 and not bad.json()["ok"]
    assert any(p.startswith("mine.yaml:2:") for p in bad.json()["problems"])
    good = client.post("/api/v1/rules/validate", headers=auth(tokens["operator"]),
                       json={"text": (__import__("rules.loader").loader.DEFAULT_RULES
                                      .read_text())})
    assert good.json()["ok"] and "motion-boost" in good.json()["rules"]
    assert client.get("/api/v1/alerts", headers=auth(tokens["viewer"])).json() == []
    assert client.post("/api/v1/alerts/nope/ack",
                       headers=auth(tokens["operator"])).status_code == 404
    assert client.get("/api/v1/billing/accounts", headers=auth(tokens["viewer"])).json() == []
    hist = client.get("/api/v1/devices/sl-00000/history", headers=auth(tokens["viewer"]),
                      params={"field": "power_w", "start_ms": 1_789_999_000_000,
                              "end_ms": 1_790_001_000_000, "every_s": 3600})
    assert hist.status_code == 200 and hist.json() == [
        {"start_ms": 1_789_999_200_000, "value": 16.7}]
    bad_range = client.get("/api/v1/devices/sl-00000/history", headers=auth(tokens["viewer"]),
                           params={"field": "power_w", "start_ms": 5, "end_ms": 1})
    assert bad_range.status_code == 422
    m = client.get("/metrics", headers=auth(tokens["viewer"]))
    assert m.status_code == 200 and "python_info" in m.text
    assert re.search(r'citygrid_gateway_requests_total\{[^}]*route="/api/v1/devices/\{device_id\}'
                     r'/history"[^}]*status="200"\} 1\.0', m.text)  # the gateway's own
    assert 'citygrid_registry_devices{kind="streetlight"} 5.0' in m.text


def test_billing_accounts_settlements_and_ledger_status(api, tmp_path):
    from billing import config as billing_config
    from billing.ledger import BillingStore

    client, tokens = api
    fleet = Registry(tmp_path).fleet()
    meter = fleet.of_kind("meter")[0]
    billing = BillingStore(tmp_path / "billing.sqlite", billing_config.load(), fleet,
                           COPENHAGEN.tz)
    billing.on_reading(meter.device_id, 1_790_000_000_000, 100.0)
    billing.on_reading(meter.device_id, 1_790_003_600_000, 112.0)
    [s] = billing.settle(meter.device_id, 1_790_003_600_000)
    billing.close()
    accounts = client.get("/api/v1/billing/accounts", headers=auth(tokens["viewer"])).json()
    assert accounts == [{"account_id": meter.account_id,
                         "balance_minor": 100_000 - s.entry["amount_minor"],
                         "low_balance_minor": 10_000, "currency": "DKK", "low": False}]
    [entry] = client.get("/api/v1/billing/settlements", headers=auth(tokens["viewer"]),
                         params={"meter": meter.device_id}).json()
    assert entry["hash"] == s.hash and entry["kwh"] == "12.000000"
    status = client.get("/api/v1/billing/ledger", headers=auth(tokens["viewer"])).json()
    assert status == {"ok": True, "entries": 1, "head": s.hash, "error": None}


def test_docs_are_served_without_a_cdn(api):
    client, _ = api
    page = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/api/v1/devices", "/api/v1/lights/{device_id}/override", "/api/v1/alerts",
            "/api/v1/billing/accounts", "/api/v1/rules/validate", "/health"} <= paths
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path not in PUBLIC:
                assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_no_route_but_health_answers_without_a_token_and_writes_need_more_than_viewer(api):
    client, tokens = api
    spec = client.get("/openapi.json").json()
    samples = {"device_id": "sl-00000", "district": "indre-by", "key": "x",
               "order_id": "WO-000001", "meter_id": "m-00000", "number": "INV-2026-000001",
               "account": "acc-00000", "account_id": "acc-00000"}
    checked = 0
    for path, ops in spec["paths"].items():
        if path in PUBLIC:
            continue
        url = path.format(**samples)
        for method in ops:
            r = client.request(method.upper(), url, json={"level": 50, "text": "rules: []",
                                                          "device_id": "sl-z"})
            assert r.status_code == 401, (method, path)
            if method != "get":  # every write needs operator or admin
                r = client.request(method.upper(), url, headers=auth(tokens["viewer"]),
                                   json={"level": 50, "text": "rules: []"})
                assert r.status_code == 403, (method, path, r.status_code)
            checked += 1
    assert checked >= 15


def test_the_device_list_follows_live_telemetry(api, publisher):
    import time


    client, tokens = api

    def latest_seq():
        devices = client.get("/api/v1/devices", headers=auth(tokens["viewer"])).json()
        return next(d for d in devices if d["device_id"] == "sl-00000")["latest"]["seq"]

    assert latest_seq() == 7  # from the store, at first
    time.sleep(0.5)  # the gateway's telemetry subscription is up
    publisher.send("city/v1/indre-by/streetlight/sl-00000/telemetry",
                   {"ts": 1_790_000_060_000, "seq": 8, "brightness_pct": 30, "power_w": 16.7,
                    "energy_wh": 1, "lux": 1, "motion": False})
    wait_until(lambda: latest_seq() == 8, message="the new reading in the list")


def test_devices_are_editable_and_revocable_through_the_api(api, tmp_path):
    client, tokens = api
    admin = auth(tokens["admin"])
    r = client.patch("/api/v1/devices/sl-00001", headers=admin, json={"rated_w": 77})
    assert r.status_code == 200 and r.json()["rated_w"] == 77
    r = client.patch("/api/v1/devices/sl-00001", headers=admin, json={"colour": "red"})
    assert r.status_code == 422
    r = client.patch("/api/v1/devices/nope", headers=admin, json={"rated_w": 1})
    assert r.status_code == 404
    client.post("/api/v1/devices", headers=admin, json={
        "device_id": "sl-z", "kind": "streetlight", "district": "valby", "lat": 55.6,
        "lon": 12.5, "rated_w": 40})
    assert "sl-z:" in (tmp_path / "mosquitto" / "passwords").read_text()
    client.patch("/api/v1/devices/sl-z", headers=admin, json={"district": "amager"})
    assert "city/v1/amager/streetlight/sl-z/telemetry" in (tmp_path / "mosquitto" / "acl"
                                                          ).read_text()
    assert client.delete("/api/v1/devices/sl-z/credentials", headers=admin).status_code == 204
    assert "sl-z:" not in (tmp_path / "mosquitto" / "passwords").read_text()
    assert client.get("/api/v1/devices/sl-z", headers=admin).json()["status"] == "revoked"
