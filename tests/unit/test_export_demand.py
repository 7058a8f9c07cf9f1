"""Time-banded grid charges, the capacity (demand) charge, the export register with net and
separate export credit, and property tests: the parts add up to the total across DST days,
version boundaries and spot slots, and export credit never pays grid, fixed or demand
charges unless the tariff says so."""

from __future__ import annotations

import shutil
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import config as billing_config
from billing.ledger import BillingStore
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.yamlconf import ConfigError

TZ = COPENHAGEN.tz
FLEET = Fleet([FleetDevice(m, "meter", "valby", 55.66, 12.50, account_id="acc-1", tariff="t",
                           max_power_w=43470.0) for m in ("m-1", "m-2")])
DAYAHEAD = Path(__file__).parents[1] / "data" / "energidataservice" / \
    "dayaheadprices-2026-10-24.json"
UTILITY = """
currency: DKK
tariffs:
  t:
    vat_rate: 0.25
    price: 2.00
    grid:
      price: 0.20
      bands:
        - {label: Winter peak, price: 0.80, from: "17:00", to: "21:00",
           months: [1, 2, 3, 10, 11, 12]}
    demand: {price_per_kw: 40.00, minimum_kw: 2.5}
    export: {mode: separate, price: 0.50%s}
    fixed_per_day: 1.00
"""


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def store(tmp_path, text=UTILITY % "", name="b.sqlite") -> BillingStore:
    return BillingStore(tmp_path / name, billing_config.parse_text(text), FLEET, TZ)


def lines(entry, kind=None):
    return [(ln["label"], ln["quantity"], ln["amount"]) for ln in entry["lines"]
            if kind is None or ln["kind"] == kind]


class TestGridBands:
    @pytest.mark.parametrize("month, label, amount", [(1, "Grid Winter peak", "0.80"),
                                                      (7, "Grid", "0.20")])
    def test_a_band_applies_in_its_months(self, tmp_path, month, label, amount):
        s = store(tmp_path)
        s.on_reading("m-1", ms(2027, month, 15, 18), 0.0)
        s.on_reading("m-1", ms(2027, month, 15, 19), 1.0)
        [entry] = [x.entry for x in s.settle("m-1", ms(2027, month, 15, 20))]
        assert lines(entry, "energy") == [("Energy", "1.000000", "2.00")]
        assert lines(entry, "grid") == [(label, "1.000000", amount)]
        assert entry["kwh"] == "1.000000"  # grid lines do not count the energy twice

    def test_an_interval_across_a_band_edge_is_split(self, tmp_path):
        s = store(tmp_path)
        s.on_reading("m-1", ms(2026, 11, 10, 16), 0.0)
        s.on_reading("m-1", ms(2026, 11, 10, 18), 2.0)
        [entry] = [x.entry for x in s.settle("m-1", ms(2026, 11, 10, 19))]
        assert lines(entry, "grid") == [("Grid", "1.000000", "0.20"),
                                        ("Grid Winter peak", "1.000000", "0.80")]

    def test_bands_are_checked(self):
        with pytest.raises(ConfigError, match=r"months.*less than or equal to 12"):
            billing_config.parse_text(UTILITY.replace("months: [1,", "months: [13,"))


class TestDemand:
    def quarters(self, s, meter, day, kw_per_quarter):
        """One reading every quarter hour from ``day`` 00:00, each quarter at its power."""
        t, kwh = ms(2026, 11, day), 0.0
        s.on_reading(meter, t, kwh)
        for kw in kw_per_quarter:
            t += 900_000
            kwh += kw / 4
            s.on_reading(meter, t, kwh)
        return t

    def test_the_months_peak_quarter_hour_is_charged_once_when_it_ends(self, tmp_path):
        s = store(tmp_path)
        t = self.quarters(s, "m-1", 3, [1.0] * 20 + [8.0] + [1.0] * 20)
        [mid] = [x.entry for x in s.settle("m-1", t + 1000)]
        assert lines(mid, "demand") == []  # the month has not ended
        self.quarters(s, "m-1", 20, [2.0, 6.0, 2.0])
        [end] = [x.entry for x in s.settle("m-1", ms(2026, 12, 1, 1))]
        assert lines(end, "demand") == [("Capacity charge (month's peak 15-minute power)",
                                         "8.000000", "320.00")]
        assert lines(end, "fixed") == [("Fixed charge", "30.00", "30.00")]
        s.on_reading("m-1", ms(2026, 11, 20, 0, 10), 100.0)  # a late reading is ignored
        assert s.settle("m-1", ms(2026, 12, 2)) == []

    def test_an_interval_across_quarters_is_shared_by_time(self, tmp_path):
        s = store(tmp_path)
        s.on_reading("m-1", ms(2026, 11, 5, 10, 10), 0.0)
        s.on_reading("m-1", ms(2026, 11, 5, 10, 40), 3.0)  # 6 kW steady for 30 minutes
        [entry] = [x.entry for x in s.settle("m-1", ms(2026, 12, 1, 1))]
        assert lines(entry, "demand")[0][1] == "6.000000"

    def test_below_the_minimum_the_minimum_is_charged(self, tmp_path):
        s = store(tmp_path)
        self.quarters(s, "m-2", 3, [1.0] * 8)
        [entry] = [x.entry for x in s.settle("m-2", ms(2026, 12, 1, 1))]
        assert lines(entry, "demand") == [("Capacity charge (minimum 2.5 kW)", "2.500000",
                                           "100.00")]


class TestExport:
    def two_registers(self, s, imp, exp, t0=None, meter="m-1"):
        t0 = t0 or ms(2026, 11, 10, 10)
        s.on_reading(meter, t0, 100.0, 50.0)
        return s.on_reading(meter, t0 + 3_600_000, 100.0 + imp, 50.0 + exp)

    def settle(self, s, t=None, meter="m-1"):
        return [x.entry for x in s.settle(meter, t or ms(2026, 11, 10, 12))]

    def test_a_separate_export_price_credits_the_export(self, tmp_path):
        s = store(tmp_path)
        assert self.two_registers(s, 2.0, 5.0) == []
        [entry] = self.settle(s)
        assert lines(entry) == [("Energy", "2.000000", "4.00"), ("Grid", "2.000000", "0.40"),
                                ("Export", "5.000000", "-2.50")]
        assert entry["export_kwh"] == "5.000000" and entry["kwh"] == "2.000000"
        assert entry["net_amount"] == "1.90" and entry["amount_minor"] == 238  # 2.375 → 2.38

    def test_credit_beyond_energy_is_carried_not_set_against_grid(self, tmp_path):
        s = store(tmp_path)
        self.two_registers(s, 2.0, 20.0)
        [first] = self.settle(s)
        assert lines(first, "export") == [("Export", "20.000000", "-10.00"),
                                          ("Export credit carried forward", "1.00", "6.00")]
        assert first["net_amount"] == "0.40"  # the grid charge, paid in full
        s.on_reading("m-1", ms(2026, 11, 10, 13), 107.0, 70.0)  # 5 kWh more, no export
        [second] = self.settle(s, ms(2026, 11, 10, 14))
        assert lines(second, "export") == [("Export credit brought forward", "1.00", "-6.00")]
        assert second["net_amount"] == "5.00"  # 10.00 energy + 1.00 grid − 6.00
        s.on_reading("m-1", ms(2026, 11, 10, 15), 108.0, 70.0)
        [third] = self.settle(s, ms(2026, 11, 10, 16))
        assert lines(third, "export") == []  # the carried credit is used up

    def test_offsets_fixed_lets_the_credit_pay_everything(self, tmp_path):
        s = store(tmp_path, UTILITY % ", offsets_fixed: true")
        opening = s.balance("acc-1")
        self.two_registers(s, 2.0, 20.0)
        [entry] = self.settle(s)
        assert entry["net_amount"] == "-5.60" and entry["amount_minor"] == -700
        assert s.balance("acc-1") == opening + 700

    def test_net_metering_nets_within_the_interval(self, tmp_path):
        s = store(tmp_path, UTILITY.replace("separate, price: 0.50%s", "net"))
        self.two_registers(s, 3.0, 1.0)
        [entry] = self.settle(s)
        assert lines(entry) == [("Energy", "2.000000", "4.00"), ("Grid", "2.000000", "0.40")]
        s.on_reading("m-1", ms(2026, 11, 10, 13), 104.0, 55.0)  # 1 in, 4 out: 3 surplus
        [surplus] = self.settle(s, ms(2026, 11, 10, 14))
        assert lines(surplus) == [("Export (net)", "3.000000", "-6.00"),
                                  ("Export credit carried forward", "1.00", "6.00")]
        # No energy charge in the settlement to offset: the credit is carried.
        assert surplus["net_amount"] == "0.00" and surplus["export_kwh"] == "3.000000"

    def test_without_an_export_mode_export_is_recorded_not_credited(self, tmp_path):
        s = store(tmp_path, UTILITY.replace("    export: {mode: separate, price: 0.50%s}\n",
                                            ""))
        self.two_registers(s, 2.0, 5.0)
        [entry] = self.settle(s)
        assert lines(entry, "export") == [] and entry["net_amount"] == "4.40"

    def test_the_export_register_has_its_own_accounting(self, tmp_path):
        s = store(tmp_path)
        self.two_registers(s, 1.0, 1.0)
        events = s.on_reading("m-1", ms(2026, 11, 10, 12), 102.0, 0.5)  # export reset
        assert [k for k, _ in events] == ["export-reset"]
        assert events[0][1].startswith("export register: register fell")

    def test_the_rule_engine_passes_the_export_register(self, tmp_path):
        from rules.engine import RuleEngine
        from rules.loader import load
        from tests.unit.test_billing import Box

        s = store(tmp_path)
        engine = RuleEngine(load(), FLEET, COPENHAGEN, Box(), billing=s)
        t = ms(2026, 11, 10, 10)
        for i, (imp, exp) in enumerate([(100.0, 50.0), (101.0, 53.0)]):
            engine.on_reading("m-1", {"seq": i + 1, "energy_kwh": imp,
                                      "energy_export_kwh": exp, "power_w": 500.0},
                              t + i * 3_600_000)
        [entry] = self.settle(s)
        assert entry["export_kwh"] == "3.000000"


# ---------------------------------------------------------------- properties

VERSIONED = """
currency: DKK
price_file: %s
tariffs:
  t:
    vat_rate: 0.25
    %s
    grid:
      price: 0.20
      bands: [{label: Peak, price: 0.80, from: "17:00", to: "21:00"}]
    demand: {price_per_kw: 40.00, minimum_kw: 2.5}
    export: %s
    fixed_per_day: 1.00
    versions:
      - valid_from: %s
        %s
        grid: {price: 0.30, bands: [{label: Peak, price: 1.10, from: "17:00", to: "20:00"}]}
        demand: {price_per_kw: 45.00}
        export: %s
        standing_charge_per_month: 30.00
"""

readings = st.lists(st.tuples(st.integers(1, 240), st.integers(0, 100), st.integers(0, 100)),
                    min_size=2, max_size=30)


def check_parts(entries, imported_mwh, exported_mwh, offsets_fixed=False):
    assert entries or not (imported_mwh or exported_mwh)
    for e in entries:
        net = sum(Decimal(ln["amount"]) for ln in e["lines"])
        assert net == Decimal(e["net_amount"])
        total = (net * Decimal("1.25") * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP)
        assert e["amount_minor"] == int(total)
        by_kind = {}
        for ln in e["lines"]:
            by_kind[ln["kind"]] = by_kind.get(ln["kind"], Decimal(0)) + Decimal(ln["amount"])
        others = sum(by_kind.get(k, Decimal(0)) for k in ("grid", "fixed", "demand"))
        if not offsets_fixed:  # credit never pays grid, fixed or demand charges
            assert net >= others + min(by_kind.get("energy", Decimal(0)), Decimal(0))
    assert sum(Decimal(e["kwh"]) for e in entries) * 1_000_000 == imported_mwh
    assert sum(Decimal(e["export_kwh"]) for e in entries) * 1_000_000 == exported_mwh


def run(s, t0, steps, meter="m-1", allowed=frozenset()):
    """Readings every ``minutes`` with ``per_minute`` × step Wh in and out (at most 6 kW)."""
    t, imp, exp = t0, 0, 0
    s.on_reading(meter, t, 0.0, 0.0)
    for minutes, i, x in steps:
        t += minutes * 60_000
        imp += minutes * i
        exp += minutes * x
        assert {k for k, _ in s.on_reading(meter, t, imp / 1000, exp / 1000)} <= allowed
    return t, imp * 1000, exp * 1000


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 20 * 24 * 4), steps=readings, offsets=st.booleans())
def test_parts_add_up_across_dst_months_and_versions(tmp_path_factory, start, steps, offsets):
    """From mid-October over the DST end, a version change on 2026-11-01 and into November:
    fixed prices with windows, grid bands, demand and a separate export price."""
    tmp = tmp_path_factory.mktemp("p")
    export = f"{{mode: separate, price: 0.50, offsets_fixed: {str(offsets).lower()}}}"
    text = VERSIONED % ("null", "price: 2.00\n    windows: [{price: 4.0, from: '06:00', "
                        "to: '09:00'}]", export, "2026-11-01", "price: 2.10", export)
    s = BillingStore(tmp / "b.sqlite", billing_config.parse_text(text), FLEET, TZ)
    t0 = ms(2026, 10, 15) + start * 900_000
    t, imp, exp = run(s, t0, steps)
    mid = [x.entry for x in s.settle("m-1", t0 + (t - t0) // 2)]
    entries = mid + [x.entry for x in s.settle("m-1", ms(2027, 1, 1))]
    check_parts(entries, imp, exp, offsets)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 30 * 4), steps=readings)
def test_parts_add_up_at_spot_across_the_repeated_hour(tmp_path_factory, start, steps):
    """Quarter-hourly spot prices (some negative) over the autumn DST day, a version change
    on 2026-10-26, net metering after it; whatever the file does not cover is held."""
    tmp = tmp_path_factory.mktemp("s")
    shutil.copy(DAYAHEAD, tmp / "p.json")
    (tmp / "billing.yaml").write_text(VERSIONED % (
        "p.json", "spot: {area: DK1, markup: 0.10}",
        "{mode: separate, spot: true, fee: 0.05}", "2026-10-26",
        "spot: {area: DK2}", "{mode: net}"))
    cfg = billing_config.load(tmp / "billing.yaml")
    s = BillingStore(tmp / "b.sqlite", cfg, FLEET, TZ)
    t0 = ms(2026, 10, 24, 12) + start * 900_000
    t, imp, exp = run(s, t0, steps, allowed={"unpriced"})
    entries = [x.entry for x in s.settle("m-1", ms(2026, 12, 1))]
    # Separate or netted, billed import less billed export is the registers' net, once:
    # what the price file does not cover is held, not lost.
    billed_in = sum(Decimal(e["kwh"]) for e in entries) * 1_000_000 + s.unpriced("m-1")
    billed_out = sum(Decimal(e["export_kwh"]) for e in entries) * 1_000_000 + \
        s.unpriced("m-1", "export")
    assert billed_in - billed_out == imp - exp
    for e in entries:
        assert sum(Decimal(ln["amount"]) for ln in e["lines"]) == Decimal(e["net_amount"])
        total = (Decimal(e["net_amount"]) * Decimal("1.25") * 100).quantize(
            Decimal(1), rounding=ROUND_HALF_UP)
        assert e["amount_minor"] == int(total)


def test_an_invoice_shows_energy_by_band_grid_demand_export_and_vat(tmp_path):
    """A spot household's October, settled twice, on its monthly invoice: spot energy at its
    average price, grid by band, the capacity charge once, the export credit, VAT."""
    from billing import invoices, render

    shutil.copy(DAYAHEAD, tmp_path / "p.json")
    (tmp_path / "billing.yaml").write_text(VERSIONED % (
        "p.json", "spot: {area: DK1}", "{mode: separate, spot: true}", "2027-01-01",
        "spot: {area: DK1}", "{mode: separate, spot: true}"))
    cfg = billing_config.load(tmp_path / "billing.yaml")
    s = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
    t, imp, exp = ms(2026, 10, 24, 10), 0.0, 0.0
    s.on_reading("m-1", t, imp, exp)
    for hour in range(48):
        t += 3_600_000
        imp += 1.0 if hour % 24 not in (17, 18) else 3.0
        exp += 2.0 if hour % 24 in (11, 12, 13) else 0.0
        assert s.on_reading("m-1", t, imp, exp) == []
        if hour == 20:
            s.settle("m-1", t)
    s.settle("m-1", ms(2026, 11, 1, 1), ended_periods_only=True)
    settled = [e for _, e, _ in s.entries()]
    [inv] = invoices.issue_due(s.db, cfg, TZ, ms(2026, 11, 1, 2))
    doc = inv.document
    assert inv.total_minor == sum(e["amount_minor"] for e in settled)
    kinds = {}
    for li in doc["lines"]:
        kinds.setdefault(li["kind"], []).append(li)
    [spot] = kinds["energy"]
    assert spot["label"] == "Spot DK1" and spot["average_price"]
    assert Decimal(spot["quantity"]) == Decimal(imp) == 56  # 44 hours at 1 kWh, 4 at 3
    by_band = {}
    for e in settled:
        for ln in e["lines"]:
            if ln["kind"] == "grid":
                by_band[ln["label"]] = by_band.get(ln["label"], 0) + Decimal(ln["quantity"])
    assert sorted(by_band) == ["Grid", "Grid Peak"]
    assert [(g["label"], Decimal(g["quantity"])) for g in kinds["grid"]] == sorted(
        by_band.items())
    [demand] = kinds["demand"]
    assert demand["quantity"] == "3" and demand["unit"] == "kW"  # 3 kWh in an hour: 3 kW
    assert kinds["export"][0]["label"] == "Export at spot DK1"
    assert doc["vat"][0]["rate"] == "0.25"
    html = render.render_html(doc)
    assert "Spot DK1" in html and "Capacity charge" in html and "Export at spot DK1" in html
