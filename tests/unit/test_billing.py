"""Billing: configuration, tariffs (TOU, DST, tiers), accounting properties, the ledger."""

from __future__ import annotations

import json
import random
import sqlite3
import uuid
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import config as billing_config
from billing import tariffs
from billing.ledger import BillingStore, LedgerError, canonical, entry_hash, verify
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.yamlconf import ConfigError
from tests.helpers import REPO, Box

TZ = COPENHAGEN.tz
CONFIG = billing_config.load()


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


FLEET = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.50, account_id="acc-1",
                           tariff="household-tou", max_power_w=17250.0),
               FleetDevice("m-2", "meter", "valby", 55.66, 12.50, account_id="acc-2",
                           tariff="business-flat", max_power_w=17250.0)])


def store(tmp_path, cfg=CONFIG, name="billing.sqlite") -> BillingStore:
    return BillingStore(tmp_path / name, cfg, FLEET, TZ)


class TestConfig:
    def test_the_shipped_example(self):
        assert CONFIG.currency == "DKK"
        tou = CONFIG.tariffs["household-tou"]
        assert tou.price == Decimal("2.00") and tou.windows[0].price == Decimal("4.00")
        assert CONFIG.tariffs["business-flat"].price == Decimal("2.50")
        assert CONFIG.minor(CONFIG.account("anyone").opening_balance) == 100_000
        assert CONFIG.binding("m-1", FLEET).tariff == "household-tou"

    def test_errors_are_located(self):
        text = """\
version: 1
currency: dkk
tariffs:
  tou:
    price: 2
    windows: [{price: 4, from: "21:00", to: "17:00"}]
  odd: {tiers: [{price: 1, upto_kwh: 10}]}
meters:
  m-9: {account: a, tariff: nope}
colour: red
"""
        with pytest.raises(ConfigError) as e:
            billing_config.parse_text(text, "billing.yaml")
        got = [str(p) for p in e.value.problems]
        assert any(p.startswith("billing.yaml:2:11: currency: got 'dkk'") for p in got)
        assert any(p.startswith("billing.yaml:6:15:") and "runs forward" in p for p in got)
        assert any(p.startswith("billing.yaml:7:8:") and "open-ended" in p for p in got)
        assert any(p.startswith("billing.yaml:10:1: unknown key 'colour'") for p in got)


class TestTariffs:
    def price(self, tariff, t0, t1, mwh, used=None):
        return tariffs.price(CONFIG, tariff, TZ, t0, t1, mwh, used if used is not None else {})

    @pytest.mark.parametrize("start", [ms(2026, 3, 27), ms(2026, 10, 23), ms(2026, 11, 29)])
    def test_the_span_cache_finds_the_cuts_the_days_give(self, start):
        """``price`` skips the day-by-day search when the interval lies between two cuts
        already known: it must find exactly the cuts the search finds, whatever came first.
        Meter-like intervals (a minute to three hours, each after the one before, now and
        then a jump) across a DST change or a month's end."""
        rng = random.Random(start)
        t, crossed = start, 0
        for _ in range(5000):
            t0 = t if rng.random() < 0.9 else start + rng.randrange(8 * 86_400_000)
            t1 = t0 + rng.choice((60_000, 600_000, rng.randrange(1, 3 * 3_600_000)))
            for name in ("household-tou", "business-flat"):
                tariff = CONFIG.tariffs[name]
                want = tariffs._boundaries(tariff, TZ, t0, t1)
                assert tariffs._cuts_inside(tariff, TZ, t0, t1) == want, (name, t0, t1)
                crossed += bool(want)
            t = t1
        assert crossed > 50  # the intervals did cross cuts

    def test_an_interval_is_split_at_the_evening_boundary(self):
        segs = self.price("household-tou", ms(2026, 11, 27, 16), ms(2026, 11, 27, 18), 2_000_000)
        assert [(s.mwh, s.price) for s in segs] == [(1_000_000, Decimal("2.00")),
                                                    (1_000_000, Decimal("4.00"))]
        assert sum(s.amount for s in segs) == Decimal("6.00")

    @pytest.mark.parametrize("day, hours", [((2026, 3, 29), 23), ((2026, 10, 25), 25),
                                            ((2026, 11, 27), 24)])
    def test_dst_days_price_their_real_length(self, day, hours):
        mwh = hours * 1_000_000  # 1 kWh an hour, all day
        segs = self.price("household-tou", ms(*day), ms(*day) + hours * 3_600_000, mwh)
        assert sum(s.mwh for s in segs) == mwh
        expensive = sum(s.mwh for s in segs if s.price == Decimal("4.00"))
        assert expensive == 4_000_000  # 17:00–21:00 is four hours on every day
        assert sum(s.amount for s in segs) == Decimal(hours - 4) * 2 + 4 * 4

    def test_tiers_roll_over_at_the_end_of_the_month(self):
        cfg = billing_config.parse_text("""
currency: DKK
tariffs:
  tiered: {tiers: [{price: 1.00, upto_kwh: 100}, {price: 3.00}]}
""")
        used: dict[str, int] = {}
        segs = tariffs.price(cfg, "tiered", TZ, ms(2026, 11, 30, 12), ms(2026, 12, 1, 12),
                             240_000_000, used)
        # 120 kWh in November: 100 at 1.00 and 20 at 3.00; 120 kWh in December: 100 + 20 again.
        assert [(s.period, s.mwh, s.price) for s in segs] == [
            ("2026-11", 100_000_000, Decimal("1.00")), ("2026-11", 20_000_000, Decimal("3.00")),
            ("2026-12", 100_000_000, Decimal("1.00")), ("2026-12", 20_000_000, Decimal("3.00"))]
        assert used == {"2026-11": 120_000_000, "2026-12": 120_000_000}


class TestAccounting:
    def feed(self, s: BillingStore, readings):
        events = []
        for ts, kwh in readings:
            events += s.on_reading("m-2", ts, kwh)
        return events

    def test_duplicates_and_late_readings_count_once(self, tmp_path):
        s = store(tmp_path)
        t = ms(2026, 11, 2, 10)
        self.feed(s, [(t, 100.0), (t + 60_000, 100.1), (t + 60_000, 100.1), (t + 30_000, 100.05),
                      (t + 120_000, 100.2)])
        assert s.unbilled("m-2")["kwh"] == pytest.approx(0.2)

    def test_a_decrease_is_a_meter_swap_not_negative_use(self, tmp_path):
        s = store(tmp_path)
        t = ms(2026, 11, 2, 10)
        events = self.feed(s, [(t, 15_000.0), (t + 60_000, 15_000.1), (t + 120_000, 0.05)])
        assert s.unbilled("m-2")["kwh"] == pytest.approx(0.15)
        assert [k for k, _ in events] == ["reset"]

    def test_a_glitch_spike_is_flagged_and_dropped(self, tmp_path):
        s = store(tmp_path)
        t = ms(2026, 11, 2, 10)
        events = self.feed(s, [(t, 100.0), (t + 60_000, 15_100.0), (t + 120_000, 100.2)])
        assert [k for k, _ in events] == ["spike", "spike_dropped"]
        assert s.unbilled("m-2")["kwh"] == pytest.approx(0.2)

    def test_a_real_jump_is_held_out_of_billing(self, tmp_path):
        s = store(tmp_path)
        t = ms(2026, 11, 2, 10)
        events = self.feed(s, [(t, 100.0), (t + 60_000, 5_100.0), (t + 120_000, 5_100.1)])
        assert [k for k, _ in events] == ["spike", "held"]
        assert s.unbilled("m-2")["kwh"] == pytest.approx(0.1)

    def test_consumption_across_a_gap_is_kept(self, tmp_path):
        s = store(tmp_path)
        t = ms(2026, 11, 2, 10)
        self.feed(s, [(t, 100.0), (t + 6 * 3_600_000, 110.0)])  # six hours, 10 kWh
        assert s.unbilled("m-2")["kwh"] == pytest.approx(10.0)


@st.composite
def meter_history(draw):
    """True consumption per minute, resets, then what the network delivers."""
    n = draw(st.integers(3, 60))
    used = draw(st.lists(st.integers(0, 250_000), min_size=n, max_size=n))  # mWh per minute
    resets = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    register, truth, readings = draw(st.integers(0, 10**10)), 0, []
    t0 = ms(2026, 11, 30, 20)  # crosses into December: two periods
    for i in range(n):
        # A swap shows only as a fall of the register (a new meter that already reads more
        # than the old one is indistinguishable from no swap), so a reset here always falls.
        reset = i > 0 and resets[i] and used[i] < register
        if reset:
            register = used[i]  # the new meter counted from zero during this interval
        else:
            register += used[i] if i else 0
        truth += used[i] if i else 0
        readings.append((t0 + i * 3_600_000 // 2, register, reset))
    delivered = [readings[0]]
    for i, r in enumerate(readings[1:], start=1):
        before_reset = i + 1 < n and readings[i + 1][2]
        # Resets, the reading just before one (the old meter's last word: without it the
        # old meter's final consumption is unknowable) and the last reading always arrive;
        # any other may be lost (a gap) — and any may arrive twice.
        if r[2] or before_reset or i == n - 1 or draw(st.integers(0, 3)):
            delivered.append(r)
        if draw(st.integers(0, 5)) == 0:
            delivered.append(r)
    # Late arrivals: swap neighbours that are not resets (never across a reset).
    for _ in range(draw(st.integers(0, 5))):
        k = draw(st.integers(1, max(1, len(delivered) - 2)))
        if k + 1 < len(delivered) and not delivered[k][2] and not delivered[k + 1][2]:
            delivered[k], delivered[k + 1] = delivered[k + 1], delivered[k]
    # The truth the platform can know: up to the newest reading it received.
    newest = max(delivered, key=lambda r: r[0])
    known = sum(used[1:readings.index(newest) + 1])
    settles = draw(st.lists(st.integers(0, len(delivered) - 1), max_size=6))
    return delivered, known, set(settles)


class TestProperties:
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(history=meter_history())
    def test_billed_equals_consumed_once_and_balance_matches_ledger(self, tmp_path, history):
        delivered, known, settle_at = history
        s = store(tmp_path, name=f"p{uuid.uuid4().hex}.sqlite")  # hypothesis seeds `random`
        for i, (ts, register, _) in enumerate(delivered):
            s.on_reading("m-2", ts, register / 1_000_000)
            if i in settle_at:
                s.settle("m-2", ts)
                assert s.settle("m-2", ts) == []  # a replay settles nothing
        last = max(ts for ts, _, _ in delivered)
        s.settle("m-2", last + 86_400_000 * 40)
        entries = s.entries()
        billed = sum(round(Decimal(e["kwh"]) * 1_000_000) for _, e, _ in entries)
        assert billed == known
        assert len({e["key"] for _, e, _ in entries}) == len(entries)
        assert s.balance("acc-2") == 100_000 - sum(e["amount_minor"] for _, e, _ in entries)
        assert verify(s.path)[0] == len(entries)
        s.close()


class TestLedger:
    def make(self, tmp_path, n=4) -> BillingStore:
        s = store(tmp_path)
        t = ms(2026, 11, 2, 10)
        for i in range(n):
            s.on_reading("m-2", t + i * 3_600_000, 100 + 10 * i)
            s.on_reading("m-2", t + i * 3_600_000 + 60_000, 100 + 10 * i + 0.2)
            s.settle("m-2", t + i * 3_600_000 + 60_000)
        return s

    def test_chain_verifies_and_amounts_are_right(self, tmp_path):
        s = self.make(tmp_path)
        entries = s.entries()
        assert [e["seq"] for _, e, _ in entries] == [1, 2, 3, 4]
        assert entries[0][1]["prev_hash"] == "0" * 64
        # 0.2 kWh on business-flat at 2.50 DKK: 0.50 DKK = 50 øre; then 9.8 + 0.2 kWh each.
        assert [e["amount_minor"] for _, e, _ in entries] == [50, 2500, 2500, 2500]
        assert [e["kwh"] for _, e, _ in entries] == ["0.200000"] + ["10.000000"] * 3
        assert verify(tmp_path / "billing.sqlite") == (4, entries[-1][2])
        assert entry_hash(entries[1][1]) == entries[1][2]
        assert canonical({"b": 1, "a": "ø"}) == '{"a":"ø","b":1}'.encode()

    def tamper(self, tmp_path, sql: str, params=()) -> LedgerError:
        db = sqlite3.connect(tmp_path / "billing.sqlite")
        db.execute(sql, params)
        db.commit()
        db.close()
        with pytest.raises(LedgerError) as e:
            verify(tmp_path / "billing.sqlite")
        return e.value

    def test_an_edited_amount_is_caught(self, tmp_path):
        s = self.make(tmp_path)
        _, entry, _ = s.entries()[2]
        entry["amount_minor"] = 1
        err = self.tamper(tmp_path, "UPDATE ledger SET entry = ? WHERE seq = 3",
                          (json.dumps(entry),))
        assert err.seq == 3 and "edited" in str(err)

    def test_a_deleted_entry_is_caught(self, tmp_path):
        self.make(tmp_path)
        err = self.tamper(tmp_path, "DELETE FROM ledger WHERE seq = 2")
        assert err.seq == 3 and "does not follow" in str(err)

    def test_an_inserted_entry_is_caught(self, tmp_path):
        s = self.make(tmp_path)
        _, forged, _ = s.entries()[1]
        forged["amount_minor"] = 0
        forged["key"] = "forged"
        err = self.tamper(tmp_path, "INSERT INTO ledger VALUES (100, 'forged', ?, ?)",
                          (json.dumps(forged), entry_hash(forged)))
        assert err.seq == 100

    def test_reordered_entries_are_caught(self, tmp_path):
        self.make(tmp_path)
        db = sqlite3.connect(tmp_path / "billing.sqlite")
        db.execute("UPDATE ledger SET seq = -2 WHERE seq = 2")
        db.execute("UPDATE ledger SET seq = 2 WHERE seq = 3")
        db.execute("UPDATE ledger SET seq = 3 WHERE seq = -2")
        db.commit()
        db.close()
        with pytest.raises(LedgerError) as e:
            verify(tmp_path / "billing.sqlite")
        assert e.value.seq == 2

    def test_truncation_and_new_appends_are_caught_with_a_recorded_head(self, tmp_path):
        s = self.make(tmp_path)
        head = s.entries()[-1][2]
        s.db.execute("DELETE FROM ledger WHERE seq >= 3")
        s.db.commit()
        t = ms(2026, 11, 2, 14)
        s.on_reading("m-2", t, 131.0)
        s.settle("m-2", t)
        assert verify(tmp_path / "billing.sqlite")[0] == 3  # consistent on its own…
        with pytest.raises(LedgerError) as e:
            verify(tmp_path / "billing.sqlite", head=head)  # …but the old head is gone
        assert "is not in the ledger" in str(e.value)


class TestThroughTheRules:
    """The `settle` action and `meter.*` conditions, with a fake outbox."""

    def engine(self, tmp_path, cfg_text: str | None = None):
        from rules.engine import RuleEngine
        from rules.loader import load

        cfg = billing_config.parse_text(cfg_text) if cfg_text else CONFIG
        box = Box()
        billing = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
        return RuleEngine(load(), FLEET, COPENHAGEN, box, billing=billing), box, billing

    def reading(self, kwh):
        return {"seq": 1, "energy_kwh": kwh, "power_w": 500.0}

    def test_ten_kwh_settles_and_month_end_settles_the_rest(self, tmp_path):
        engine, box, billing = self.engine(tmp_path)
        t = ms(2026, 11, 30, 9)
        engine.on_reading("m-2", self.reading(100.0), t)
        engine.on_reading("m-2", self.reading(106.0), t + 3_600_000)
        assert billing.entries() == []  # 6 kWh: not yet
        engine.on_reading("m-2", self.reading(111.0), t + 2 * 3_600_000)
        [(_, first, _)] = billing.entries()
        assert first["kwh"] == "11.000000" and first["amount_minor"] == 2750
        assert box.published[-1][0] == "city/v1/valby/meter/m-2/settlement"
        engine.on_reading("m-2", self.reading(114.0), ms(2026, 11, 30, 23, 30))
        engine.on_reading("m-2", self.reading(115.0), ms(2026, 12, 1, 0, 30))  # a new month
        periods = [(e["period"], e["kwh"]) for _, e, _ in billing.entries()[1:]]
        assert periods == [("2026-11", "3.500000"), ("2026-12", "0.500000")]

    def test_a_low_balance_raises_an_alert(self, tmp_path):
        engine, box, billing = self.engine(tmp_path, """
currency: DKK
tariffs: {business-flat: {price: 2.50}, household-tou: {price: 2.00}}
account_defaults: {opening_balance: 30.00, low_balance: 10.00}
""")
        t = ms(2026, 11, 2, 9)
        engine.on_reading("m-2", self.reading(100.0), t)
        engine.on_reading("m-2", self.reading(110.0), t + 3_600_000)  # 25.00 DKK: 5.00 left
        assert ("low-balance@acc-2", True) in [(k, r) for k, r, _ in box.alerts]
        assert billing.balance("acc-2") == 500

    def test_a_spike_is_an_alert_and_not_billed(self, tmp_path):
        engine, box, billing = self.engine(tmp_path)
        t = ms(2026, 11, 2, 9)
        for i, kwh in enumerate([100.0, 9_100.0, 100.2, 100.3]):
            engine.on_reading("m-2", self.reading(kwh), t + i * 60_000)
        assert [(k, r) for k, r, _ in box.alerts] == [("billing-spike@m-2", True),
                                                     ("billing-spike@m-2", False)]
        assert billing.unbilled("m-2")["kwh"] == pytest.approx(0.3)


STANDING = billing_config.parse_text("""
currency: DKK
tariffs: {business-flat: {price: 2.50, standing_charge_per_month: 30.00}}
""")


def test_standing_charge_once_per_ended_month(tmp_path):
    s = store(tmp_path, STANDING)
    s.on_reading("m-2", ms(2026, 11, 29, 9), 100.0)
    s.on_reading("m-2", ms(2026, 11, 29, 10), 101.0)
    [first] = s.settle("m-2", ms(2026, 11, 29, 10))
    assert first.entry["amount_minor"] == 250  # November is not over: no standing charge yet
    s.on_reading("m-2", ms(2026, 11, 29, 11), 102.0)
    [second] = s.settle("m-2", ms(2026, 12, 1, 9))
    assert second.entry["amount_minor"] == 250 + 3000
    s.on_reading("m-2", ms(2026, 11, 29, 12), 103.0)
    [third] = s.settle("m-2", ms(2026, 12, 1, 10))
    assert third.entry["amount_minor"] == 250  # charged once for November


def test_a_month_the_meter_sent_nothing_in_still_gets_its_fixed_charges_once(tmp_path):
    """Settled mid-March, then silent until May with the register where it was: March and
    April owe their standing charge all the same; months before the meter's first reading
    and after its last owe nothing; settling again charges none twice."""
    cfg = STANDING
    s = store(tmp_path, cfg)
    s.on_reading("m-2", ms(2026, 3, 10, 9), 100.0)
    s.on_reading("m-2", ms(2026, 3, 10, 10), 101.0)
    assert [x.entry["amount_minor"] for x in s.settle("m-2", ms(2026, 3, 10, 10))] == [250]
    assert s.unbilled("m-2")["uncharged_period"] == "2026-03"
    s.on_reading("m-2", ms(2026, 5, 2, 9), 101.0)  # nothing used since
    assert s.unbilled("m-2")["oldest_period"] is None  # nothing unbilled: yet a month ended
    from rules.context import meter_value
    device = FLEET.by_id["m-2"]
    assert meter_value(s, device, "period_ended", ms(2026, 5, 2, 9), TZ) is True
    done = s.settle("m-2", ms(2026, 5, 2, 9))
    assert [(x.entry["period"], x.entry["amount_minor"], x.entry["kwh"]) for x in done] == [
        ("2026-03", 3000, "0.000000"), ("2026-04", 3000, "0.000000")]
    assert (done[1].entry["from_ms"], done[1].entry["to_ms"]) == (ms(2026, 4, 1), ms(2026, 5, 1))
    assert s.settle("m-2", ms(2026, 5, 2, 10)) == []  # once
    assert meter_value(s, device, "period_ended", ms(2026, 5, 2, 10), TZ) is False
    assert store(tmp_path, cfg).unbilled("m-2")["uncharged_period"] == "2026-05"  # re-read
    # The meter's last reading in May: June, July… owe nothing until it is heard of again.
    [may] = s.settle("m-2", ms(2026, 8, 1))
    assert (may.entry["period"], may.entry["amount_minor"]) == ("2026-05", 3000)
    assert s.settle("m-2", ms(2026, 8, 2)) == [] and len(s.entries()) == 4
    assert not any(e["period"] < "2026-03" for _, e, _ in s.entries())


def test_a_tariff_without_fixed_charges_writes_no_empty_entries_for_a_silent_month(tmp_path):
    cfg = billing_config.parse_text("""
currency: DKK
tariffs: {business-flat: {price: 2.50}}
""")
    s = store(tmp_path, cfg)
    s.on_reading("m-2", ms(2026, 3, 10, 9), 100.0)
    s.on_reading("m-2", ms(2026, 3, 10, 10), 101.0)
    s.settle("m-2", ms(2026, 3, 10, 10))
    s.on_reading("m-2", ms(2026, 6, 2, 9), 101.0)
    assert s.settle("m-2", ms(2026, 6, 2, 9)) == [] and len(s.entries()) == 1
    assert s.unbilled("m-2")["uncharged_period"] == "2026-06"  # done with: no trigger again


def test_ledger_cli_verify_head_list(tmp_path):
    import subprocess
    import sys


    s = store(tmp_path)
    s.on_reading("m-2", ms(2026, 11, 2, 9), 100.0)
    s.on_reading("m-2", ms(2026, 11, 2, 10), 112.0)
    s.settle("m-2", ms(2026, 11, 2, 10))
    s.close()

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cityctl", "ledger", *args, "--data-dir",
                               str(tmp_path)], capture_output=True, text=True, cwd=REPO)

    head = run("head").stdout.strip()
    ok = run("verify", "--head", head)
    assert ok.returncode == 0 and f"ledger ok: 1 entries, head {head}" in ok.stdout
    listed = run("list", "--meter", "m-2", "--json")
    assert json.loads(listed.stdout)[0]["kwh"] == "12.000000"
    db = sqlite3.connect(tmp_path / "billing.sqlite")
    db.execute("UPDATE ledger SET entry = replace(entry, '\"amount_minor\":3000', "
               "'\"amount_minor\":30')")
    db.commit()
    bad = run("verify")
    assert bad.returncode == 1 and "entry 1 (m-2:" in bad.stdout and "edited" in bad.stdout


def test_the_running_unbilled_total_equals_the_unbilled_rows(tmp_path):
    """The store keeps each meter's unbilled total in memory (the rules ask for it on every
    reading); it must always equal what a fresh store sums from the table."""
    s = store(tmp_path)
    t = ms(2026, 3, 2, 16)
    s.on_reading("m-1", t, 100.0)
    s.unbilled("m-1")  # now cached
    for i in range(1, 40):
        s.on_reading("m-1", t + i * 900_000, 100.0 + 0.7 * i)  # through the 17–21 peak
        fresh = store(tmp_path).unbilled("m-1")
        assert s.unbilled("m-1") == fresh
    assert fresh["kwh"] == pytest.approx(0.7 * 39)
    s.settle("m-1", t + 40 * 900_000)
    assert s.unbilled("m-1") == store(tmp_path).unbilled("m-1") == {
        "kwh": 0, "amount": 0.0, "oldest_period": None, "uncharged_period": "2026-03"}


def test_a_store_from_before_meter_since_never_bills_months_long_past(tmp_path):
    """A meter the store knew before it kept the month of a meter's first reading: months
    before the newest already charged stay as they were (an upgrade never bills January
    in May); from there on it is charged like any other."""
    s = store(tmp_path, STANDING)
    s.on_reading("m-2", ms(2026, 1, 10, 9), 100.0)
    s.on_reading("m-2", ms(2026, 1, 10, 10), 101.0)
    s.settle("m-2", ms(2026, 1, 10, 10))  # mid-January: no standing charge yet
    s.close()
    # As an older store left it: no meter_since; March charged, January and February not
    # (they had nothing unbilled when they ended).
    with sqlite3.connect(tmp_path / "billing.sqlite") as db:
        db.execute("DELETE FROM meter_since")
        db.execute("INSERT INTO standing_charged VALUES ('m-2', '2026-03')")
    s = store(tmp_path, STANDING)
    s.on_reading("m-2", ms(2026, 5, 2, 9), 101.0)  # nothing used since
    assert [(x.entry["period"], x.entry["amount_minor"])
            for x in s.settle("m-2", ms(2026, 5, 2, 10))] == [("2026-04", 3000)]
