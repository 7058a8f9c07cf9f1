"""Every dashboard panel's InfluxQL, run against a real InfluxDB filled by a simulated night.

Grafana cannot run here; this is how we know its panels will show data. Macros and
variables are expanded as Grafana would: $timeFilter, $__interval, $district, $device.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from datetime import datetime, timedelta

import pytest

import billing
from billing import config as billing_config
from billing import payments
from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from citygrid.fleet import Fleet
from citygrid.maintenance import WorkOrders
from citygrid.settings import Settings
from citygrid.store.influx import InfluxStore
from citygrid.store.lifecycle import Lifecycle
from dashboards.build import DASHBOARDS, OUT, panel_queries, render
from ingest.service import IngestConfig, IngestService
from rules.loader import DEFAULT_RULES
from rules.runner import RuleRunner, RunnerConfig
from simulators.engine import SimConfig
from simulators.fleetgen import generate
from tests.helpers import Publisher, simulate_elsewhere, wait_until


def test_committed_dashboards_are_built_from_the_code():
    for name in DASHBOARDS:
        assert (OUT / f"{name}.json").read_text() == render(name), (
            f"dashboards/json/{name}.json is stale: run `citygrid dashboards build`")


def expand(query: str, start_ms: int, end_ms: int, district_regex: str) -> str:
    """As Grafana does: a multi-value variable becomes a regex, "All" becomes .*"""
    return (query.replace("$timeFilter", f"time >= {start_ms}ms AND time <= {end_ms}ms")
            .replace("$__interval", "10m").replace("$district", district_regex)
            .replace("$device", ".*"))


def bill_the_night(data_dir, now_ms: int) -> None:
    """An account's invoice on demand, a credit note on it, and its payment agent's signed
    confirmation: billing's own functions, as the gateway calls them for an operator and an
    agent. The running rule runner's ledger feed writes them as citygrid_ledger points."""
    account = billing.settlements(data_dir, limit=1)[0]["account"]
    config = billing_config.parse_text(billing_config.EXAMPLE.read_text() + (
        f"accounts:\n  {account}:\n    opening_balance: 1000.00\n    low_balance: 100.00\n"
        "    payment_agent: {url: 'http://agent.invalid/pay', secret_env: DASH_SECRET}\n"))
    db = billing.open_db(data_dir)
    try:
        invoice = billing.issue_invoice(db, config, COPENHAGEN.tz, account, now_ms)
        billing.credit_note(db, config, COPENHAGEN.tz, invoice.number, "a goodwill credit",
                            now_ms, amount="1.00")
        payments.enqueue(db, f"invoice:{invoice.number}", account, "invoice", invoice.number,
                         invoice.total_minor, "DKK", now_ms)
        body = json.dumps({"protocol": 1, "request": f"invoice:{invoice.number}",
                           "status": "confirmed", "amount_minor": invoice.total_minor,
                           "currency": "DKK", "payment_id": "pay-1"}).encode()
        payments.callback(db, config, payments.signature_header(b"s3cret", now_ms // 1000, body),
                          body, now_ms, environ={"DASH_SECRET": "s3cret"})
    finally:
        db.close()


@pytest.fixture(scope="module")
def night(influxd, mosquitto, tmp_path_factory):
    """Simulator + ingest + rules (with billing) for a simulated day from 18:00."""
    uid = "dash" + str(int(time.time()))[-6:]
    tmp = tmp_path_factory.mktemp("dashboards")
    fleet = Fleet(dataclasses.replace(d, district=uid) for d in generate(COPENHAGEN, 30, 10))
    store = InfluxStore(influxd.url, f"db_{uid}")
    store.ensure_ready()
    settings = Settings(mqtt_url=mosquitto.url, influx_url=influxd.url,
                        influx_db=f"db_{uid}", data_dir=str(tmp))
    topic = f"city/v1/{uid}/+/+/telemetry"
    ingest = IngestService(settings, store, IngestConfig(
        client_id=f"ingest-{uid}", topic=topic, flush_interval_s=0.05, report_interval_s=0.5))
    ingest.start()
    runner = RuleRunner(settings, fleet, COPENHAGEN, store, RunnerConfig(
        DEFAULT_RULES, topic, client_id=f"rules-{uid}"))
    runner.start()
    evening = datetime.now(COPENHAGEN.tz).replace(hour=18, minute=0, second=0,
                                                  microsecond=0) - timedelta(days=2)
    start_ms = int(evening.timestamp() * 1000)
    sim = SimConfig(speed=7200, interval_s=120, duration_s=24 * 3600, start_ms=start_ms,
                    seed=4, faults={"lamp_failure": 0.002})
    pub = Publisher(mosquitto.url, f"pub-{uid}")
    try:
        stats = simulate_elsewhere(mosquitto.url, fleet, sim)
        pub.send_all([(str(Topic(uid, "meter", "m-00000")), b"not json")])  # a dead letter
        wait_until(lambda: store.count("streetlight") + store.count("meter") >=
                   stats["readings"], timeout_s=60, message="the night stored")
        end_of_night = start_ms + 24 * 3_600_000 - 240_000
        wait_until(lambda: (runner.engine.watermark or 0) >= end_of_night, timeout_s=240,
                   message="the rule engine through the night")
        # The night's lamp failures opened work orders (rules/workorders.py); crews close
        # two, and the runner's next look writes them as citygrid_work_orders.
        orders = WorkOrders(tmp)
        try:
            opened = orders.list()
            assert len(opened) >= 2, "the night's lamp failures opened work orders"
            for order, cause in zip(opened, ("lamp_replaced", "cable_fault"), strict=False):
                orders.done(order.id, cause, "test", int(time.time() * 1000))
        finally:
            orders.close()
        wait_until(lambda: store.count("citygrid_work_orders") >= 2, timeout_s=10,
                   message="the orders done in InfluxDB")
        bill_the_night(tmp, int(time.time() * 1000))
        wait_until(lambda: store.query('SELECT count("seq") FROM "citygrid_ledger" WHERE '
                                       '"kind" = \'payment\''), timeout_s=10,
                   message="the invoice, credit note and payment as citygrid_ledger points")
        time.sleep(2)  # last self-reports, lighting and billing points
        # The long-range panels read the hourly rollups: what the continuous queries would
        # have written over the night, written now with their own statements.
        store.lifecycle = Lifecycle()
        store.ensure_lifecycle()
        store.rollup(start_ms - 3_600_000, start_ms + 25 * 3_600_000)
    finally:
        pub.close()
        runner.stop()
        ingest.stop()
    yield store, start_ms, int(time.time() * 1000) + 60_000, uid
    store.drop()


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_every_panel_query_returns_data(night, name):
    store, start_ms, end_ms, district = night
    doc = json.loads(render(name))
    queries = panel_queries(doc)
    assert queries
    empty = []
    for title, query in queries:
        series = store.query(expand(query, start_ms, end_ms, re.escape(district)))
        if not series:
            empty.append((title, query))
    assert empty == [], f"panels with no data: {empty}"
    for variable in doc.get("templating", {}).get("list", []):
        values = store.query(expand(variable["query"], start_ms, end_ms, ".*"))
        assert values, variable["name"]


def test_provisioning_files_point_at_the_dashboards_datasource():
    import yaml

    from dashboards.build import HERE

    ds = yaml.safe_load((HERE / "provisioning/datasources/citygrid.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "influxdb" and source["uid"] == "citygrid-influx"
    assert source["secureJsonData"]["httpHeaderValue1"] == "Token ${CITYGRID_INFLUX_TOKEN}"
    providers = yaml.safe_load((HERE / "provisioning/dashboards/citygrid.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"
    for name in DASHBOARDS:
        doc = json.loads(render(name))
        uids = {t["datasource"]["uid"] for p in doc["panels"] for t in p.get("targets", [])}
        assert uids == {"citygrid-influx"}, name
