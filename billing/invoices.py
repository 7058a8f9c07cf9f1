"""Invoices and credit notes, built from the hash-chained ledger (docs/invoices.md).

An invoice is a document (canonical JSON, its SHA-256 kept beside it) listing the ledger
entries it covers — each with its ``seq`` and hash — and the ledger's head when it was issued.
Issuing it is itself a ledger entry (``"kind": "invoice"``, no money moves) carrying the
document's hash, so an invoice is part of the chain: editing one breaks ``ledger verify``'s
link from the entry to the document, and the entry cannot be edited without breaking the chain.

Corrections are credit notes: a new document and a new ledger entry (``"kind":
"credit_note"``) crediting the account — never an edit, never more in total than the invoice
charged.

Numbers are consecutive and gap-free per series and year (``INV-2026-000001``,
``CN-2026-000001``), as EU VAT rules ask: a number is taken in the same transaction as the
ledger entry, so a failure anywhere takes nothing. The document is built from what was read
before that transaction and checked inside it: the ledger's head must still be the one the
document names (any invoice, credit note or settlement appended meanwhile by another process
moves it), else it is built again.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from billing import ledger, payments, tariffs
from billing.config import PAYMENT_TERMS_DAYS, BillingConfig
from citygrid import statedb

FILENAME = "billing.sqlite"
INVOICE, CREDIT_NOTE = "invoice", "credit_note"
SERIES = {INVOICE: "INV", CREDIT_NOTE: "CN"}
NUMBER = re.compile(r"^(INV|CN)-(\d{4})-(\d{6})$")
PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
LINE_KINDS = ("energy", "grid", "export", "fixed", "demand", "credit", "rounding")
DEFAULT_SELLER = "CityGrid utility"
_ATTEMPTS = 8  # builds of one document raced by other writers before giving up

_SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    number TEXT PRIMARY KEY, kind TEXT NOT NULL, account_id TEXT NOT NULL, period TEXT,
    from_ms INTEGER, to_ms INTEGER, issued_at_ms INTEGER NOT NULL, refers_to TEXT,
    total_minor INTEGER NOT NULL, currency TEXT NOT NULL, ledger_key TEXT NOT NULL UNIQUE,
    ledger_seq INTEGER NOT NULL, document TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS invoices_by_account ON invoices (account_id, issued_at_ms);
CREATE INDEX IF NOT EXISTS invoices_by_reference ON invoices (refers_to);
CREATE TABLE IF NOT EXISTS invoiced (
    seq INTEGER PRIMARY KEY, number TEXT NOT NULL);
-- What the ledger holds, indexed as it grows (ledger seq ≤ invoice_meta.indexed_seq): the
-- settlements not yet on an invoice and the payments, so that neither the monthly run nor
-- one invoice reads the whole ledger.
CREATE TABLE IF NOT EXISTS uninvoiced (
    seq INTEGER PRIMARY KEY, account_id TEXT NOT NULL, period TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS uninvoiced_by_period ON uninvoiced (period, account_id);
CREATE INDEX IF NOT EXISTS uninvoiced_by_account ON uninvoiced (account_id, seq);
CREATE TABLE IF NOT EXISTS payments_seen (
    seq INTEGER PRIMARY KEY, account_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS payments_by_account ON payments_seen (account_id, seq);
CREATE TABLE IF NOT EXISTS invoice_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Invoices with an amount due by a date, until the credits after them (payments, credit
-- notes) have covered it (paid = 1): what `overdue` looks at.
CREATE TABLE IF NOT EXISTS invoice_due (
    number TEXT PRIMARY KEY, account_id TEXT NOT NULL, due_date TEXT NOT NULL,
    outstanding_minor INTEGER NOT NULL, ledger_seq INTEGER NOT NULL,
    paid INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS invoice_due_open ON invoice_due (paid, due_date);
CREATE INDEX IF NOT EXISTS invoice_due_by_account ON invoice_due (account_id, ledger_seq);
"""
_TABLES = ("ledger", "invoices", "invoice_meta", "invoice_due")


# ------------------------------------------------------------------ errors


class InvoiceError(ValueError):
    """Bad input for an invoice or credit note: nothing was written."""

    status = 422


class UnknownAccount(InvoiceError):
    status = 404


class NoSuchInvoice(InvoiceError):
    status = 404


class BadPeriod(InvoiceError):
    status = 422


class BadCredit(InvoiceError):
    status = 422


class CreditTooLarge(InvoiceError):
    status = 409


class NothingToInvoice(InvoiceError):
    status = 409


class _Stale(Exception):
    """The ledger moved between building a document and appending it: build it again."""


# ------------------------------------------------------------------ the stored invoice


@dataclass(frozen=True)
class Invoice:
    number: str
    kind: str  # invoice | credit_note
    account: str
    period: str | None
    issued_at_ms: int
    total_minor: int
    currency: str
    refers_to: str | None
    ledger_seq: int
    sha256: str
    document: dict[str, Any]
    created: bool = field(default=False, compare=False)  # issued by the call that returned it

    def summary(self) -> dict[str, Any]:
        """The invoice without its document (lists)."""
        return {"number": self.number, "kind": self.kind, "account": self.account,
                "period": self.period, "issued_at_ms": self.issued_at_ms,
                "total_minor": self.total_minor, "currency": self.currency,
                "refers_to": self.refers_to, "ledger_seq": self.ledger_seq,
                "sha256": self.sha256, "due_date": self.document.get("due_date")}


def canonical(doc: dict[str, Any]) -> bytes:
    return ledger.canonical(doc)


def document_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


_COLUMNS = ("number, kind, account_id, period, issued_at_ms, total_minor, currency, refers_to, "
            "ledger_seq, sha256, document")


def _invoice(row: tuple) -> Invoice:
    *head, text = row
    return Invoice(*head, document=json.loads(text))


# ------------------------------------------------------------------ connections and reads

Source = sqlite3.Connection | str | Path


def path(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILENAME


def open_db(data_dir: str | Path) -> sqlite3.Connection:
    """A writing connection to ``billing.sqlite`` with the ledger's and the invoices' tables
    (the gateway and the command line write through it; close it when done)."""
    db = statedb.connect(path(data_dir))
    ensure_schema(db)
    return db


def ensure_schema(db: sqlite3.Connection) -> None:
    """The ledger's and the invoices' tables (one look at the schema when they exist)."""
    if db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                  f"({', '.join('?' * len(_TABLES))})", _TABLES).fetchone()[0] < len(_TABLES):
        db.executescript(ledger._SCHEMA + _SCHEMA)


def _rows(source: Source, sql: str, params: tuple = ()) -> list[tuple]:
    """A query over an open connection, or read-only over a data directory (a missing file or
    table reads as no rows: nothing was invoiced yet)."""
    if isinstance(source, sqlite3.Connection):
        try:
            return source.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
    return statedb.read_rows(path(source), sql, params)


def list_invoices(source: Source, *, account: str | None = None, kind: str | None = None,
                  limit: int = 1000) -> list[Invoice]:
    """Invoices and credit notes, newest first; ``account`` restricts them to one account
    (a customer's token sees only its own)."""
    return [_invoice(r) for r in _rows(
        source, f"SELECT {_COLUMNS} FROM invoices WHERE (?1 IS NULL OR account_id = ?1) AND "
        "(?2 IS NULL OR kind = ?2) ORDER BY ledger_seq DESC LIMIT ?3",
        (account, kind, limit))]


def get_invoice(source: Source, number: str, *, account: str | None = None) -> Invoice:
    """One invoice or credit note by number; another account's reads as missing when
    ``account`` is given (never says it exists)."""
    rows = _rows(source, f"SELECT {_COLUMNS} FROM invoices WHERE number = ? AND "
                 "(?2 IS NULL OR account_id = ?2)", (number, account))
    if not rows:
        raise NoSuchInvoice(f"invoice {number!r}: no such invoice or credit note")
    return _invoice(rows[0])


def credit_notes_of(source: Source, number: str) -> list[Invoice]:
    return [_invoice(r) for r in _rows(
        source, f"SELECT {_COLUMNS} FROM invoices WHERE kind = 'credit_note' AND refers_to = ? "
        "ORDER BY number", (number,))]


def verify_invoice(source: Source, number: str) -> Invoice:
    """The stored document is the one its ledger entry hashed, and the entries and head it
    names are the ledger's; raises ledger.LedgerError saying which is not (run
    ``ledger.verify`` for the chain itself)."""
    inv = get_invoice(source, number)
    where = (inv.ledger_seq, f"{inv.kind}:{number}")
    if document_hash(inv.document) != inv.sha256:
        raise ledger.LedgerError(*where, f"{number}: the stored document does not match its "
                                 "hash (edited)")
    hashes = dict(_rows(source, "SELECT seq, hash FROM ledger WHERE seq IN (SELECT value FROM "
                        "json_each(?))", (json.dumps(
                            [inv.ledger_seq] + [e["seq"] for e in inv.document["entries"]]),)))
    rows = _rows(source, "SELECT entry FROM ledger WHERE seq = ?", (inv.ledger_seq,))
    entry = json.loads(rows[0][0]) if rows else {}
    if entry.get("number") != number or entry.get("document_sha256") != inv.sha256:
        raise ledger.LedgerError(*where, f"{number}: its ledger entry does not carry this "
                                 "document's hash")
    head = inv.document["ledger_head"]
    if entry.get("prev_hash") != head["hash"]:
        raise ledger.LedgerError(*where, f"{number}: the head it names is not the entry "
                                 "before its own")
    for e in inv.document["entries"]:
        if hashes.get(e["seq"]) != e["hash"]:
            raise ledger.LedgerError(e["seq"], e.get("key"), f"{number} lists another hash "
                                     "for this entry")
    return inv


# ------------------------------------------------------------------ money


def _digits(config: BillingConfig) -> int:
    """Decimal places of the currency: 100 minor units → 2 (a non-power of ten → 4)."""
    n, d = config.minor_units, 0
    while n % 10 == 0 and n > 1:
        n, d = n // 10, d + 1
    return d if n == 1 else 4


def to_minor(config: BillingConfig, amount: Decimal) -> int:
    return int((amount * config.minor_units).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def money(config: BillingConfig, minor: int) -> str:
    """Minor units as the currency's decimal text: 123456 → "1234.56"."""
    q = Decimal(1).scaleb(-_digits(config))
    return str((Decimal(minor) / config.minor_units).quantize(q, rounding=ROUND_HALF_UP))


def _dec(value: Any, default: str = "0") -> Decimal:
    try:
        return Decimal(str(value if value is not None else default))
    except InvalidOperation:
        return Decimal(default)


def _plain(d: Decimal) -> str:
    """A decimal without trailing zeros or exponent: 2.00 → "2", 10 → "10"."""
    s = format(d.normalize(), "f")
    return s if s != "-0" else "0"


# ------------------------------------------------------------------ lines from entries


def entry_lines(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A settlement's line items, each with its VAT rate. Entries settled before lines
    existed get an energy line from ``kwh``/``energy_amount`` (prices varied within it: no
    unit price) and a fixed line from a non-zero ``standing_charge``, at VAT 0."""
    rate = _plain(_dec(entry.get("vat_rate")))
    if isinstance(entry.get("lines"), list):
        return [{"kind": str(li.get("kind", "energy")), "label": str(li.get("label", "")),
                 "quantity": _dec(li.get("quantity")), "unit": str(li.get("unit", "")),
                 "unit_price": (_plain(_dec(li["unit_price"]))
                                if li.get("unit_price") not in (None, "")
                                and not tariffs.averaged(str(li.get("label", ""))) else None),
                 "amount": _dec(li.get("amount")), "vat_rate": rate}
                for li in entry["lines"]]
    tariff = entry.get("tariff", "?")
    lines = []
    kwh, energy = _dec(entry.get("kwh")), _dec(entry.get("energy_amount"))
    if kwh or energy:
        lines.append({"kind": "energy", "label": f"Energy, tariff {tariff}", "quantity": kwh,
                      "unit": "kWh", "unit_price": None, "amount": energy, "vat_rate": "0"})
    standing = _dec(entry.get("standing_charge"))
    if standing:
        lines.append({"kind": "fixed", "label": f"Standing charge, tariff {tariff}",
                      "quantity": Decimal(1), "unit": "month", "unit_price": _plain(standing),
                      "amount": standing, "vat_rate": "0"})
    return lines


def _entry_vat(entry: dict[str, Any]) -> tuple[str, Decimal, Decimal]:
    """(rate, net, VAT) of one settlement, exact."""
    if "lines" in entry or "net_amount" in entry:
        net = _dec(entry.get("net_amount"),
                   str(sum((li["amount"] for li in entry_lines(entry)), Decimal(0))))
        return _plain(_dec(entry.get("vat_rate"))), net, _dec(entry.get("vat_amount"))
    net = _dec(entry.get("energy_amount")) + _dec(entry.get("standing_charge"))
    return "0", net, Decimal(0)


def _kind_order(kind: str) -> int:
    return LINE_KINDS.index(kind) if kind in LINE_KINDS else len(LINE_KINDS)


def build_lines(config: BillingConfig, entries: Iterable[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int, int]:
    """Line items grouped by (kind, label, unit, unit price, VAT rate), VAT lines per rate,
    and (net, VAT, total) in minor units. The total is what the ledger debited (the entries'
    ``amount_minor``, each rounded once when settled); VAT per rate is rounded once; net is
    total − VAT, and a "rounding" line makes the rounded lines add up to it."""
    entries = list(entries)
    groups: dict[tuple, dict[str, Any]] = {}
    vat: dict[str, list[Decimal]] = {}
    for e in entries:
        for li in entry_lines(e):
            key = (li["kind"], li["label"], li["unit"], li["unit_price"], li["vat_rate"])
            g = groups.setdefault(key, {**li, "quantity": Decimal(0), "amount": Decimal(0)})
            g["quantity"] += li["quantity"]
            g["amount"] += li["amount"]
        rate, net, tax = _entry_vat(e)
        base = vat.setdefault(rate, [Decimal(0), Decimal(0)])
        base[0] += net
        base[1] += tax
    lines = []
    for g in sorted(groups.values(), key=lambda g: (_kind_order(g["kind"]), g["label"],
                                                    g["unit_price"] or "")):
        price, average = g["unit_price"], False
        if price is None and g["quantity"]:
            price, average = _plain((g["amount"] / g["quantity"]).quantize(Decimal("0.0001"))), True
        lines.append({"kind": g["kind"], "label": g["label"], "quantity": _plain(g["quantity"]),
                      "unit": g["unit"], "unit_price": price, "average_price": average,
                      "amount": _plain(g["amount"]), "amount_minor": to_minor(config, g["amount"]),
                      "vat_rate": g["vat_rate"]})
    vat_lines = [{"rate": rate, "base": _plain(b), "base_minor": to_minor(config, b),
                  "amount": _plain(t), "amount_minor": to_minor(config, t)}
                 for rate, (b, t) in sorted(vat.items())]
    total = sum(int(e.get("amount_minor", 0)) for e in entries)
    vat_minor = sum(v["amount_minor"] for v in vat_lines)
    net = total - vat_minor
    diff = net - sum(li["amount_minor"] for li in lines)
    if diff:
        lines.append({"kind": "rounding", "label": "Rounding (each settlement rounded once)",
                      "quantity": "1", "unit": "", "unit_price": None, "average_price": False,
                      "amount": money(config, diff), "amount_minor": diff, "vat_rate": "0"})
    return lines, vat_lines, net, vat_minor, total


# ------------------------------------------------------------------ what the ledger holds


@dataclass(frozen=True)
class _Snapshot:
    head_seq: int
    head_hash: str
    balance_minor: int
    last_invoice_seq: int  # the account's newest invoice entry (0: none)


def _snapshot(db: sqlite3.Connection, config: BillingConfig, account_id: str) -> _Snapshot:
    head = db.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
    row = db.execute("SELECT balance_minor FROM accounts WHERE account_id = ?",
                     (account_id,)).fetchone()
    balance = row[0] if row else config.minor(config.account(account_id).opening_balance)
    last = db.execute("SELECT max(ledger_seq) FROM invoices WHERE account_id = ? AND "
                      "kind = 'invoice'", (account_id,)).fetchone()[0]
    return _Snapshot(head[0] if head else 0, head[1] if head else ledger.GENESIS, balance,
                     last or 0)


def catch_up(db: sqlite3.Connection) -> int:
    """Index the ledger entries appended since the last look: settlements into
    ``uninvoiced``, payments into ``payments_seen``. One short transaction over only the new
    entries; returns the ledger seq indexed up to."""
    row = db.execute("SELECT value FROM invoice_meta WHERE name = 'indexed_seq'").fetchone()
    head = db.execute("SELECT coalesce(max(seq), 0) FROM ledger").fetchone()[0]
    if row and row[0] >= head:
        return row[0]
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT value FROM invoice_meta WHERE name = 'indexed_seq'").fetchone()
        upto = row[0] if row else 0
        db.execute(
            "INSERT OR IGNORE INTO uninvoiced SELECT seq, json_extract(entry, '$.account'), "
            "coalesce(json_extract(entry, '$.period'), '') FROM ledger WHERE seq > ? AND "
            "json_extract(entry, '$.kind') IS NULL AND seq NOT IN (SELECT seq FROM invoiced)",
            (upto,))
        db.execute(
            "INSERT OR IGNORE INTO payments_seen SELECT seq, json_extract(entry, '$.account') "
            "FROM ledger WHERE seq > ? AND json_extract(entry, '$.kind') = 'payment'", (upto,))
        head = db.execute("SELECT coalesce(max(seq), 0) FROM ledger").fetchone()[0]
        db.execute("INSERT OR REPLACE INTO invoice_meta VALUES ('indexed_seq', ?)", (head,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return head


def _pending(db: sqlite3.Connection, account_id: str, upto_seq: int
             ) -> list[tuple[int, dict[str, Any], str]]:
    """The account's settlements not yet on an invoice, oldest first (seq, entry, hash)."""
    rows = db.execute(
        "SELECT l.seq, l.entry, l.hash FROM uninvoiced u JOIN ledger l ON l.seq = u.seq "
        "WHERE u.account_id = ? AND u.seq <= ? ORDER BY u.seq", (account_id, upto_seq)
    ).fetchall()
    return [(seq, json.loads(text), h) for seq, text, h in rows]


def _payments(db: sqlite3.Connection, account_id: str, after_seq: int, upto_seq: int
              ) -> list[dict[str, Any]]:
    """Payments (``"kind": "payment"``) the ledger took for the account since its previous
    invoice: what this invoice acknowledges as received."""
    out = []
    for seq, text, h in db.execute(
            "SELECT l.seq, l.entry, l.hash FROM payments_seen p JOIN ledger l ON l.seq = p.seq "
            "WHERE p.account_id = ? AND p.seq > ? AND p.seq <= ? ORDER BY p.seq",
            (account_id, after_seq, upto_seq)):
        e = json.loads(text)
        at = next((e[k] for k in ("paid_at_ms", "received_at_ms", "confirmed_at_ms", "at_ms",
                                  "settled_at_ms") if isinstance(e.get(k), int)), None)
        out.append({"seq": seq, "hash": h, "amount_minor": int(e.get("amount_minor", 0)),
                    "at_ms": at, "reference": e.get("reference") or e.get("payment_id")})
    return out


@dataclass(frozen=True)
class Overdue:
    """An account's newest invoice past its due date with some of its outstanding amount
    still not covered by the payments and credit notes after it."""

    account: str
    number: str
    due_date: str
    outstanding_minor: int  # owed when it was issued
    owed_minor: int  # still owed of that
    currency: str


def overdue(db: sqlite3.Connection, tz: ZoneInfo, now_ms: int) -> list[Overdue]:
    """Invoices past due (the city's date at ``now_ms`` after their due date) and not paid:
    one per account, its newest such invoice, oldest debt paid first. An invoice found paid
    is marked so and never looked at again, nor any older one of its account."""
    ensure_schema(db)
    catch_up(db)  # every payment in the ledger is in payments_seen
    today = datetime.fromtimestamp(now_ms / 1000, tz).date().isoformat()
    newest: dict[str, tuple] = {}
    for row in db.execute("SELECT d.account_id, d.number, d.due_date, d.outstanding_minor, "
                          "d.ledger_seq, i.currency FROM invoice_due d JOIN invoices i "
                          "USING (number) WHERE d.paid = 0 AND d.due_date < ? "
                          "ORDER BY d.ledger_seq", (today,)):
        newest[row[0]] = row
    out, paid = [], []
    for account, number, due, outstanding, seq, currency in newest.values():
        payments_after = db.execute(
            "SELECT coalesce(sum(json_extract(l.entry, '$.amount_minor')), 0) FROM "
            "payments_seen p JOIN ledger l ON l.seq = p.seq WHERE p.account_id = ? AND "
            "p.seq > ?", (account, seq)).fetchone()[0]
        credited_after = db.execute(
            "SELECT coalesce(sum(total_minor), 0) FROM invoices WHERE account_id = ? AND "
            "kind = 'credit_note' AND ledger_seq > ?", (account, seq)).fetchone()[0]
        owed = outstanding - int(payments_after) - int(credited_after)
        if owed > 0:
            out.append(Overdue(account, number, due, outstanding, owed, currency))
        else:
            paid.append((account, seq))
    if paid:
        with db:
            db.executemany("UPDATE invoice_due SET paid = 1 WHERE account_id = ? AND "
                           "ledger_seq <= ?", paid)
    return out


def known_account(db: sqlite3.Connection, config: BillingConfig, account_id: str) -> bool:
    """An account the billing file names, or one the ledger has opened."""
    return account_id in config.accounts or db.execute(
        "SELECT 1 FROM accounts WHERE account_id = ?", (account_id,)).fetchone() is not None


def _check_account(db: sqlite3.Connection, config: BillingConfig, account_id: str) -> None:
    if not known_account(db, config, account_id):
        raise UnknownAccount(f"account {account_id!r}: not in the billing configuration and "
                             "never settled")


def check_period(period: str) -> str:
    if not isinstance(period, str) or not PERIOD.match(period):
        raise BadPeriod(f"period {period!r}: expected YYYY-MM (e.g. 2026-03)")
    return period


# ------------------------------------------------------------------ the document


def _seller(config: BillingConfig) -> dict[str, str | None]:
    """The utility's name, address and VAT number: the billing file's ``seller:``, else a
    plain default name."""
    seller = config.seller
    return {"name": seller.name if seller else DEFAULT_SELLER,
            "address": seller.address if seller else None,
            "vat_id": seller.vat_id if seller else None}


def _account_block(config: BillingConfig, account_id: str) -> dict[str, str | None]:
    a = config.accounts.get(account_id)
    return {"id": account_id, "name": a.name if a else None,
            "address": a.address if a else None}


def _due(config: BillingConfig, now_ms: int, tz: ZoneInfo) -> str:
    """The day an invoice issued at ``now_ms`` is payable by (city date): the seller's
    payment terms after the day of issue (14 days without a ``seller:``)."""
    days = config.seller.payment_terms_days if config.seller else PAYMENT_TERMS_DAYS
    return (datetime.fromtimestamp(now_ms / 1000, tz).date() + timedelta(days=days)).isoformat()


def _local(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="seconds")


def _number(db: sqlite3.Connection, kind: str, issued_at_ms: int, tz: ZoneInfo) -> str:
    """The next number of the kind's series in the year of issue (city time): one more
    than how many it holds, so a number is never skipped."""
    prefix = f"{SERIES[kind]}-{datetime.fromtimestamp(issued_at_ms / 1000, tz).year:04d}-"
    last = db.execute("SELECT max(number) FROM invoices WHERE number > ? AND number < ?",
                      (prefix, prefix + "~")).fetchone()[0]  # the primary key's index
    return f"{prefix}{(int(last[len(prefix):]) if last else 0) + 1:06d}"


def _base(config: BillingConfig, tz: ZoneInfo, kind: str, number: str, account_id: str,
          now_ms: int, snap: _Snapshot) -> dict[str, Any]:
    return {"type": kind, "number": number, "seller": _seller(config),
            "account": _account_block(config, account_id), "currency": config.currency,
            "minor_units": config.minor_units, "issued_at_ms": now_ms,
            "issued_at": _local(now_ms, tz), "timezone": tz.key,
            "ledger_head": {"seq": snap.head_seq, "hash": snap.head_hash},
            "ledger_entry_seq": snap.head_seq + 1}


def invoice_document(config: BillingConfig, tz: ZoneInfo, number: str, account_id: str,
                     period: str | None, entries: list[tuple[int, dict[str, Any], str]],
                     now_ms: int, snap: _Snapshot, payments: list[dict[str, Any]]
                     ) -> dict[str, Any]:
    """The invoice as a plain JSON document (what is hashed, stored, rendered)."""
    lines, vat, net, vat_minor, total = build_lines(config, [e for _, e, _ in entries])
    doc = _base(config, tz, INVOICE, number, account_id, now_ms, snap)
    doc.update({
        "period": period,
        "from_ms": min(e.get("from_ms", now_ms) for _, e, _ in entries),
        "to_ms": max(e.get("to_ms", now_ms) for _, e, _ in entries),
        "lines": lines, "vat": vat, "net_minor": net, "vat_minor": vat_minor,
        "total_minor": total, "payments": payments,
        # Payable by: only when the account owes (a prepaid balance left has nothing due).
        "due_date": _due(config, now_ms, tz) if snap.balance_minor < 0 else None,
        "payments_minor": sum(p["amount_minor"] for p in payments),
        "balance_minor": snap.balance_minor, "outstanding_minor": max(0, -snap.balance_minor),
        "entries": [{"seq": seq, "hash": h, "key": e.get("key"), "meter": e.get("meter"),
                     "period": e.get("period"), "from_ms": e.get("from_ms"),
                     "to_ms": e.get("to_ms"), "kwh": e.get("kwh"),
                     "amount_minor": int(e.get("amount_minor", 0))}
                    for seq, e, h in entries],
    })
    doc["from"], doc["to"] = _local(doc["from_ms"], tz), _local(doc["to_ms"], tz)
    return doc


# ------------------------------------------------------------------ issuing


def _append(db: sqlite3.Connection, config: BillingConfig, tz: ZoneInfo, kind: str,
            account_id: str, key: str | None, now_ms: int, delta_sign: int,
            build: Callable[[str, _Snapshot], tuple[dict[str, Any], list[int]] | None]
            ) -> tuple[Invoice | None, bool]:
    """Build the document against the ledger as it is, then append its entry and store it
    in one transaction — built again if another writer moved the ledger in between.
    ``build(number, snapshot)`` returns (document, the seqs it covers) or None (nothing to
    do). ``key`` None: the entry's key is ``<kind>:<number>``. A key already in the ledger
    returns the invoice stored under it. Returns (the invoice, whether this call issued it)."""
    for _ in range(_ATTEMPTS):
        if key is not None:
            rows = _rows(db, f"SELECT {_COLUMNS} FROM invoices WHERE ledger_key = ?", (key,))
            if rows:
                return _invoice(rows[0]), False
        snap = _snapshot(db, config, account_id)
        number = _number(db, kind, now_ms, tz)
        built = build(number, snap)
        if built is None:
            return None, False
        doc, covered = built
        digest = document_hash(doc)
        entry_key = key or f"{kind}:{number}"
        total = int(doc["total_minor"])
        fields = {"kind": kind, "number": number, "document_sha256": digest,
                  "total_minor": total, "currency": config.currency, "issued_at_ms": now_ms,
                  "period": doc.get("period"), "refers_to": doc.get("refers_to")}

        def also(doc=doc, number=number, digest=digest, covered=covered, snap=snap,
                 entry_key=entry_key, total=total) -> None:
            prev = db.execute("SELECT seq FROM ledger ORDER BY seq DESC LIMIT 1 OFFSET 1"
                              ).fetchone()
            if (prev[0] if prev else 0) != snap.head_seq:
                raise _Stale
            if _number(db, kind, now_ms, tz) != number:
                raise _Stale
            db.execute("INSERT INTO invoices VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                number, kind, account_id, doc.get("period"), doc.get("from_ms"),
                doc.get("to_ms"), now_ms, doc.get("refers_to"), total, config.currency,
                entry_key, snap.head_seq + 1, canonical(doc).decode(), digest))
            try:
                db.executemany("INSERT INTO invoiced VALUES (?, ?)",
                               [(seq, number) for seq in covered])
            except sqlite3.IntegrityError:
                raise _Stale from None
            db.executemany("DELETE FROM uninvoiced WHERE seq = ?", [(q,) for q in covered])
            if kind == INVOICE and doc.get("due_date"):
                db.execute("INSERT INTO invoice_due VALUES (?, ?, ?, ?, ?, 0)", (
                    number, account_id, doc["due_date"], doc["outstanding_minor"],
                    snap.head_seq + 1))
            if kind == INVOICE:  # an agent that pays invoices is asked, in this transaction
                payments.on_invoiced(db, config, account_id, number, total, config.currency,
                                     now_ms)

        try:
            done = ledger.append(db, config, entry_key, account_id, fields,
                                 delta_sign * total, also=also)
        except _Stale:
            continue
        if done is None:  # the key was taken meanwhile: the loop returns what it holds
            continue
        return replace(get_invoice(db, number), created=True), True
    raise InvoiceError("the ledger kept moving while the document was built; try again")


def issue(db: sqlite3.Connection, config: BillingConfig, tz: ZoneInfo, account_id: str,
          now_ms: int, *, period: str | None = None) -> Invoice:
    """One account's invoice. With ``period`` (YYYY-MM, ended in the city's time): the
    monthly invoice — the account's settlements of that month and earlier not yet invoiced;
    issuing it again returns the first (the ledger key is ``invoice:<account>:<period>``).
    Without: on demand, every settlement not yet invoiced up to now. Raises UnknownAccount,
    BadPeriod, NothingToInvoice."""
    return _issue(db, config, tz, account_id, now_ms, period)[0]


def _issue(db: sqlite3.Connection, config: BillingConfig, tz: ZoneInfo, account_id: str,
           now_ms: int, period: str | None) -> tuple[Invoice, bool]:
    ensure_schema(db)
    _check_account(db, config, account_id)
    key = None
    if period is not None:
        check_period(period)
        if period >= tariffs.period_of(now_ms, tz):
            raise BadPeriod(f"period {period}: has not ended yet (it is "
                            f"{tariffs.period_of(now_ms, tz)} in {tz.key})")
        key = f"invoice:{account_id}:{period}"

    def build(number: str, snap: _Snapshot) -> tuple[dict[str, Any], list[int]] | None:
        catch_up(db)  # after the snapshot: every settlement up to its head is indexed
        entries = [p for p in _pending(db, account_id, snap.head_seq)
                   if period is None or p[1].get("period", "") <= period]
        if not entries:
            return None
        payments = _payments(db, account_id, snap.last_invoice_seq, snap.head_seq)
        doc = invoice_document(config, tz, number, account_id, period, entries, now_ms, snap,
                               payments)
        return doc, [seq for seq, _, _ in entries]

    done, created = _append(db, config, tz, INVOICE, account_id, key, now_ms, 0, build)
    if done is None:
        what = f"in {period} or before" if period else "up to now"
        raise NothingToInvoice(f"account {account_id}: no settlement {what} that is not "
                               "already on an invoice")
    return done, created


def issue_due(db: sqlite3.Connection, config: BillingConfig, tz: ZoneInfo, now_ms: int,
              *, limit: int | None = None) -> list[Invoice]:
    """The monthly invoices due at ``now_ms`` (event time): for each account and each month
    that has ended with settlements not yet invoiced, its invoice (oldest month first). A
    settlement of a month already invoiced (late) goes on the invoice of the newest month
    that has ended, or when that one is issued already, the next one. Idempotent: run it as
    often as you like; the rule runner does, periodically. ``limit``: at most this many
    issued per call (the runner spreads a month's end over several looks); the next call
    issues what is left."""
    ensure_schema(db)
    catch_up(db)
    current = tariffs.period_of(now_ms, tz)
    last_ended = previous_period(current)
    issued: list[Invoice] = []
    for account_id, p in db.execute(
            "SELECT DISTINCT account_id, period FROM uninvoiced WHERE period < ? "
            "ORDER BY account_id, period", (current,)).fetchall():
        if limit is not None and len(issued) >= limit:
            break
        if not PERIOD.match(p):
            continue
        # That month's invoice; if it was issued already (these came late), the newest
        # ended month's, which takes every month up to it.
        for month in dict.fromkeys((p, last_ended)):
            try:
                inv, created = _issue(db, config, tz, account_id, now_ms, month)
            except NothingToInvoice:  # an earlier month's invoice took them
                break
            if created:
                issued.append(inv)
                break
    return issued


def previous_period(period: str) -> str:
    """The month before ``period`` (YYYY-MM)."""
    year, month = int(period[:4]), int(period[5:7])
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


# ------------------------------------------------------------------ credit notes


def _split_credit(config: BillingConfig, invoice: dict[str, Any], gross_minor: int
                  ) -> list[tuple[str, int, int]]:
    """A gross credit shared over the invoice's VAT rates by their share of it: (rate, net,
    VAT) in minor units, adding up to ``gross_minor`` exactly."""
    rates = [(v["rate"], v["base_minor"] + v["amount_minor"]) for v in invoice["vat"]]
    whole = sum(g for _, g in rates)
    if not rates or whole <= 0:
        rates, whole = [("0", 1)], 1
    out, left = [], gross_minor
    for i, (rate, g) in enumerate(rates):
        part = left if i == len(rates) - 1 else int(
            (Decimal(gross_minor) * g / whole).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        left -= part
        r = Decimal(rate)
        tax = int((Decimal(part) * r / (1 + r)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        out.append((rate, part - tax, tax))
    return [o for o in out if o[1] or o[2]]


def _credit_lines(config: BillingConfig, invoice: dict[str, Any], reason: str,
                  amount: Decimal | None, lines: list[int] | None
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(line items, VAT lines) of a credit note, in minor units, positive = credited."""
    if (amount is None) == (not lines):
        raise BadCredit("a credit note takes an amount or the invoice's line numbers, "
                        "one of the two")
    out, vat = [], {}
    if amount is not None:
        if not amount.is_finite() or amount <= 0:
            raise BadCredit(f"amount {amount}: must be positive")
        gross = amount * config.minor_units
        if gross != gross.to_integral_value():
            raise BadCredit(f"amount {amount}: more decimals than {config.currency} has")
        for rate, net, tax in _split_credit(config, invoice, int(gross)):
            out.append({"kind": "credit", "label": f"Credit: {reason}", "quantity": "1",
                        "unit": "", "unit_price": None, "average_price": False,
                        "amount": money(config, net), "amount_minor": net, "vat_rate": rate})
            v = vat.setdefault(rate, [0, 0])
            v[0], v[1] = v[0] + net, v[1] + tax
    else:
        assert lines is not None
        if len(set(lines)) != len(lines):
            raise BadCredit(f"lines {lines}: a line is credited once")
        for n in lines:
            if not 1 <= n <= len(invoice["lines"]):
                raise BadCredit(f"line {n}: the invoice has lines 1 to {len(invoice['lines'])}")
            li = invoice["lines"][n - 1]
            r = _dec(li.get("vat_rate"))
            net = li["amount_minor"]
            tax = int((Decimal(net) * r).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            out.append({**li, "invoice_line": n})
            v = vat.setdefault(li.get("vat_rate") or "0", [0, 0])
            v[0], v[1] = v[0] + net, v[1] + tax
    vat_lines = [{"rate": rate, "base": money(config, b), "base_minor": b,
                  "amount": money(config, t), "amount_minor": t}
                 for rate, (b, t) in sorted(vat.items())]
    return out, vat_lines


def credit(db: sqlite3.Connection, config: BillingConfig, tz: ZoneInfo, number: str,
           reason: str, now_ms: int, *, amount: Decimal | str | None = None,
           lines: list[int] | None = None) -> Invoice:
    """A credit note against invoice ``number``: ``amount`` (gross, in currency units) or the
    invoice's ``lines`` (1-based) credited in full with their VAT. A new ledger entry
    (``"kind": "credit_note"``) credits the account; all of an invoice's credit notes
    together never exceed what it charged. Raises NoSuchInvoice, BadCredit, CreditTooLarge."""
    ensure_schema(db)
    reason = (reason or "").strip()
    if not reason:
        raise BadCredit("a credit note needs a reason")
    if len(reason) > 500:
        raise BadCredit("reason: at most 500 characters")
    if amount is not None and not isinstance(amount, Decimal):
        try:
            amount = Decimal(str(amount))
        except InvalidOperation:
            raise BadCredit(f"amount {amount!r}: not a number") from None
    original = get_invoice(db, number)
    if original.kind != INVOICE:
        raise BadCredit(f"{number} is a credit note; credit the invoice it refers to")
    items, vat_lines = _credit_lines(config, original.document, reason, amount, lines)
    net = sum(li["amount_minor"] for li in items)
    vat_minor = sum(v["amount_minor"] for v in vat_lines)
    total = net + vat_minor

    def build(cn: str, snap: _Snapshot) -> tuple[dict[str, Any], list[int]]:
        credited = sum(c.total_minor for c in credit_notes_of(db, number))
        if credited + total > original.total_minor:
            raise CreditTooLarge(
                f"credit of {money(config, total)} {config.currency} against {number}: it "
                f"charged {money(config, original.total_minor)}, of which "
                f"{money(config, credited)} is already credited (at most "
                f"{money(config, original.total_minor - credited)} more)")
        doc = _base(config, tz, CREDIT_NOTE, cn, original.account, now_ms, snap)
        doc.update({"refers_to": number, "refers_to_sha256": original.sha256,
                    "refers_to_ledger_seq": original.ledger_seq, "reason": reason,
                    "period": original.period, "lines": items, "vat": vat_lines,
                    "net_minor": net, "vat_minor": vat_minor, "total_minor": total,
                    "payments": [], "payments_minor": 0,
                    "balance_minor": snap.balance_minor + total,
                    "outstanding_minor": max(0, -(snap.balance_minor + total)),
                    "entries": []})
        return doc, []

    done, _ = _append(db, config, tz, CREDIT_NOTE, original.account, None, now_ms, 1, build)
    assert done is not None
    return done


__all__ = ["CREDIT_NOTE", "INVOICE", "BadCredit", "BadPeriod", "CreditTooLarge", "Invoice",
           "InvoiceError", "NoSuchInvoice", "NothingToInvoice", "Overdue", "UnknownAccount",
           "build_lines", "catch_up", "check_period", "credit", "credit_notes_of", "document_hash",
           "entry_lines", "get_invoice", "issue", "issue_due", "known_account",
           "list_invoices", "money", "open_db", "overdue", "verify_invoice"]
