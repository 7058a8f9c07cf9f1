"""Billing through the real broker: a crash mid-settlement, and simulated meters end to end."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import datetime
from decimal import Decimal

from billing import config as billing_config
from billing.ledger import BillingStore, verify
from citygrid.city import COPENHAGEN
from citygrid.contract import Settlement, Topic
from citygrid.fleet import Fleet, FleetDevice
from citygrid.settings import Settings
from citygrid.store.sqlite import SqliteStore
from ingest.service import IngestConfig, IngestService
from rules.loader import DEFAULT_RULES
from rules.runner import RuleRunner, RunnerConfig
from simulators.engine import SimConfig
from simulators.fleetgen import generate
from tests.helpers import REPO, Collector, simulate_elsewhere, wait_until

T = int(datetime(2026, 11, 26, 8, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)


def meter_reading(seq: int, ts: int, kwh: float) -> dict:
    return {"ts": ts, "seq": seq, "energy_kwh": kwh, "power_w": 500.0}


def test_a_crash_between_debit_and_ledger_settles_exactly_once(mosquitto, uid, tmp_path,
                                                                publisher):
    fleet = Fleet([FleetDevice("m-1", "meter", uid, 55.66, 12.5, account_id="acc-1",
                               tariff="business-flat", max_power_w=17250.0)])
    fleet.dump(tmp_path / "fleet.geojson")
    topic = str(Topic(uid, "meter", "m-1"))
    args = ["rules", "run", "--mqtt-url", mosquitto.url,
            "--data-dir", str(tmp_path / "data"), "--fleet", str(tmp_path / "fleet.geojson"),
            "--topic", f"city/v1/{uid}/+/+/telemetry", "--client-id", f"rules-{uid}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "rules.log"

    def start(crash: bool) -> subprocess.Popen:
        before = log.read_text().count("rules running") if log.exists() else 0
        command = ([str(REPO / "tests" / "crash_after_debit.py")] if crash
                   else ["-m", "cityctl"])
        with open(log, "ab") as f:
            p = subprocess.Popen([sys.executable, *command, *args], env=env, stdout=f,
                                 stderr=subprocess.STDOUT)
        wait_until(lambda: log.read_text().count("rules running") > before)
        time.sleep(0.3)
        return p

    process = start(crash=True)
    publisher.send(topic, meter_reading(1, T, 100.0))
    publisher.send(topic, meter_reading(2, T + 3_600_000, 111.0))  # 11 kWh: settle
    assert process.wait(20) == 9, "the engine should have died inside the settlement"
    db = tmp_path / "data" / "billing.sqlite"
    assert verify(db)[0] == 0  # nothing in the ledger…
    process = start(crash=False)
    try:
        publisher.send(topic, meter_reading(3, T + 3_660_000, 111.05))
        wait_until(lambda: verify(db)[0] == 1, message="one settlement after the restart")
        publisher.send(topic, meter_reading(3, T + 3_660_000, 111.05))  # a redelivery
        publisher.send(topic, meter_reading(4, T + 3_720_000, 111.06))
        time.sleep(1.0)
    finally:
        process.terminate()
        process.wait(20)
    store = BillingStore(db, billing_config.load(), fleet, COPENHAGEN.tz)
    [(_, entry, _)] = store.entries()
    # The engine's persistent session hands the restarted engine the reading it died on, so
    # the settlement is the one that reading crossed: 11 kWh × 2.50 DKK.
    assert entry["kwh"] == "11.000000" and entry["amount_minor"] == 2750
    assert store.balance("acc-1") == 100_000 - 2750  # …and the account debited once


def test_simulated_meters_through_ingest_and_rules_bill_what_their_registers_advanced(
        mosquitto, uid, tmp_path):
    fleet = Fleet(dataclasses.replace(d, district=uid)
                  for d in generate(COPENHAGEN, 0, 4, seed=8))
    settings = Settings(mqtt_url=mosquitto.url, data_dir=str(tmp_path / "data"))
    store = SqliteStore(tmp_path / "data" / "telemetry.sqlite")
    ingest = IngestService(settings, store, IngestConfig(
        client_id=f"ingest-{uid}", topic=f"city/v1/{uid}/+/+/telemetry", flush_interval_s=0.05))
    ingest.start()
    runner = RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(
        DEFAULT_RULES, f"city/v1/{uid}/+/+/telemetry", client_id=f"rules-{uid}"))
    runner.start()
    settlements = Collector(mosquitto.url, f"city/v1/{uid}/meter/+/settlement")
    sim = SimConfig(speed=7200, interval_s=60, duration_s=86_400, seed=9,
                    start_ms=int(time.time() * 1000) - 5 * 86_400_000,
                    faults={"duplicate": 0.05, "gap": 0.05})
    try:
        stats = simulate_elsewhere(mosquitto.url, fleet, sim)
        assert stats["fault_duplicate"] and stats["fault_gap"]
        delivered = stats["readings"] - stats["fault_duplicate"]
        wait_until(lambda: store.count("meter") == delivered, timeout_s=60,
                   message="every reading stored")
        newest = {m.device_id: max(p.ts_ms for p in store.points(
            "meter", start_ms=0, end_ms=2**62) if p.tags["device_id"] == m.device_id)
            for m in fleet}
        wait_until(lambda: all(runner.engine.last_seen.get(d) == ts for d, ts in newest.items()),
                   timeout_s=120, message="the rule engine took the same readings")
        ledger = tmp_path / "data" / "billing.sqlite"
        wait_until(lambda: len(settlements.messages) >= verify(ledger)[0],
                   message="every settlement published")
    finally:
        runner.stop()
        ingest.stop()
        settlements.close()
    billing = BillingStore(tmp_path / "data" / "billing.sqlite", billing_config.load(), fleet,
                           COPENHAGEN.tz)
    entries = billing.entries()
    assert entries, "a day of four meters should have settled more than once"
    assert verify(billing.path)[0] == len(entries) == len(settlements.messages)
    events = [Settlement.model_validate_json(p) for _, p, _ in settlements.messages]
    assert [(e.key, e.hash) for e in events] == [(e["key"], h) for _, e, h in entries]
    for meter in fleet:
        history = sorted(store.points("meter", start_ms=0, end_ms=2**62),
                         key=lambda p: p.ts_ms)
        mine = [p for p in history if p.tags["device_id"] == meter.device_id]
        advanced = round((Decimal(str(mine[-1].fields["energy_kwh"]))
                          - Decimal(str(mine[0].fields["energy_kwh"]))) * 1_000_000)
        billed = sum(round(Decimal(e["kwh"]) * 1_000_000) for _, e, _ in entries
                     if e["meter"] == meter.device_id)
        unbilled = round(Decimal(str(billing.unbilled(meter.device_id)["kwh"])) * 1_000_000)
        assert billed + unbilled == advanced, meter.device_id
        spent = sum(e["amount_minor"] for _, e, _ in entries if e["account"] == meter.account_id)
        assert billing.balance(meter.account_id) == 100_000 - spent
    assert all(Decimal(e["kwh"]) >= 10 for _, e, _ in entries)
