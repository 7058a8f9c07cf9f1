"""Spot prices from Energi Data Service price files: read, refused with their place, priced
across DST days, negative prices, and consumption the file does not cover held, never
guessed and never lost."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from billing import config as billing_config
from billing import prices
from billing.ledger import BillingStore
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.yamlconf import ConfigError

TZ = COPENHAGEN.tz
DATA = Path(__file__).parents[1] / "data" / "energidataservice"
ELSPOT = DATA / "elspotprices-2025-03-29.json"
DAYAHEAD = DATA / "dayaheadprices-2026-10-24.json"
FLEET = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.50, account_id="acc-1",
                           tariff="spot", max_power_w=17250.0)])


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text(), parse_float=Decimal)["records"]


def file_price(path: Path, area: str, ts_ms: int) -> Decimal:
    """The price per MWh the file gives the slot ts_ms is in, found the slow way."""
    col, price_col = (("HourUTC", "SpotPriceDKK") if "elspot" in path.name else
                      ("TimeUTC", "DayAheadPriceDKK"))
    slot = 3_600_000 if col == "HourUTC" else 900_000
    start = ts_ms // slot * slot
    stamp = datetime.fromtimestamp(start / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    [r] = [r for r in records(path) if r[col] == stamp and r["PriceArea"] == area]
    return r[price_col]


def config(tmp_path: Path, price_file: Path, tariff: str = "spot: {area: DK1, markup: 0.10}",
           currency: str = "DKK") -> billing_config.BillingConfig:
    local = tmp_path / "prices.json"
    if price_file != local:
        shutil.copy(price_file, local)
    path = tmp_path / "billing.yaml"
    path.write_text(f"currency: {currency}\nprice_file: prices.json\n"
                    f"tariffs:\n  spot:\n    {tariff}\n")
    return billing_config.load(path)


class TestPriceFile:
    def test_both_datasets_load_in_any_order(self):
        hourly = prices.load(ELSPOT, "DKK")
        quarterly = prices.load(DAYAHEAD, "EUR")
        assert set(hourly.areas) == {"DK1", "DK2"} and hourly.slot_ms("DK1") == 3_600_000
        assert quarterly.slot_ms("DK2") == 900_000
        # 2025-03-30 has 23 hours: 3 days are 71 hourly slots; 2026-10-25 has 25: 73 × 4.
        assert len(hourly.areas["DK1"].prices) == 71
        assert len(quarterly.areas["DK1"].prices) == 73 * 4
        t = ms(2025, 3, 30, 18, 30)
        assert hourly.per_mwh("DK1", t) == file_price(ELSPOT, "DK1", t)
        assert hourly.per_mwh("DK1", ms(2025, 4, 1, 0)) is None  # after the file
        assert hourly.per_mwh("SE3", t) is None

    def test_negative_prices_are_prices(self):
        p = prices.load(ELSPOT, "DKK")
        assert p.per_mwh("DK1", ms(2025, 3, 29, 12)) < 0

    @pytest.mark.parametrize("breakage, message", [
        ("gap", "DK1 has no price from 2025-03-30T10:00 to 2025-03-30T11:00 UTC (a gap)"),
        ("duplicate", "is a duplicate of records["),
        ("null", "SpotPriceDKK is None, not a number"),
        ("off-grid", "is not on the 60-minute grid"),
    ])
    def test_a_broken_file_is_refused_with_the_place(self, tmp_path, breakage, message):
        data = json.loads(ELSPOT.read_text())
        recs = data["records"]
        i = next(n for n, r in enumerate(recs)
                 if r["HourUTC"] == "2025-03-30T10:00:00" and r["PriceArea"] == "DK1")
        if breakage == "gap":
            del recs[i]
        elif breakage == "duplicate":
            recs.append(dict(recs[i]))
        elif breakage == "null":
            recs[i]["SpotPriceDKK"] = None
        else:
            recs[i]["HourUTC"] = "2025-03-30T10:30:00"
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        with pytest.raises(prices.PriceFileError) as e:
            prices.load(bad, "DKK")
        assert message in str(e.value) and str(bad) in str(e.value)
        assert "records[" in str(e.value)

    def test_not_a_price_file(self, tmp_path):
        bad = tmp_path / "bad.json"
        bad.write_text('{"records": [')
        with pytest.raises(prices.PriceFileError, match="line 1, column 14: not JSON"):
            prices.load(bad, "DKK")
        bad.write_text('{"rows": []}')
        with pytest.raises(prices.PriceFileError, match="expected .*records"):
            prices.load(bad, "DKK")

    def test_a_bad_price_file_refuses_the_billing_file(self, tmp_path):
        data = json.loads(ELSPOT.read_text())
        del data["records"][5]
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match="a gap"):
            config(tmp_path, bad)

    def test_spot_needs_a_price_file_and_its_currency(self, tmp_path):
        with pytest.raises(ConfigError, match="needs a price_file"):
            billing_config.parse_text("currency: DKK\ntariffs:\n  s: {spot: {area: DK1}}\n")
        with pytest.raises(ConfigError, match="not SEK"):
            billing_config.parse_text("currency: SEK\nprice_file: p.json\n"
                                      "tariffs:\n  s: {spot: {area: DK1}}\n")
        with pytest.raises(ConfigError, match="no price, windows or tiers"):
            billing_config.parse_text("currency: DKK\nprice_file: p.json\n"
                                      "tariffs:\n  s: {price: 1, spot: {area: DK1}}\n")

    def test_a_changed_file_is_read_again_and_a_bad_one_changes_nothing(self, tmp_path):
        path = tmp_path / "p.json"
        shutil.copy(ELSPOT, path)
        live = prices.PriceFile(path, "DKK")
        t = ms(2025, 3, 29, 8)
        before = live.current().per_mwh("DK1", t)
        data = json.loads(ELSPOT.read_text())
        del data["records"][3]
        path.write_text(json.dumps(data))
        os.utime(path, ns=(1, 1))  # a different stamp whatever the clock's resolution
        assert live.current(now=True).per_mwh("DK1", t) == before
        assert live.error is not None and "a gap" in live.error
        shutil.copy(DAYAHEAD, path)  # a good file: read, the error gone
        assert live.current(now=True).per_mwh("DK1", ms(2026, 10, 25, 2, 15)) is not None
        assert live.error is None


class TestSpotBilling:
    def test_every_hour_priced_at_its_own_spot_price_across_the_dst_day(self, tmp_path):
        """1 kWh in every hour of 2025-03-30 (23 of them): each at spot/1000 + markup."""
        cfg = config(tmp_path, ELSPOT)
        s = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
        t, end, kwh, expected = ms(2025, 3, 30), ms(2025, 3, 31), 0.0, Decimal(0)
        s.on_reading("m-1", t, kwh)
        while t < end:
            expected += file_price(ELSPOT, "DK1", t) / 1000 + Decimal("0.10")
            t += 3_600_000
            kwh += 1.0
            assert s.on_reading("m-1", t, kwh) == []
        assert kwh == 23.0
        [entry] = [x.entry for x in s.settle("m-1", ms(2025, 3, 31, 12))]
        [line] = entry["lines"]
        assert line["label"] == "Spot DK1" and line["quantity"] == "23.000000"
        assert Decimal(line["amount"]) == expected
        assert entry["amount_minor"] == int((expected * 100).to_integral_value("ROUND_HALF_UP"))

    def test_quarter_hour_prices_across_the_repeated_hour(self, tmp_path):
        """The autumn DST day's repeated 02:00 local: eight different quarter-hour slots."""
        cfg = config(tmp_path, DAYAHEAD, "spot: {area: DK2}")
        s = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
        first = int(datetime(2026, 10, 25, 0, 0, tzinfo=UTC).timestamp() * 1000)  # 02:00 CEST
        s.on_reading("m-1", first, 0.0)
        s.on_reading("m-1", first + 2 * 3_600_000, 2.0)  # two hours, 0.25 kWh a quarter
        expected = sum(file_price(DAYAHEAD, "DK2", first + q * 900_000) for q in range(8)) \
            * Decimal("0.25") / 1000
        [entry] = [x.entry for x in s.settle("m-1", first + 3 * 3_600_000)]
        assert Decimal(entry["net_amount"]) == expected

    def test_a_negative_price_is_a_credit(self, tmp_path):
        cfg = config(tmp_path, ELSPOT, "spot: {area: DK1}")
        s = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
        s.on_reading("m-1", ms(2025, 3, 29, 12), 0.0)
        s.on_reading("m-1", ms(2025, 3, 29, 13), 10.0)
        opening = s.balance("acc-1")
        [entry] = [x.entry for x in s.settle("m-1", ms(2025, 3, 29, 14))]
        assert Decimal(entry["net_amount"]) == file_price(ELSPOT, "DK1", ms(2025, 3, 29, 12)) \
            / 100 < 0
        assert entry["amount_minor"] < 0
        assert s.balance("acc-1") == opening - entry["amount_minor"]  # the balance rose

    def test_consumption_the_file_does_not_cover_is_held_then_billed_once(self, tmp_path):
        cfg = config(tmp_path, ELSPOT, "spot: {area: DK1}")
        s = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
        s.on_reading("m-1", ms(2025, 3, 31, 22), 0.0)
        assert s.on_reading("m-1", ms(2025, 4, 1, 0), 1.0) == []
        events = s.on_reading("m-1", ms(2025, 4, 1, 2), 3.0)  # after the file's last hour
        assert [k for k, _ in events] == ["unpriced"]
        assert "2.000 kWh" in events[0][1] and "not guessed" in events[0][1]
        assert s.unpriced("m-1") == 2_000_000
        first = [x.entry for x in s.settle("m-1", ms(2025, 4, 1, 2))]
        assert [e["kwh"] for e in first] == ["1.000000"]  # March's hour; April's held
        assert s.settle("m-1", ms(2025, 4, 1, 3)) == []  # still no price: nothing billed
        # The next day's prices arrive: the file now covers April 1st.
        data = json.loads(ELSPOT.read_text(), parse_float=Decimal)
        data["records"] += [{"HourUTC": f"2025-03-31T{h:02d}:00:00", "HourDK": "",
                             "PriceArea": area, "SpotPriceDKK": Decimal(100 * h),
                             "SpotPriceEUR": Decimal(1)}
                            for h in (22, 23) for area in ("DK1", "DK2")]
        path = Path(cfg.price_file)
        path.write_text(json.dumps(data, default=float))
        os.utime(path, ns=(2, 2))
        [later] = [x.entry for x in s.settle("m-1", ms(2025, 4, 1, 4))]
        assert later["kwh"] == "2.000000" and s.unpriced("m-1") == 0
        # 1 kWh at 2200 DKK/MWh (00:00 local = 22:00 UTC), 1 kWh at 2300.
        assert Decimal(later["net_amount"]) == Decimal("4.5")
        assert s.settle("m-1", ms(2025, 4, 1, 5)) == []


def test_the_unpriced_alert_clears_once_the_held_consumption_is_billed(tmp_path):
    from rules.engine import RuleEngine
    from rules.loader import load
    from tests.unit.test_billing import Box

    cfg = config(tmp_path, ELSPOT, "spot: {area: DK1}")
    s = BillingStore(tmp_path / "b.sqlite", cfg, FLEET, TZ)
    engine = RuleEngine(load(), FLEET, COPENHAGEN, Box(), billing=s)
    key = "billing-unpriced@m-1"
    for seq, (ts, kwh) in enumerate([(ms(2025, 3, 31, 23), 0.0), (ms(2025, 4, 1, 1), 2.0)]):
        engine.on_reading("m-1", {"seq": seq + 1, "energy_kwh": kwh, "power_w": 500.0}, ts)
    assert engine.alerting.by_key[key].active
    settle = engine.actions["settle"]
    settle.settle(FLEET.by_id["m-1"], False, ms(2025, 4, 1, 2))
    assert engine.alerting.by_key[key].active  # still held: the file ends on March 31st
    data = json.loads(ELSPOT.read_text(), parse_float=Decimal)
    data["records"] += [{"HourUTC": f"2025-03-31T{h:02d}:00:00", "HourDK": "",
                         "PriceArea": a, "SpotPriceDKK": 500, "SpotPriceEUR": 67}
                        for h in (22, 23) for a in ("DK1", "DK2")]
    Path(cfg.price_file).write_text(json.dumps(data, default=float))
    os.utime(cfg.price_file, ns=(3, 3))
    settle.settle(FLEET.by_id["m-1"], False, ms(2025, 4, 1, 3))
    assert not engine.alerting.by_key[key].active and s.unpriced("m-1") == 0


def test_a_price_file_is_parsed_once_until_it_changes(tmp_path):
    """The billing file's check and the store's PriceFile read the same file at start-up:
    parsed once. A new file in its place (written beside and renamed, as documented) is
    read again."""
    path = tmp_path / "prices.json"
    shutil.copy(DAYAHEAD, path)
    first = prices.load(path, "DKK")
    assert prices.load(path, "DKK") is first
    assert prices.load(path, "EUR") is not first  # another currency: another parse
    data = json.loads(DAYAHEAD.read_text())
    data["records"][0]["DayAheadPriceDKK"] = 1234.5
    (tmp_path / "new.json").write_text(json.dumps(data))
    os.replace(tmp_path / "new.json", path)
    again = prices.load(path, "DKK")
    assert again is not first and again.areas != first.areas
