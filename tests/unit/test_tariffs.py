"""Tariffs a utility has: versions with validity dates, VAT, fixed charges, settlement lines."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import config as billing_config
from billing.ledger import BillingStore
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.yamlconf import ConfigError

TZ = COPENHAGEN.tz
FLEET = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.50, account_id="acc-1",
                           tariff="utility", max_power_w=17250.0)])
UTILITY = """
currency: DKK
tariffs:
  utility:
    vat_rate: 0.25
    price: 2.00
    windows: [{price: 4.00, from: "17:00", to: "21:00"}]
    standing_charge_per_month: 30.00
    fixed_per_day: 1.00
    versions:
      - {valid_from: 2026-11-15, price: 3.00, standing_charge_per_month: 30.00,
         fixed_per_day: 2.00}
"""
CFG = billing_config.parse_text(UTILITY)


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def settle_month(tmp_path, readings, now):
    s = BillingStore(tmp_path / "b.sqlite", CFG, FLEET, TZ)
    for ts, kwh in readings:
        s.on_reading("m-1", ts, kwh)
    return [d.entry for d in s.settle("m-1", now)], s


def test_a_price_change_never_reprices_the_past(tmp_path):
    # 1 kWh at 10:00 on the 14th (2.00), 1 kWh at 10:00 on the 15th (3.00, the new version).
    readings = [(ms(2026, 11, 14, 10), 0.0), (ms(2026, 11, 14, 11), 1.0),
                (ms(2026, 11, 15, 10), 1.0), (ms(2026, 11, 15, 11), 2.0)]
    [entry], _ = settle_month(tmp_path, readings, ms(2026, 12, 2))
    energy = [ln for ln in entry["lines"] if ln["kind"] == "energy"]
    assert [(ln["label"], ln["quantity"], ln["unit_price"], ln["amount"]) for ln in energy] == [
        ("Energy", "1.000000", "2.00", "2.00"), ("Energy", "1.000000", "3.00", "3.00")]
    fixed = [ln for ln in entry["lines"] if ln["kind"] == "fixed"]
    # 14 days at 1.00 before the version, 16 at 2.00 from the 15th; the monthly charge once.
    assert [(ln["label"], ln["quantity"], ln["unit"], ln["amount"]) for ln in fixed] == [
        ("Standing charge", "1.00", "month", "30.00"), ("Fixed charge", "14.00", "day", "14.00"),
        ("Fixed charge", "16.00", "day", "32.00")]
    assert entry["net_amount"] == "81.00" and entry["vat_rate"] == "0.25"
    assert entry["vat_amount"] == "20.25" and entry["amount_minor"] == 10125
    assert entry["standing_charge"] == "76.00" and entry["energy_amount"] == "5.000000"
    assert entry["kwh"] == "2.000000" and entry["export_kwh"] == "0.000000"


def test_energy_lines_are_grouped_by_band_not_per_reading(tmp_path):
    t = ms(2026, 11, 3, 16)
    readings = [(t + i * 600_000, i * 0.1) for i in range(0, 19)]  # 16:00–19:00, 0.6 kWh/h
    [entry], _ = settle_month(tmp_path, readings, t + 3 * 3_600_000)
    assert [(ln["label"], ln["quantity"]) for ln in entry["lines"]] == [
        ("Energy", "0.600000"), ("Energy 17:00\u201321:00", "1.200000")]
    assert entry["amount_minor"] == round((Decimal("1.2") + Decimal("4.8")) * 125)


def test_overlapping_versions_are_refused_with_their_place():
    bad = UTILITY + "      - {valid_from: 2026-11-15, price: 4.00}\n"
    with pytest.raises(ConfigError) as e:
        billing_config.parse_text(bad, "utility.yaml")
    [problem] = [str(p) for p in e.value.problems]
    assert problem.startswith("utility.yaml:") and "overlap" in problem


def test_old_unbilled_tables_are_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "b.sqlite")
    db.execute("CREATE TABLE unbilled (meter_id TEXT NOT NULL, start_ms INTEGER NOT NULL, "
               "end_ms INTEGER NOT NULL, mwh INTEGER NOT NULL, price TEXT NOT NULL, "
               "amount TEXT NOT NULL, period TEXT NOT NULL)")
    db.execute("INSERT INTO unbilled VALUES ('m-1', ?, ?, 1000000, '2.00', '2.00', '2026-11')",
               (ms(2026, 11, 3, 10), ms(2026, 11, 3, 11)))
    db.commit()
    db.close()
    [entry], _ = settle_month(tmp_path, [], ms(2026, 11, 4))
    assert entry["lines"] == [{"kind": "energy", "label": "Energy", "quantity": "1.000000",
                               "unit": "kWh", "unit_price": "2.00", "amount": "2.00"}]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 40 * 24), hours=st.integers(1, 60), per_hour=st.integers(1, 1000))
def test_parts_add_up_across_dst_and_versions(tmp_path_factory, start, hours, per_hour):
    """October's DST end and November's version change inside the span: lines sum to net,
    energy lines to kwh and energy_amount, and the total is the rounded net + VAT."""
    t0 = ms(2026, 10, 10) + start * 3_600_000
    kwh = per_hour * hours  # hundredths of a kWh, at most 10 kWh an hour (plausible)
    readings = [(t0, 0.0), (t0 + hours * 3_600_000, kwh / 100)]
    entries, _ = settle_month(tmp_path_factory.mktemp("p"), readings, ms(2027, 1, 1))
    assert entries
    for e in entries:
        net = sum(Decimal(ln["amount"]) for ln in e["lines"])
        assert net == Decimal(e["net_amount"])
        energy = [ln for ln in e["lines"] if ln["kind"] == "energy"]
        assert sum(Decimal(ln["quantity"]) for ln in energy) == Decimal(e["kwh"])
        assert sum(Decimal(ln["amount"]) for ln in energy) == Decimal(e["energy_amount"])
        total = (net * Decimal("1.25") * 100).to_integral_value(rounding="ROUND_HALF_UP")
        assert e["amount_minor"] == int(total)
    assert sum(Decimal(e["kwh"]) for e in entries) == Decimal(kwh) / 100


def test_the_utility_example_loads():
    cfg = billing_config.load(billing_config.EXAMPLE.parent / "utility.yaml")
    household = cfg.tariffs["household"]
    assert household.vat_rate == Decimal("0.25")
    assert household.on(datetime(2027, 1, 1).date()).price == Decimal("2.20")
    assert cfg.tariffs["solar-household"].uses_spot()
    assert cfg.price_file.endswith("billing/examples/dayaheadprices-sample.json")
    assert household.on(datetime(2026, 12, 31).date()).price == Decimal("2.00")
