"""Customer tokens: bound to one billing account, they see that account's meters,
consumption and settlements, and nothing else (another account's → 404, the operators'
routes → 403). The gateway with fakes, a real registry and a real billing store (SQLite)."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from fastapi.testclient import TestClient

from billing import load_config
from billing.invoices import issue
from billing.ledger import BillingStore
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.registry import Registry
from citygrid.settings import Settings
from gateway.app import create_app
from gateway.tokens import Tokens, create_token
from tests.unit.test_gateway_fakes import PROBLEM, FakeFeed, FakePublisher, FakeStore

T0 = 1_790_000_000_000
METERS = [FleetDevice("m-1", "meter", "valby", 55.66, 12.50, account_id="acc-a",
                      tariff="household-tou", max_power_w=17250.0),
          FleetDevice("m-2", "meter", "valby", 55.66, 12.51, account_id="acc-b",
                      tariff="business-flat", max_power_w=17250.0),
          FleetDevice("sl-1", "streetlight", "valby", 55.66, 12.52, rated_w=40)]


@pytest.fixture
def gw(tmp_path):
    registry = Registry(tmp_path)
    registry.upsert_many(METERS)
    billing = BillingStore(tmp_path / "billing.sqlite", load_config(), Fleet(METERS),
                           COPENHAGEN.tz)
    for meter in ("m-1", "m-2"):
        billing.on_reading(meter, T0, 100.0)
        billing.on_reading(meter, T0 + 3_600_000, 101.5)
        assert billing.settle(meter, T0 + 3_600_000)
    numbers = {a: issue(billing.db, billing.config, COPENHAGEN.tz, a, T0 + 7_200_000).number
               for a in ("acc-a", "acc-b")}
    billing.close()
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path))
    app = create_app(settings, store=FakeStore(), registry=registry, feed=FakeFeed({}),
                     publisher=FakePublisher())
    auth = {"a": create_token(tmp_path, "customer", "household a", "acc-a"),
            "viewer": create_token(tmp_path, "viewer", "ops")}
    with TestClient(app) as client:
        yield client, {k: {"Authorization": f"Bearer {v}"} for k, v in auth.items()}, numbers
    registry.close()


def _404(r) -> None:
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == PROBLEM


def test_a_customer_sees_its_own_account_meters_and_settlements(gw):
    client, h, _ = gw
    assert client.get("/api/v1/whoami", headers=h["a"]).json() == {
        "role": "customer", "name": "household a", "account": "acc-a"}
    accounts = client.get("/api/v1/billing/accounts", headers=h["a"]).json()
    assert [a["account_id"] for a in accounts] == ["acc-a"]
    one = client.get("/api/v1/billing/accounts/acc-a", headers=h["a"]).json()
    assert one["meters"] == ["m-1"] and one["balance_minor"] < 100_000
    entries = client.get("/api/v1/billing/settlements", headers=h["a"]).json()
    assert [e["meter"] for e in entries] == ["m-1"]
    r = client.get("/api/v1/devices/m-1/history", headers=h["a"], params={
        "field": "energy_kwh", "start_ms": T0, "end_ms": T0 + 3_600_000})
    assert r.status_code == 200, r.text


def test_another_accounts_things_do_not_exist_for_a_customer(gw):
    client, h, _ = gw
    _404(client.get("/api/v1/billing/accounts/acc-b", headers=h["a"]))
    _404(client.get("/api/v1/billing/settlements", headers=h["a"],
                    params={"account": "acc-b"}))
    _404(client.get("/api/v1/billing/settlements", headers=h["a"], params={"meter": "m-2"}))
    for path in ("/api/v1/meters/m-2/intervals.csv", "/api/v1/meters/m-2/greenbutton.xml"):
        _404(client.get(path, headers=h["a"], params={"from": "2026-09-21T00:00Z",
                                                       "to": "2026-09-22T00:00Z"}))
    for device in ("m-2", "sl-1"):  # another account's meter, and a streetlight
        _404(client.get(f"/api/v1/devices/{device}/history", headers=h["a"], params={
            "field": "energy_kwh", "start_ms": T0, "end_ms": T0 + 3_600_000}))


def test_a_customer_sees_its_own_invoices_and_payments_only(gw):
    client, h, numbers = gw
    mine, theirs = numbers["acc-a"], numbers["acc-b"]
    listed = client.get("/api/v1/billing/invoices", headers=h["a"]).json()
    assert [i["number"] for i in listed] == [mine]
    assert client.get(f"/api/v1/billing/invoices/{mine}", headers=h["a"]).status_code == 200
    pdf = client.get(f"/api/v1/billing/invoices/{mine}.pdf", headers=h["a"])
    assert pdf.content.startswith(b"%PDF")
    for suffix in ("", ".html", ".pdf"):
        _404(client.get(f"/api/v1/billing/invoices/{theirs}{suffix}", headers=h["a"]))
    _404(client.get("/api/v1/billing/invoices", headers=h["a"], params={"account": "acc-b"}))
    assert client.get("/api/v1/billing/payments", headers=h["a"]).json() == {
        "requests": [], "payments": []}
    _404(client.get("/api/v1/billing/payments", headers=h["a"], params={"account": "acc-b"}))
    r = client.post("/api/v1/billing/accounts/acc-a/invoices", headers=h["a"], json={})
    assert r.status_code == 403, r.text  # issuing is the operators'


def test_a_customer_token_opens_no_operators_route(gw):
    client, h, _ = gw
    for path in ("/api/v1/devices", "/api/v1/alerts", "/api/v1/billing/ledger",
                 "/api/v1/work-orders", "/api/v1/status"):
        r = client.get(path, headers=h["a"])
        assert r.status_code == 403, (path, r.text)
        assert r.headers["content-type"] == PROBLEM


def test_operators_still_see_every_account(gw):
    client, h, _ = gw
    accounts = client.get("/api/v1/billing/accounts", headers=h["viewer"]).json()
    assert [a["account_id"] for a in accounts] == ["acc-a", "acc-b"]
    assert client.get("/api/v1/billing/accounts/acc-b", headers=h["viewer"]).json()[
        "meters"] == ["m-2"]
    _404(client.get("/api/v1/billing/accounts/nobody", headers=h["viewer"]))


def test_a_customer_token_needs_an_account_and_only_it_has_one(tmp_path):
    tokens = Tokens(tmp_path)
    try:
        with pytest.raises(ValueError, match="--account"):
            tokens.create("customer", "x")
        with pytest.raises(ValueError, match="only a customer"):
            tokens.create("viewer", "x", "acc-a")
        with pytest.raises(ValueError, match="account"):
            tokens.create("customer", "x", "a b")
        holder = tokens.holder(tokens.create("customer", "x", "acc-a"))
        assert (holder.role, holder.account) == ("customer", "acc-a")
    finally:
        tokens.close()


def test_tokens_made_before_customers_keep_working(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    db.execute("CREATE TABLE tokens (hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT "
               "NULL, created_ms INTEGER NOT NULL)")
    db.execute("INSERT INTO tokens VALUES (?, 'old', 'viewer', 0)",
               (hashlib.sha256(b"cg_old").hexdigest(),))
    db.commit()
    db.close()
    tokens = Tokens(tmp_path)
    try:
        assert tokens.role("cg_old") == "viewer"
        assert tokens.holder(tokens.create("customer", "new", "acc-a")).account == "acc-a"
    finally:
        tokens.close()
