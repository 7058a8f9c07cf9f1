"""Invoices and credit notes (billing/invoices.py, billing/render.py, billing/invoice_cli.py,
gateway/routes/invoices.py): built from the ledger, numbered without gaps, part of the hash
chain, corrected only by credit notes; rendered as HTML and PDF; the API with fakes."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from billing import config as billing_config
from billing import invoices, ledger, render
from billing.ledger import BillingStore, LedgerError, verify
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.registry import Registry
from citygrid.settings import Settings
from gateway.app import create_app
from gateway.routes.invoices import account_scope
from gateway.tokens import create_token
from tests.unit.test_gateway_fakes import PROBLEM, FakeFeed, FakePublisher, FakeStore

TZ = COPENHAGEN.tz
H = 3_600_000
CONFIG_TEXT = """
version: 1
currency: DKK
tariffs:
  flat: {price: 2.00, standing_charge_per_month: 25.00}
  tou: {price: 2.00, windows: [{price: 4.00, from: "17:00", to: "21:00"}]}
accounts:
  acc-1: {name: "Søren <script>alert(1)</script> & Co", opening_balance: 1000}
  acc-2: {name: Amager Bageri, opening_balance: 1000}
  acc-3: {opening_balance: 1000}
"""
CONFIG = billing_config.parse_text(CONFIG_TEXT)
FLEET = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.5, account_id="acc-1",
                           tariff="flat", max_power_w=17250.0),
               FleetDevice("m-2", "meter", "valby", 55.66, 12.5, account_id="acc-2",
                           tariff="tou", max_power_w=17250.0),
               FleetDevice("m-3", "meter", "valby", 55.66, 12.5, account_id="acc-3",
                           tariff="flat", max_power_w=17250.0)])


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def read(store: BillingStore, meter: str, start: int, hours: int, kwh0: float = 0.0,
         per_h: float = 1.0) -> float:
    for i in range(hours + 1):
        store.on_reading(meter, start + i * H, kwh0 + i * per_h)
    return kwh0 + hours * per_h


@pytest.fixture
def store(tmp_path):
    s = BillingStore(tmp_path / "billing.sqlite", CONFIG, FLEET, TZ)
    yield s
    s.close()


def march(store: BillingStore) -> None:
    """acc-1 and acc-2 settle twice in March 2026 (ended), acc-1's standing charge with it."""
    for meter in ("m-1", "m-2"):
        k = read(store, meter, ms(2026, 3, 2), 20)
        store.settle(meter, ms(2026, 3, 3))
        read(store, meter, ms(2026, 3, 2) + 20 * H, 30, k)
        store.settle(meter, ms(2026, 4, 1, 0, 30), ended_periods_only=True)


def ledger_rows(store: BillingStore) -> list[dict]:
    return [e for _, e, _ in store.entries()]


def new_shape(store: BillingStore, key: str, account: str, period: str, lines: list[dict],
              rate: str, net: str, vat: str, minor: int) -> None:
    """A settlement as the richer settlement writes it: lines, net, VAT."""
    ledger.append(store.db, CONFIG, key, account, {
        "meter": "m-x", "account": account, "tariff": "tou", "period": period,
        "from_ms": ms(2026, 3, 1), "to_ms": ms(2026, 3, 31), "kwh": "0", "energy_amount": "0",
        "standing_charge": "0", "amount_minor": minor, "currency": "DKK",
        "settled_at_ms": ms(2026, 4, 1), "lines": lines, "net_amount": net, "vat_rate": rate,
        "vat_amount": vat, "export_kwh": "0"}, -minor)


# ------------------------------------------------------------------ built from the ledger


def test_settlements_give_an_energy_and_a_standing_line_and_the_total_they_debited(store):
    march(store)
    [inv] = [i for i in invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1))
             if i.account == "acc-1"]
    doc = inv.document
    settled = [e for e in ledger_rows(store) if e.get("account") == "acc-1" and "kind" not in e]
    assert len(settled) == 2 and len(doc["entries"]) == 2
    assert inv.total_minor == doc["total_minor"] == sum(e["amount_minor"] for e in settled)
    assert inv.total_minor == 50 * 200 + 2500  # 50 kWh at 2.00 and one standing charge
    energy, fixed = doc["lines"]
    assert (energy["kind"], energy["quantity"], energy["unit"], energy["amount_minor"]) == \
        ("energy", "50", "kWh", 10_000)
    assert energy["unit_price"] == "2" and not energy.get("average_price")  # the entry's lines
    assert (fixed["kind"], fixed["unit"], fixed["unit_price"], fixed["amount_minor"]) == \
        ("fixed", "month", "25", 2500)
    assert doc["vat"] == [{"rate": "0", "base": "125", "base_minor": 12_500, "amount": "0",
                           "amount_minor": 0}]
    assert doc["net_minor"] + doc["vat_minor"] == doc["total_minor"]
    assert doc["account"] == {"id": "acc-1", "name": CONFIG.accounts["acc-1"].name,
                              "address": None}
    assert doc["seller"] == {"name": "CityGrid utility", "address": None, "vat_id": None}
    assert doc["due_date"] is None  # prepaid: 1,000 DKK less 125 left, nothing to pay
    assert doc["period"] == "2026-03" and doc["from_ms"] == ms(2026, 3, 2)


def test_new_entries_group_by_kind_label_and_price_with_vat_per_rate(store):
    energy = {"kind": "energy", "label": "Energy, peak", "quantity": "10.5", "unit": "kWh",
              "unit_price": "4.00", "amount": "42.00"}
    grid = {"kind": "grid", "label": "Grid tariff", "quantity": "10.5", "unit": "kWh",
            "unit_price": "0.40", "amount": "4.20"}
    export = {"kind": "export", "label": "Export", "quantity": "3", "unit": "kWh",
              "unit_price": "0.50", "amount": "-1.50"}
    demand = {"kind": "demand", "label": "Peak demand", "quantity": "4.2", "unit": "kW",
              "unit_price": "10", "amount": "42.00"}
    new_shape(store, "a", "acc-2", "2026-03", [energy, grid, export], "0.25", "44.70",
              "11.175", 5588)
    new_shape(store, "b", "acc-2", "2026-03", [energy, {**energy, "unit_price": "4"}, demand],
              "0.25", "126.00", "31.50", 15750)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-2", ms(2026, 4, 2), period="2026-03")
    doc = inv.document
    got = [(li["kind"], li["label"], li["unit_price"], li["quantity"], li["amount_minor"])
           for li in doc["lines"]]
    assert got == [("energy", "Energy, peak", "4", "31.5", 12_600),  # 2.00 = 2: one line
                   ("grid", "Grid tariff", "0.4", "10.5", 420),
                   ("export", "Export", "0.5", "3", -150),
                   ("demand", "Peak demand", "10", "4.2", 4200)]
    assert doc["vat"] == [{"rate": "0.25", "base": "170.7", "base_minor": 17_070,
                           "amount": "42.675", "amount_minor": 4268}]
    assert doc["total_minor"] == 5588 + 15750 == 21_338
    assert doc["net_minor"] == 21_338 - 4268 == 17_070
    assert sum(li["amount_minor"] for li in doc["lines"]) == doc["net_minor"]


def test_a_rounding_line_makes_the_lines_add_up_to_what_was_debited(store):
    line = {"kind": "energy", "label": "Energy", "quantity": "1", "unit": "kWh",
            "unit_price": "0.333", "amount": "0.333"}
    for key in "abc":  # each settlement rounded once: 0.33 + 25 % → 0.42 (0.41625) three times
        new_shape(store, key, "acc-2", "2026-03", [line], "0.25", "0.333", "0.08325", 42)
    doc = invoices.issue(store.db, CONFIG, TZ, "acc-2", ms(2026, 4, 2)).document
    assert doc["total_minor"] == 126 and doc["vat_minor"] == 25  # 0.24975
    assert doc["lines"][-1]["kind"] == "rounding"
    assert sum(li["amount_minor"] for li in doc["lines"]) == doc["net_minor"] == 101


AMOUNTS = st.decimals(min_value=Decimal("-50"), max_value=Decimal("500"), places=6,
                      allow_nan=False, allow_infinity=False)


@st.composite
def settled(draw) -> dict:
    """A settlement of either shape, its debit rounded once as settling rounds it."""
    if draw(st.booleans()):
        energy = draw(AMOUNTS.filter(lambda a: a >= 0))
        standing = draw(st.sampled_from([Decimal(0), Decimal("25.00"), Decimal("9.99")]))
        return {"kwh": "1.000000", "energy_amount": str(energy), "standing_charge":
                str(standing), "tariff": "t", "amount_minor": invoices.to_minor(
                    CONFIG, energy + standing)}
    kinds = st.sampled_from(["energy", "grid", "export", "fixed", "demand"])
    lines = draw(st.lists(st.builds(lambda k, a, p: {
        "kind": k, "label": k, "quantity": "1", "unit": "kWh", "unit_price": p, "amount": str(a)},
        kinds, AMOUNTS, st.sampled_from(["1", "2.5", "0.333"])), min_size=1, max_size=4))
    rate = draw(st.sampled_from(["0", "0.25", "0.06"]))
    net = sum(Decimal(li["amount"]) for li in lines)
    vat = net * Decimal(rate)
    return {"lines": lines, "net_amount": str(net), "vat_rate": rate, "vat_amount": str(vat),
            "amount_minor": invoices.to_minor(CONFIG, net + vat)}


@settings(max_examples=60, deadline=None)
@given(st.lists(settled(), min_size=1, max_size=8))
def test_lines_net_vat_and_total_always_add_up(entries):
    lines, vat, net, vat_minor, total = invoices.build_lines(CONFIG, entries)
    assert total == sum(e["amount_minor"] for e in entries)  # what the ledger debited
    assert net + vat_minor == total
    assert sum(li["amount_minor"] for li in lines) == net
    assert vat_minor == sum(v["amount_minor"] for v in vat)
    assert len({(li["kind"], li["label"], li["unit_price"], li["vat_rate"]) for li in lines}) \
        == len(lines)  # grouped: no two lines alike


# ------------------------------------------------------------------ numbers, idempotence


def test_numbers_are_consecutive_and_failures_take_none(store):
    march(store)
    read(store, "m-3", ms(2026, 3, 5), 10)
    store.settle("m-3", ms(2026, 3, 6))
    with pytest.raises(invoices.UnknownAccount):
        invoices.issue(store.db, CONFIG, TZ, "acc-nobody", ms(2026, 4, 2))
    due = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1))
    assert [i.number for i in due] == ["INV-2026-000001", "INV-2026-000002", "INV-2026-000003"]
    assert [i.account for i in due] == ["acc-1", "acc-2", "acc-3"]
    with pytest.raises(invoices.NothingToInvoice):
        invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2))
    read(store, "m-1", ms(2026, 4, 3), 5, 100)
    store.settle("m-1", ms(2026, 4, 4))
    assert invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 4)).number == \
        "INV-2026-000004"
    cn = invoices.credit(store.db, CONFIG, TZ, "INV-2026-000001", "goodwill", ms(2026, 4, 5),
                         amount="1")
    assert cn.number == "CN-2026-000001"
    read(store, "m-1", ms(2026, 12, 30), 72, 200)
    store.settle("m-1", ms(2027, 1, 2))
    assert invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2027, 1, 2)).number == \
        "INV-2027-000001"  # a series per year


def test_the_monthly_invoice_is_issued_once(store):
    march(store)
    first = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1))
    entries = len(store.entries())
    assert len(first) == 2 and all(i.created for i in first)
    assert invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 2)) == []
    again = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 3), period="2026-03")
    assert again.number == first[0].number and not again.created
    assert len(store.entries()) == entries
    assert len(invoices.list_invoices(store.db)) == 2


def test_before_the_month_ends_nothing_is_due_and_its_period_is_refused(store):
    read(store, "m-1", ms(2026, 3, 2), 10)
    store.settle("m-1", ms(2026, 3, 3))
    assert invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 3, 31, 23, 59)) == []
    with pytest.raises(invoices.BadPeriod, match="has not ended"):
        invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 3, 20), period="2026-03")
    for bad in ("2026-13", "26-03", "2026-3", "march"):
        with pytest.raises(invoices.BadPeriod, match="YYYY-MM"):
            invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period=bad)
    assert invoices.list_invoices(store.db) == [] and len(store.entries()) == 1


def test_on_demand_covers_the_rest_and_nothing_is_invoiced_twice(store):
    march(store)
    k = read(store, "m-1", ms(2026, 4, 2), 10, 50)  # April, not ended
    store.settle("m-1", ms(2026, 4, 3))
    monthly = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 3, 1))
    demand = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 3, 2))
    assert demand.period is None and [e["period"] for e in demand.document["entries"]] == \
        ["2026-04"]
    read(store, "m-1", ms(2026, 4, 2) + 10 * H, 5, k)
    store.settle("m-1", ms(2026, 4, 5))
    may = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 5, 1, 1))
    assert [i.account for i in may] == ["acc-1"] and len(may[0].document["entries"]) == 1
    covered = [e["seq"] for i in monthly + [demand] + may for e in i.document["entries"]]
    settlements = [e["seq"] for e in ledger_rows(store) if "kind" not in e]
    assert sorted(covered) == settlements  # every one, each once


def test_a_late_settlement_goes_on_the_next_monthly_invoice(store):
    read(store, "m-3", ms(2026, 3, 2), 10)
    store.settle("m-3", ms(2026, 3, 3))
    [march_inv] = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1))
    read(store, "m-3", ms(2026, 3, 2) + 10 * H, 5, 10)  # March readings arriving late
    store.settle("m-3", ms(2026, 4, 2))
    assert invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 2, 1)) == []  # March's: issued
    [april] = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 5, 1, 1))  # no April use
    assert april.period == "2026-04" and [e["period"] for e in april.document["entries"]] == \
        ["2026-03"]
    assert march_inv.number != april.number


def test_limit_spreads_the_monthly_run(store):
    march(store)
    first = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1), limit=1)
    rest = invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1), limit=1)
    assert [i.account for i in first + rest] == ["acc-1", "acc-2"]
    assert invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1), limit=1) == []


# ------------------------------------------------------------------ in the hash chain


def test_the_invoice_is_a_zero_amount_ledger_entry_that_chains(store):
    march(store)
    balance = store.balance("acc-1")
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period="2026-03")
    seq, entry, digest = store.entries()[-1]
    assert seq == inv.ledger_seq == inv.document["ledger_entry_seq"]
    assert entry["kind"] == "invoice" and entry["key"] == "invoice:acc-1:2026-03"
    assert entry["document_sha256"] == inv.sha256 == invoices.document_hash(inv.document)
    assert entry["balance_after_minor"] == balance == store.balance("acc-1")
    prev_seq, _, prev_hash = store.entries()[-2]
    assert inv.document["ledger_head"] == {"seq": prev_seq, "hash": prev_hash}
    hashes = {s: h for s, _, h in store.entries()}
    assert all(hashes[e["seq"]] == e["hash"] for e in inv.document["entries"])
    assert verify(store.path) == (seq, digest)
    assert invoices.verify_invoice(store.path.parent, inv.number).number == inv.number


def test_ledger_list_shows_invoices_beside_settlements(store, tmp_path, capsys):
    from cityctl.cli import main

    march(store)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period="2026-03")
    assert main(["ledger", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(store.entries())
    assert "m-1" in out[0] and " kWh " in out[0]
    assert f"invoice    {inv.number:>16}" in out[-1] and "invoice:acc-1:2026-03" in out[-1]


def test_an_edited_invoice_document_is_found(store):
    march(store)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period="2026-03")
    doc = {**inv.document, "total_minor": 1}
    store.db.execute("UPDATE invoices SET document = ? WHERE number = ?",
                     (invoices.canonical(doc).decode(), inv.number))
    with pytest.raises(LedgerError, match="does not match its hash"):
        invoices.verify_invoice(store.path.parent, inv.number)
    store.db.execute("UPDATE invoices SET document = ?, sha256 = ? WHERE number = ?",
                     (invoices.canonical(doc).decode(), invoices.document_hash(doc), inv.number))
    with pytest.raises(LedgerError, match="does not carry this document's hash"):
        invoices.verify_invoice(store.path.parent, inv.number)


def test_a_writer_in_between_makes_it_build_the_document_again(store, monkeypatch):
    """Another process settles between the build and the append: the head moved, so the
    document is built again against the new head (and takes the new settlement too)."""
    march(store)
    other = sqlite3.connect(store.path, isolation_level=None, timeout=30)
    real, calls = invoices.invoice_document, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            ledger.append(other, CONFIG, "late", "acc-1", {
                "meter": "m-1", "account": "acc-1", "tariff": "flat", "period": "2026-03",
                "from_ms": ms(2026, 3, 9), "to_ms": ms(2026, 3, 10), "kwh": "1.000000",
                "energy_amount": "2.000000", "standing_charge": "0.00", "amount_minor": 200,
                "currency": "DKK", "settled_at_ms": ms(2026, 4, 1)}, -200)
        return real(*args, **kwargs)

    monkeypatch.setattr(invoices, "invoice_document", racing)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period="2026-03")
    other.close()
    assert len(calls) == 2 and len(inv.document["entries"]) == 3
    assert inv.document["ledger_head"]["seq"] == inv.ledger_seq - 1
    assert verify(store.path)[0] == inv.ledger_seq
    invoices.verify_invoice(store.path.parent, inv.number)


def test_payments_since_the_last_invoice_are_listed_with_the_balance(store):
    march(store)
    invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period="2026-03")
    ledger.append(store.db, CONFIG, "pay-1", "acc-1", {
        "kind": "payment", "amount_minor": 5000, "currency": "DKK", "paid_at_ms": ms(2026, 4, 9),
        "reference": "MobilePay 123"}, 5000)
    read(store, "m-1", ms(2026, 4, 10), 10, 300)
    store.settle("m-1", ms(2026, 4, 11))
    doc = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 12)).document
    [p] = doc["payments"]
    assert (p["amount_minor"], p["at_ms"], p["reference"]) == (5000, ms(2026, 4, 9),
                                                                "MobilePay 123")
    assert doc["payments_minor"] == 5000
    assert doc["balance_minor"] == store.balance("acc-1") and doc["outstanding_minor"] == 0


# ------------------------------------------------------------------ credit notes


def test_a_credit_note_is_a_new_entry_and_never_more_than_was_charged(store):
    march(store)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2), period="2026-03")
    before, stored = store.balance("acc-1"), dict(inv.document)
    cn = invoices.credit(store.db, CONFIG, TZ, inv.number, "meter read twice", ms(2026, 4, 3),
                         amount="100.00")
    seq, entry, _ = store.entries()[-1]
    assert (entry["kind"], entry["refers_to"], entry["total_minor"]) == \
        ("credit_note", inv.number, 10_000)
    assert store.balance("acc-1") == before + 10_000 == entry["balance_after_minor"]
    assert cn.document["refers_to_sha256"] == inv.sha256 and cn.ledger_seq == seq
    assert invoices.get_invoice(store.db, inv.number).document == stored  # never edited
    entries = len(store.entries())
    with pytest.raises(invoices.CreditTooLarge, match="at most 25.00 more"):
        invoices.credit(store.db, CONFIG, TZ, inv.number, "again", ms(2026, 4, 4),
                        amount="25.01")
    assert len(store.entries()) == entries and store.balance("acc-1") == before + 10_000
    last = invoices.credit(store.db, CONFIG, TZ, inv.number, "rest", ms(2026, 4, 4),
                           amount="25")
    assert last.number == "CN-2026-000002"  # the refused one took no number
    with pytest.raises(invoices.CreditTooLarge):
        invoices.credit(store.db, CONFIG, TZ, inv.number, "more", ms(2026, 4, 5), amount="0.01")
    assert verify(store.path)[0] == len(store.entries())


def test_crediting_lines_takes_their_vat(store):
    line = {"kind": "energy", "label": "Energy", "quantity": "10", "unit": "kWh",
            "unit_price": "2", "amount": "20"}
    fixed = {"kind": "fixed", "label": "Subscription", "quantity": "1", "unit": "month",
             "unit_price": "40", "amount": "40"}
    new_shape(store, "a", "acc-2", "2026-03", [line, fixed], "0.25", "60", "15", 7500)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-2", ms(2026, 4, 2))
    cn = invoices.credit(store.db, CONFIG, TZ, inv.number, "no subscription", ms(2026, 4, 3),
                         lines=[2])
    assert cn.total_minor == 5000 and cn.document["vat_minor"] == 1000
    assert cn.document["lines"][0]["label"] == "Subscription"
    split = invoices.credit(store.db, CONFIG, TZ, inv.number, "goodwill", ms(2026, 4, 3),
                            amount=Decimal("10"))
    assert (split.document["net_minor"], split.document["vat_minor"]) == (800, 200)


@pytest.mark.parametrize("kwargs, words", [
    ({"amount": "-5"}, "must be positive"),
    ({"amount": "0.001"}, "more decimals"),
    ({"amount": "ten"}, "not a number"),
    ({}, "one of the two"),
    ({"amount": "1", "lines": [1]}, "one of the two"),
    ({"lines": [9]}, "line 9"),
    ({"lines": [1, 1]}, "credited once"),
])
def test_bad_credit_notes_are_refused_and_change_nothing(store, kwargs, words):
    march(store)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2))
    entries = len(store.entries())
    with pytest.raises(invoices.BadCredit, match=words):
        invoices.credit(store.db, CONFIG, TZ, inv.number, "why", ms(2026, 4, 3), **kwargs)
    with pytest.raises(invoices.BadCredit, match="needs a reason"):
        invoices.credit(store.db, CONFIG, TZ, inv.number, "  ", ms(2026, 4, 3), amount="1")
    with pytest.raises(invoices.NoSuchInvoice, match="INV-2026-000099"):
        invoices.credit(store.db, CONFIG, TZ, "INV-2026-000099", "why", ms(2026, 4, 3),
                        amount="1")
    assert len(store.entries()) == entries
    assert [i.kind for i in invoices.list_invoices(store.db)] == ["invoice"]


# ------------------------------------------------------------------ rendering


def test_html_escapes_what_it_shows(store):
    march(store)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2))
    html = render.render_html(inv.document)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in html
    assert inv.number in html and "125.00" in html and inv.document["entries"][0]["hash"] in html
    assert inv.document["ledger_head"]["hash"] in html


def test_the_pdf_holds_the_total_and_the_hashes(store):
    march(store)
    inv = invoices.issue(store.db, CONFIG, TZ, "acc-1", ms(2026, 4, 2))
    pdf = render.render_pdf(inv.document, compress=False, unicode_font=False)
    assert pdf.startswith(b"%PDF")
    text = pdf.decode("latin-1")
    assert "125.00 DKK" in text and inv.number in text
    assert inv.document["ledger_head"]["hash"] in text
    assert "S\xf8ren" in text  # ø is Latin-1: kept by the core font
    pretty = render.render_pdf({**inv.document, "account": {"id": "acc-1", "name": "Łódź ✓"}})
    assert pretty.startswith(b"%PDF") and pretty.rstrip().endswith(b"%%EOF")


SELLER_TEXT = CONFIG_TEXT.replace("accounts:", """seller:
  name: Københavns Forsyning
  address: Eksempelvej 1, 2300 København S
  vat_id: DK12345678
  payment_terms_days: 10
accounts:
  acc-9: {name: Post-paid ApS, address: "Vesterbrogade 2, 1620 København V"}""")


def test_the_seller_block_its_vat_number_and_the_due_date_are_on_the_invoice(tmp_path):
    config = billing_config.parse_text(SELLER_TEXT)
    fleet = Fleet([FleetDevice("m-9", "meter", "valby", 55.66, 12.5, account_id="acc-9",
                               tariff="flat", max_power_w=17250.0)])
    store = BillingStore(tmp_path / "billing.sqlite", config, fleet, TZ)
    try:
        read(store, "m-9", ms(2026, 3, 2), 20)
        store.settle("m-9", ms(2026, 4, 1, 0, 30))
        # Issued on the 30th at 23:30 city time (21:30 UTC): due 10 days after the city's day.
        inv = invoices.issue(store.db, config, TZ, "acc-9", ms(2026, 4, 30, 23, 30))
    finally:
        store.close()
    doc = inv.document
    assert doc["seller"] == {"name": "Københavns Forsyning", "vat_id": "DK12345678",
                             "address": "Eksempelvej 1, 2300 København S"}
    assert doc["account"]["address"] == "Vesterbrogade 2, 1620 København V"
    assert doc["outstanding_minor"] == 20 * 200 + 2500 and doc["due_date"] == "2026-05-10"
    assert inv.summary()["due_date"] == "2026-05-10"  # in the API's and the CLI's lists
    html = render.render_html(doc)
    assert "VAT DK12345678" in html and "due\n<strong>2026-05-10</strong>" in html
    assert "Vesterbrogade 2" in html
    text = render.render_pdf(doc, compress=False, unicode_font=False).decode("latin-1")
    assert "VAT DK12345678" in text and "due 2026-05-10" in text and "Vesterbrogade 2" in text


def postpaid(tmp_path):
    config = billing_config.parse_text(SELLER_TEXT)
    fleet = Fleet([FleetDevice("m-9", "meter", "valby", 55.66, 12.5, account_id="acc-9",
                               tariff="flat", max_power_w=17250.0)])
    return config, BillingStore(tmp_path / "billing.sqlite", config, fleet, TZ)


def pay(store: BillingStore, config, key: str, minor: int, at_ms: int) -> None:
    ledger.append(store.db, config, key, "acc-9", {
        "kind": "payment", "amount_minor": minor, "currency": "DKK", "paid_at_ms": at_ms,
        "reference": key}, minor)


def test_an_invoice_past_its_due_date_is_overdue_until_payments_and_credits_cover_it(tmp_path):
    config, store = postpaid(tmp_path)
    try:
        read(store, "m-9", ms(2026, 3, 2), 20)  # 20 kWh at 2.00 and March's 25.00: 65.00
        store.settle("m-9", ms(2026, 4, 1, 0, 30))
        inv = invoices.issue(store.db, config, TZ, "acc-9", ms(2026, 4, 1, 1), period="2026-03")
        assert inv.document["due_date"] == "2026-04-11"
        assert invoices.overdue(store.db, TZ, ms(2026, 4, 11, 23, 59)) == []  # its last day
        [o] = invoices.overdue(store.db, TZ, ms(2026, 4, 12))
        assert (o.account, o.number, o.due_date, o.outstanding_minor, o.owed_minor,
                o.currency) == ("acc-9", inv.number, "2026-04-11", 6500, 6500, "DKK")
        pay(store, config, "pay-1", 4000, ms(2026, 4, 13))
        assert [o.owed_minor for o in invoices.overdue(store.db, TZ, ms(2026, 4, 14))] == [2500]
        # April's consumption, invoiced in May, is not yet due: it does not make March's
        # invoice any more overdue, and March's is what the alert names.
        read(store, "m-9", ms(2026, 4, 20), 10, 20)
        store.settle("m-9", ms(2026, 5, 1, 0, 30))
        may = invoices.issue(store.db, config, TZ, "acc-9", ms(2026, 5, 1, 1), period="2026-04")
        assert may.document["outstanding_minor"] == 2500 + 10 * 200 + 2500
        [o] = invoices.overdue(store.db, TZ, ms(2026, 5, 2))
        assert (o.number, o.owed_minor) == (inv.number, 2500)
        invoices.credit(store.db, config, TZ, inv.number, "goodwill", ms(2026, 5, 3),
                        amount=Decimal("25.00"))
        assert invoices.overdue(store.db, TZ, ms(2026, 5, 4)) == []  # March's: covered
        [o] = invoices.overdue(store.db, TZ, ms(2026, 5, 12))  # then May's falls due
        assert (o.number, o.owed_minor) == (may.number, 2000 + 2500)
        pay(store, config, "pay-2", 4500, ms(2026, 5, 13))
        assert invoices.overdue(store.db, TZ, ms(2026, 5, 14)) == []
        assert store.db.execute("SELECT count(*) FROM invoice_due WHERE paid = 0"
                                ).fetchone()[0] == 0  # never looked at again
    finally:
        store.close()


def test_the_command_line_lists_what_is_overdue(tmp_path, capsys, monkeypatch):
    from cityctl.cli import main

    config, store = postpaid(tmp_path)
    try:
        read(store, "m-9", ms(2026, 3, 2), 20)
        store.settle("m-9", ms(2026, 4, 1, 0, 30))
        inv = invoices.issue(store.db, config, TZ, "acc-9", ms(2026, 4, 1, 1), period="2026-03")
        pay(store, config, "pay-1", 1500, ms(2026, 4, 13))
    finally:
        store.close()
    (tmp_path / "billing.yaml").write_text(SELLER_TEXT)
    monkeypatch.setenv("CITYGRID_BILLING", str(tmp_path / "billing.yaml"))
    d = ["--data-dir", str(tmp_path)]
    assert main(["invoice", "overdue", *d]) == 0  # today, long after 2026-04-11
    out = capsys.readouterr()
    assert out.out == f"acc-9 {inv.number} due 2026-04-11 owes 50.00 DKK (of 65.00)\n"
    assert "1 accounts overdue" in out.err
    assert main(["invoice", "overdue", "--json", *d]) == 0
    assert json.loads(capsys.readouterr().out) == [{
        "account": "acc-9", "number": inv.number, "due_date": "2026-04-11",
        "outstanding_minor": 6500, "owed_minor": 5000, "currency": "DKK"}]


def test_the_api_lists_what_is_overdue_and_a_customer_sees_only_its_own(tmp_path):
    config, store = postpaid(tmp_path)
    try:
        read(store, "m-9", ms(2026, 3, 2), 20)
        store.settle("m-9", ms(2026, 4, 1, 0, 30))
        inv = invoices.issue(store.db, config, TZ, "acc-9", ms(2026, 4, 1, 1), period="2026-03")
    finally:
        store.close()
    (tmp_path / "billing.yaml").write_text(SELLER_TEXT)
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path),
                        billing=str(tmp_path / "billing.yaml"))
    registry = Registry(tmp_path)
    app = create_app(settings, store=FakeStore(), registry=registry, feed=FakeFeed({}),
                     publisher=FakePublisher())
    heads = {who: {"Authorization": f"Bearer {create_token(tmp_path, role, who, account)}"}
             for who, role, account in (("ann", "viewer", None), ("acc-9", "customer", "acc-9"),
                                        ("acc-1", "customer", "acc-1"))}
    try:
        with TestClient(app) as client:
            expected = [{"account": "acc-9", "number": inv.number, "due_date": "2026-04-11",
                         "outstanding_minor": 6500, "owed_minor": 6500, "currency": "DKK"}]
            for who, answer in (("ann", expected), ("acc-9", expected), ("acc-1", [])):
                r = client.get("/api/v1/billing/overdue", headers=heads[who])
                assert r.status_code == 200 and r.json() == answer, (who, r.text)
            assert client.get("/api/v1/billing/overdue").status_code == 401
    finally:
        registry.close()


def test_a_prepaid_account_is_never_overdue(store):
    march(store)  # acc-1 and acc-2 have 1,000 DKK each and owe nothing
    invoices.issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1))
    assert invoices.overdue(store.db, TZ, ms(2026, 12, 1)) == []


def test_the_leading_rule_worker_raises_and_clears_the_overdue_alert(tmp_path):
    from rules.alerts import Alerts
    from rules.runner import OVERDUE, RuleRunner

    class Outbox:
        def __init__(self):
            self.told: list[tuple[str, bool, str]] = []

        def alert(self, alert, raised):
            self.told.append((alert.key, raised, alert.message))

    config, store = postpaid(tmp_path)
    try:
        read(store, "m-9", ms(2026, 3, 2), 20)
        store.settle("m-9", ms(2026, 4, 1, 0, 30))
        outbox = Outbox()
        runner = SimpleNamespace(billing=store, leads=True, clock=None,
                                 engine=SimpleNamespace(watermark=ms(2026, 4, 1, 1),
                                                        alerting=Alerts(outbox)))
        runner._follow_overdue = lambda now: RuleRunner._follow_overdue(runner, now)
        RuleRunner._issue_invoices(runner)  # issues March's, due 2026-04-11
        assert outbox.told == []
        runner.engine.watermark = ms(2026, 4, 12, 9)
        RuleRunner._issue_invoices(runner)
        RuleRunner._issue_invoices(runner)  # raised once
        [(key, raised, message)] = outbox.told
        number = invoices.list_invoices(store.db)[0].number
        assert (key, raised) == (f"{OVERDUE}@acc-9", True)
        assert runner.engine.overdue == (1, 6500)  # for the self-report and the dashboard
        assert message == f"Account acc-9: invoice {number} was due 2026-04-11; 65.00 DKK of " \
            "it is unpaid"
        pay(store, config, "pay-1", 1500, ms(2026, 4, 12, 10))  # in part: told again
        RuleRunner._issue_invoices(runner)
        RuleRunner._issue_invoices(runner)
        assert outbox.told[1] == (f"{OVERDUE}@acc-9", True, message.replace("65.00", "50.00"))
        assert runner.engine.overdue == (1, 5000) and len(outbox.told) == 2
        pay(store, config, "pay-2", 5000, ms(2026, 4, 12, 10))
        runner.engine.watermark = ms(2026, 4, 12, 11)
        RuleRunner._issue_invoices(runner)
        assert outbox.told[2][:2] == (f"{OVERDUE}@acc-9", False)
        assert runner.engine.overdue == (0, 0)
        runner.leads = False  # another worker: never looks
        runner.engine.watermark = ms(2026, 9, 1)
        RuleRunner._issue_invoices(runner)
        assert len(outbox.told) == 3
    finally:
        store.close()


@pytest.mark.parametrize(("change", "words"), [
    ("vat_id: DK12345678", "vat_id: 12345678"),
    ("payment_terms_days: 10", "payment_terms_days: -1"),
    ("payment_terms_days: 10", "payment_terms: 10"),
])
def test_a_bad_seller_block_is_refused_with_its_line(change, words):
    with pytest.raises(billing_config.ConfigError) as e:
        billing_config.parse_text(SELLER_TEXT.replace(change, words), "utility.yaml")
    line = SELLER_TEXT.splitlines().index("  " + change) + 1
    assert f"utility.yaml:{line}:" in str(e.value), str(e.value)


# ------------------------------------------------------------------ the runner's hook, the CLI


def test_the_rule_runner_issues_what_is_due_in_event_time(store):
    from rules.runner import RuleRunner

    march(store)
    appended = store.appended
    runner = SimpleNamespace(billing=store, engine=SimpleNamespace(watermark=ms(2026, 4, 1, 1)),
                             clock=SimpleNamespace(now_ms=lambda: ms(2026, 3, 5)), leads=False)
    assert RuleRunner._issue_invoices(runner) is False  # two issued, fewer than a look's
    assert len(invoices.list_invoices(store.db)) == 2 and store.appended == appended + 2
    read(store, "m-1", ms(2026, 4, 2), 10, 50)
    store.settle("m-1", ms(2026, 4, 3))
    appended = store.appended
    runner.engine.watermark = None  # no reading yet: the clock's time
    runner.clock.now_ms = lambda: ms(2026, 4, 20)
    assert RuleRunner._issue_invoices(runner) is False and store.appended == appended
    runner.clock.now_ms = lambda: ms(2026, 5, 1, 0, 5)
    assert RuleRunner._issue_invoices(runner) is False and store.appended == appended + 1
    assert invoices.list_invoices(store.db)[0].period == "2026-04"


def test_the_command_line(store, tmp_path, capsys, monkeypatch):
    from cityctl.cli import main

    march(store)
    path = tmp_path / "billing.yaml"
    path.write_text(CONFIG_TEXT)
    monkeypatch.setenv("CITYGRID_BILLING", str(path))
    d = ["--data-dir", str(tmp_path)]
    assert main(["invoice", "issue", "--account", "acc-1", "--period", "2026-03", *d]) == 0
    assert re.match(r"INV-2026-000001 invoice account acc-1 period 2026-03 total 125\.00 DKK",
                    capsys.readouterr().out)
    assert main(["invoice", "issue", "--account", "nobody", *d]) == 2
    assert "account 'nobody'" in capsys.readouterr().err
    assert main(["invoice", "credit", "INV-2026-000001", "--amount", "500", "--reason", "x",
                 *d]) == 2
    assert "at most 125.00 more" in capsys.readouterr().err
    assert main(["invoice", "credit", "INV-2026-000001", "--amount", "5", "--reason", "x",
                 *d]) == 0
    assert capsys.readouterr().out.startswith("CN-2026-000001 credit_note account acc-1")
    assert main(["invoice", "list", "--account", "acc-1", "--json", *d]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["number"] for i in listed] == ["CN-2026-000001", "INV-2026-000001"]
    out = tmp_path / "inv"
    assert main(["invoice", "show", "INV-2026-000001", "--html", f"{out}.html", "--pdf",
                 f"{out}.pdf", *d]) == 0
    assert (tmp_path / "inv.pdf").read_bytes().startswith(b"%PDF")
    assert "INV-2026-000001" in (tmp_path / "inv.html").read_text()
    assert main(["invoice", "show", "INV-2026-000077", *d]) == 2
    assert verify(store.path)[0] == len(store.entries())


# ------------------------------------------------------------------ the API


@pytest.fixture
def api(tmp_path, store):
    path = tmp_path / "billing.yaml"
    path.write_text(CONFIG_TEXT)
    march(store)
    registry = Registry(tmp_path)
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path),
                        billing=str(path))
    app = create_app(settings, store=FakeStore(), registry=registry, feed=FakeFeed({}),
                     publisher=FakePublisher())
    tokens = {r: {"Authorization": f"Bearer {create_token(tmp_path, r, f'{r}-ann')}"}
              for r in ("viewer", "operator")}
    with TestClient(app) as client:
        yield client, tokens, app
    registry.close()


def _problem(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    for word in words:
        assert word in body["detail"], body
    return body


def test_api_issue_list_and_download(api, store):
    client, tokens, _ = api
    op, viewer = tokens["operator"], tokens["viewer"]
    r = client.post("/api/v1/billing/accounts/acc-1/invoices", json={"period": "2026-03"},
                    headers=op)
    assert r.status_code == 201, r.text
    inv = r.json()
    assert inv["number"] == "INV-2026-000001" and inv["total_minor"] == 12_500
    again = client.post("/api/v1/billing/accounts/acc-1/invoices", json={"period": "2026-03"},
                        headers=op)
    assert again.status_code == 200 and again.json()["number"] == inv["number"]
    r = client.post("/api/v1/billing/accounts/acc-2/invoices", headers=op)  # on demand
    assert r.status_code == 201 and r.json()["period"] is None
    listed = client.get("/api/v1/billing/invoices", headers=viewer).json()
    assert [i["number"] for i in listed] == ["INV-2026-000002", "INV-2026-000001"]
    assert [i["account"] for i in client.get("/api/v1/billing/invoices?account=acc-1",
                                             headers=viewer).json()] == ["acc-1"]
    one = client.get("/api/v1/billing/invoices/INV-2026-000001", headers=viewer).json()
    assert one["document"]["entries"] and one["sha256"] == inv["sha256"]
    html = client.get("/api/v1/billing/invoices/INV-2026-000001.html", headers=viewer)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;" in html.text and "default-src 'none'" in \
        html.headers["content-security-policy"]
    pdf = client.get("/api/v1/billing/invoices/INV-2026-000001.pdf", headers=viewer)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["content-disposition"] == 'attachment; filename="INV-2026-000001.pdf"'
    assert pdf.content.startswith(b"%PDF")
    assert verify(store.path)[0] == len(store.entries())


def test_api_credit_notes(api, store):
    client, tokens, _ = api
    op = tokens["operator"]
    client.post("/api/v1/billing/accounts/acc-1/invoices", json={"period": "2026-03"},
                headers=op)
    url = "/api/v1/billing/invoices/INV-2026-000001/credit-notes"
    r = client.post(url, json={"amount": "25.00", "reason": "standing charge waived"},
                    headers=op)
    assert r.status_code == 201, r.text
    assert r.json()["number"] == "CN-2026-000001" and r.json()["refers_to"] == "INV-2026-000001"
    entries = len(store.entries())
    _problem(client.post(url, json={"amount": "100.01", "reason": "x"}, headers=op), 409,
             "at most 100.00 more")
    _problem(client.post(url, json={"lines": [7], "reason": "x"}, headers=op), 422, "line 7")
    _problem(client.post(url, json={"amount": "1", "lines": [1], "reason": "x"}, headers=op),
             422, "one of the two")
    _problem(client.post(url, json={"amount": "-1", "reason": "x"}, headers=op), 422)
    _problem(client.post(url, json={"amount": "1"}, headers=op), 422, "reason")
    _problem(client.post("/api/v1/billing/invoices/CN-2026-000001/credit-notes",
                         json={"amount": "1", "reason": "x"}, headers=op), 422, "credit note")
    _problem(client.post("/api/v1/billing/invoices/INV-2026-000404/credit-notes",
                         json={"amount": "1", "reason": "x"}, headers=op), 404, "INV-2026-000404")
    _problem(client.post(url, json={"amount": "1", "reason": "x"}, headers=tokens["viewer"]),
             403)
    assert len(store.entries()) == entries


def test_api_bad_input_is_a_problem_and_changes_nothing(api, store):
    client, tokens, _ = api
    op, viewer = tokens["operator"], tokens["viewer"]
    entries = len(store.entries())
    base = "/api/v1/billing/accounts"
    _problem(client.post(f"{base}/acc-nobody/invoices", headers=op), 404, "acc-nobody")
    _problem(client.post(f"{base}/acc-1/invoices", json={"period": "2026-13"}, headers=op), 422,
             "period")
    _problem(client.post(f"{base}/acc-1/invoices", json={"period": "2999-01"}, headers=op), 422,
             "has not ended")
    _problem(client.post(f"{base}/acc-3/invoices", headers=op), 409, "no settlement")
    _problem(client.post(f"{base}/acc-1/invoices", headers=viewer), 403)
    for suffix in ("", ".html", ".pdf"):
        _problem(client.get(f"/api/v1/billing/invoices/INV-2026-000009{suffix}",
                            headers=viewer), 404, "INV-2026-000009")
    assert len(store.entries()) == entries and client.get(
        "/api/v1/billing/invoices", headers=viewer).json() == []


def test_api_an_account_scope_sees_only_its_own(api):
    client, tokens, app = api
    op = tokens["operator"]
    for account in ("acc-1", "acc-2"):
        client.post(f"/api/v1/billing/accounts/{account}/invoices", headers=op)
    app.dependency_overrides[account_scope] = lambda: "acc-2"
    listed = client.get("/api/v1/billing/invoices", headers=op).json()
    assert [i["account"] for i in listed] == ["acc-2"]
    assert client.get("/api/v1/billing/invoices?account=acc-1", headers=op).json() == []
    for suffix in ("", ".html", ".pdf"):
        _problem(client.get(f"/api/v1/billing/invoices/INV-2026-000001{suffix}", headers=op),
                 404)
    assert client.get("/api/v1/billing/invoices/INV-2026-000002", headers=op).status_code == 200
    _problem(client.post("/api/v1/billing/invoices/INV-2026-000001/credit-notes",
                         json={"amount": "1", "reason": "x"}, headers=op), 404)
    _problem(client.post("/api/v1/billing/accounts/acc-1/invoices", headers=op), 404)
