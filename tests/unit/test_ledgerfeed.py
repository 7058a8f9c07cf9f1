"""The ledger as citygrid_ledger points: every entry once, whoever appended it."""

from __future__ import annotations

from billing import load_config
from billing.ledger import BillingStore, append
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from rules.ledgerfeed import LEDGER_MEASUREMENT, LedgerFeed

T0 = 1_790_000_000_000
FLEET = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.5, account_id="acc-a",
                           tariff="business-flat", max_power_w=17250.0)])


def test_settlements_and_payments_become_points_once(tmp_path):
    config = load_config()
    store = BillingStore(tmp_path / "billing.sqlite", config, FLEET, COPENHAGEN.tz)
    written: list = []
    feed = LedgerFeed(tmp_path, written.extend, seq=0)
    assert feed.tick() is False  # nothing yet
    store.on_reading("m-1", T0, 10.0)
    store.on_reading("m-1", T0 + 3_600_000, 12.0)  # 2 kWh at 2.50: 500 øre
    store.settle("m-1", T0 + 3_600_000)
    append(store.db, config, "payment:x", "acc-a", {
        "kind": "payment", "amount_minor": 500, "currency": "DKK",
        "confirmed_at_ms": T0 + 7_200_000}, 500)
    assert feed.tick() is True
    assert [(p.measurement, p.tags["kind"], p.fields["change_minor"], p.fields["balance_minor"])
            for p in written] == [(LEDGER_MEASUREMENT, "settlement", -500, 99_500),
                                  (LEDGER_MEASUREMENT, "payment", 500, 100_000)]
    assert [p.ts_ms for p in written] == [T0 + 3_600_000, T0 + 7_200_000]
    assert all(p.tags["account"] == "acc-a" and p.fields["outstanding_minor"] == 0
               for p in written)
    assert feed.tick() is False and len(written) == 2 and feed.seq == 2
    store.close()


def test_a_negative_balance_is_outstanding(tmp_path):
    config = load_config()
    store = BillingStore(tmp_path / "billing.sqlite", config, FLEET, COPENHAGEN.tz)
    append(store.db, config, "big", "acc-a", {"settled_at_ms": T0, "amount_minor": 150_000},
           -150_000)
    written: list = []
    LedgerFeed(tmp_path, written.extend, seq=0).tick()
    assert written[0].fields["outstanding_minor"] == 50_000
    store.close()
