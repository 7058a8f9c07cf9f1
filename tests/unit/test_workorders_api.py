"""The work-order API and citizens' reports (Open311) over the gateway with fakes: a real
registry and maintenance store (SQLite), no broker, no InfluxDB."""

from __future__ import annotations

import csv
import io
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient

from citygrid.fleet import FleetDevice
from citygrid.maintenance import WorkOrders, cabinet_trigger, device_trigger
from citygrid.registry import Registry
from citygrid.settings import Settings
from gateway.app import create_app
from gateway.tokens import create_token
from tests.unit.test_gateway_fakes import PROBLEM, FakeFeed, FakePublisher, FakeStore

H = 3_600_000
T0 = 1_790_000_000_000
LIGHTS = [FleetDevice("sl-1", "streetlight", "valby", 55.66, 12.5, rated_w=40, cabinet="cab-v1"),
          FleetDevice("sl-2", "streetlight", "valby", 55.67, 12.5, rated_w=40, cabinet="cab-v1"),
          FleetDevice("sl-3", "streetlight", "amager", 55.65, 12.6, rated_w=40)]
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def wo(tmp_path):
    registry = Registry(tmp_path)
    registry.upsert_many(LIGHTS)
    orders = WorkOrders(tmp_path)
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path))
    app = create_app(settings, store=FakeStore(), registry=registry, feed=FakeFeed({}),
                     publisher=FakePublisher(), workorders=orders)
    tokens = {r: {"Authorization": f"Bearer {create_token(tmp_path, r, f'{r}-ann')}"}
              for r in ("viewer", "operator")}
    with TestClient(app) as client:
        yield client, tokens, orders
    orders.close()
    registry.close()


def _problem(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    for word in words:
        assert word in body["detail"], body
    return body


def test_list_filters_one_order_and_its_history(wo):
    client, tokens, orders = wo
    a, _ = orders.open_or_join(device_trigger(LIGHTS[0], "lamp_fault", "lamp-fault@sl-1",
                                              "rules"), T0)
    b, _ = orders.open_or_join(device_trigger(LIGHTS[2], "day_burning", "day-burning@sl-3",
                                              "rules"), T0 + H)
    orders.done(b.id, "no_fault_found", "op", T0 + 2 * H)
    viewer = tokens["viewer"]
    listed = client.get("/api/v1/work-orders", headers=viewer).json()
    assert [o["id"] for o in listed] == [b.id, a.id]  # newest first
    assert "history" not in listed[0]
    assert [o["id"] for o in client.get("/api/v1/work-orders?state=open&state=assigned",
                                        headers=viewer).json()] == [a.id]
    assert [o["id"] for o in client.get("/api/v1/work-orders?district=amager",
                                        headers=viewer).json()] == [b.id]
    assert [o["id"] for o in client.get("/api/v1/work-orders?device=sl-1",
                                        headers=viewer).json()] == [a.id]
    one = client.get(f"/api/v1/work-orders/{a.id}", headers=viewer).json()
    assert one["target"] == "sl-1" and one["state"] == "open"
    assert [(h["event"], h["ref"]) for h in one["history"]] == [("opened", "lamp-fault@sl-1")]
    assert client.get("/api/v1/work-orders").status_code == 401
    _problem(client.get("/api/v1/work-orders/WO-999999", headers=viewer), 404, "WO-999999")
    _problem(client.get("/api/v1/work-orders?state=closed", headers=viewer), 422, "state")


def test_operators_assign_and_close_orders_and_bad_transitions_are_refused(wo):
    client, tokens, orders = wo
    order, _ = orders.open_or_join(device_trigger(LIGHTS[0], "lamp_fault", "x", "rules"), T0)
    url = f"/api/v1/work-orders/{order.id}"
    _problem(client.post(f"{url}/assign", headers=tokens["viewer"], json={"assignee": "c"}),
             403, "operator")
    r = client.post(f"{url}/assign", headers=tokens["operator"], json={"assignee": "crew-2"})
    assert r.status_code == 200 and r.json()["state"] == "assigned"
    assert r.json()["assignee"] == "crew-2"
    # Bad bodies: what and where.
    _problem(client.post(f"{url}/done", headers=tokens["operator"], json={"cause": "rain"}),
             422, "body.cause")
    _problem(client.post(f"{url}/done", headers=tokens["operator"],
                         json={"cause": "cable_fault", "colour": "red"}), 422, "body.colour")
    _problem(client.post(f"{url}/assign", headers=tokens["operator"], json={"assignee": ""}),
             422, "body.assignee")
    _problem(client.post(f"{url}/assign", headers=tokens["operator"], content=b"{not json",
                         ), 422, "body")
    r = client.post(f"{url}/done", headers=tokens["operator"],
                    json={"cause": "lamp_replaced", "note": "LED 56 W fitted"})
    done = r.json()
    assert (done["state"], done["cause"], done["note"]) == ("done", "lamp_replaced",
                                                            "LED 56 W fitted")
    assert [(h["event"], h["who"]) for h in done["history"]][1:] == [
        ("assigned", "operator-ann (operator)"), ("done", "operator-ann (operator)")]
    _problem(client.post(f"{url}/assign", headers=tokens["operator"], json={"assignee": "c"}),
             409, "done is final")
    _problem(client.post(f"{url}/done", headers=tokens["operator"],
                         json={"cause": "cable_fault"}), 409, "done is final")
    _problem(client.post("/api/v1/work-orders/WO-000077/done", headers=tokens["operator"],
                         json={"cause": "cable_fault"}), 404, "WO-000077")


def test_csv_export_and_repair_stats(wo):
    client, tokens, orders = wo
    a, _ = orders.open_or_join(device_trigger(LIGHTS[0], "lamp_fault", "x", "rules"), T0)
    orders.assign(a.id, "=HYPERLINK(\"x\")", "op", T0 + H)
    orders.done(a.id, "lamp_replaced", "op", T0 + 4 * H, note="fine, now")
    b, _ = orders.open_or_join(device_trigger(LIGHTS[1], "lamp_fault", "x", "rules"), T0)
    orders.done(b.id, "driver_replaced", "op", T0 + 2 * H)
    orders.open_or_join(device_trigger(LIGHTS[2], "lamp_fault", "x", "rules"), T0)
    r = client.get("/api/v1/work-orders.csv", headers=tokens["viewer"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["id"] for row in rows] == ["WO-000003", "WO-000002", "WO-000001"]
    first = rows[2]
    assert first["assignee"] == "'=HYPERLINK(\"x\")"  # never a formula in a spreadsheet
    assert (first["cause"], first["note"], first["repair_h"]) == ("lamp_replaced", "fine, now",
                                                                  "4.0")
    assert first["created"] == "2026-09-21T14:13:20Z"
    only = client.get("/api/v1/work-orders.csv?state=open", headers=tokens["viewer"]).text
    assert only.splitlines()[0].startswith("id,state,problem") and len(only.splitlines()) == 2
    stats = client.get("/api/v1/work-orders/stats", headers=tokens["viewer"]).json()
    assert stats == [
        {"district": "amager", "open": 1, "assigned": 0, "done": 0, "median_repair_h": None,
         "mean_repair_h": None},
        {"district": "valby", "open": 0, "assigned": 0, "done": 2, "median_repair_h": 3.0,
         "mean_repair_h": 3.0}]


def test_a_citizens_report_matches_the_nearest_light_and_opens_or_joins_its_order(wo):
    client, tokens, orders = wo
    services = client.get("/api/v1/services").json()  # no token: citizens have none
    assert {s["service_code"] for s in services} >= {"streetlight-out",
                                                     "streetlight-day-burning"}
    assert set(services[0]) == {"service_code", "service_name", "description", "metadata",
                                "type", "keywords", "group"}
    # About 11 m north of sl-1, as a form (the way Open311 clients post).
    r = client.post("/api/v1/reports", headers={"Content-Type": FORM}, content=urlencode({
        "service_code": "streetlight-out", "lat": "55.6601", "long": "12.5",
        "description": "Dark all night", "email": "ann@example.org", "api_key": "",
        "address_string": "Valby Langgade 1"}))
    assert r.status_code == 200, r.text
    [accepted] = r.json()
    rid = accepted["service_request_id"]
    assert rid == "SR-000001" and "sl-1" in accepted["service_notice"]
    [order] = orders.list()
    assert (order.target, order.problem, order.lat) == ("sl-1", "citizen_report", 55.6601)
    # Another report on that light joins the order; as JSON this time.
    r = client.post("/api/v1/reports", json={"service_code": "streetlight-flickering",
                                             "lat": 55.66, "long": 12.50002})
    assert r.status_code == 200 and "already known" in r.json()[0]["service_notice"]
    assert len(orders.list()) == 1
    assert [h["ref"] for h in client.get(f"/api/v1/work-orders/{order.id}",
                                         headers=tokens["viewer"]).json()["history"]] == [
        "SR-000001", "SR-000002"]
    [status] = client.get(f"/api/v1/reports/{rid}").json()
    assert (status["status"], status["service_code"], status["lat"], status["long"]) == (
        "open", "streetlight-out", 55.6601, 12.5)
    assert status["address"] == "Valby Langgade 1" and "ann@" not in str(status)
    orders.done(order.id, "lamp_replaced", "op", T0)
    [status] = client.get(f"/api/v1/reports/{rid}").json()
    assert status["status"] == "closed" and "lamp replaced" in status["status_notes"]


def test_a_report_far_from_any_light_or_malformed_is_refused_with_a_problem(wo):
    client, _, orders = wo
    body = {"service_code": "streetlight-out", "lat": 55.6610, "long": 12.5}  # 111 m off
    _problem(client.post("/api/v1/reports", json=body), 422, "no streetlight within 50 m")
    _problem(client.post("/api/v1/reports", json={**body, "service_code": "pothole"}), 422,
             "body.service_code", "'streetlight-out'")
    _problem(client.post("/api/v1/reports", json={"service_code": "streetlight-out",
                                                  "lat": 95, "long": 12.5}), 422, "body.lat")
    _problem(client.post("/api/v1/reports", headers={"Content-Type": FORM},
                         content="service_code=streetlight-out&lat=north&long=12.5"),
             422, "body.lat")
    _problem(client.post("/api/v1/reports", json={**body, "lat": 55.66,
                                                  "description": "x" * 4001}),
             422, "body.description")
    _problem(client.post("/api/v1/reports", json=[body]), 422, "JSON object")
    _problem(client.post("/api/v1/reports", content=b"\xff\xfe", headers={
        "Content-Type": "application/json"}), 422, "not readable")
    _problem(client.post("/api/v1/reports", content=b"x", headers={"Content-Type": "text/plain"}),
             415, "application/json")
    _problem(client.post("/api/v1/reports", headers={"Content-Type": FORM},
                         content=b"description=" + b"x" * 20_000), 413, "16384")
    _problem(client.get("/api/v1/reports/SR-000404"), 404, "SR-000404")
    _problem(client.get("/api/v1/reports/WO-000001"), 404, "SR-")
    assert orders.list() == []


def test_reports_from_one_address_are_limited(wo, monkeypatch):
    client, _, _ = wo
    client.app.state.report_limiter.limit = 2
    body = {"service_code": "streetlight-out", "lat": 55.66, "long": 12.5}
    assert [client.post("/api/v1/reports", json=body).status_code for _ in range(2)] == [200,
                                                                                         200]
    r = client.post("/api/v1/reports", json=body)
    _problem(r, 429, "too many reports")
    assert int(r.headers["Retry-After"]) > 0


def test_a_cabinet_order_lists_with_the_lights_that_joined_it(wo):
    client, tokens, orders = wo
    cab = cabinet_trigger("cab-v1", LIGHTS, "cabinet_supply_loss", "cabinet-supply-loss@cab-v1",
                          "rules")
    order, _ = orders.open_or_join(cab, T0)
    r = client.post("/api/v1/reports", json={"service_code": "streetlight-out",
                                             "lat": 55.67, "long": 12.5})
    assert "already known" in r.json()[0]["service_notice"]
    [listed] = client.get("/api/v1/work-orders?device=sl-2", headers=tokens["viewer"]).json()
    assert listed["id"] == order.id and listed["target_kind"] == "cabinet"


def test_open311_clients_find_the_same_routes_under_their_endpoint(wo):
    client, _, orders = wo
    assert client.get("/open311/v2/services.json").json() == client.get(
        "/api/v1/services").json()
    r = client.post("/open311/v2/requests.json", headers={"Content-Type": FORM},
                    content="service_code=streetlight-day-burning&lat=55.65&long=12.6")
    [accepted] = r.json()
    assert "sl-3" in accepted["service_notice"]
    [status] = client.get(f"/open311/v2/requests/{accepted['service_request_id']}.json").json()
    assert status["status"] == "open" and status["service_code"] == "streetlight-day-burning"
    spec = client.get("/openapi.json").json()["paths"]
    assert set(spec["/open311/v2/requests.json"]["post"]["requestBody"]["content"]) == {
        "application/json", FORM}


def test_whoami_tells_the_page_the_tokens_role(wo):
    client, tokens, _ = wo
    assert client.get("/api/v1/whoami", headers=tokens["operator"]).json() == {
        "role": "operator", "name": "operator-ann", "account": None}
    assert client.get("/api/v1/whoami", headers=tokens["viewer"]).json()["role"] == "viewer"
    assert client.get("/api/v1/whoami").status_code == 401
