"""Billing's read functions for other services (the gateway, `citygrid up`, backup): accounts,
settlements and the ledger's status, read from ``billing.sqlite`` over a read-only connection.
Only billing writes its tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billing.ledger import LedgerError, verify
from citygrid import statedb

FILENAME = "billing.sqlite"


def path(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILENAME


@dataclass(frozen=True)
class Account:
    account_id: str
    balance_minor: int
    low_balance_minor: int
    currency: str

    @property
    def low(self) -> bool:
        return self.balance_minor < self.low_balance_minor


@dataclass(frozen=True)
class LedgerStatus:
    ok: bool
    entries: int
    head: str | None
    error: str | None = None


def _rows(data_dir: str | Path, sql: str, params: tuple = ()) -> list[tuple]:
    return statedb.read_rows(path(data_dir), sql, params)


def accounts(data_dir: str | Path) -> list[Account]:
    """Every account with its balance (minor units), by id."""
    return [Account(*r) for r in _rows(
        data_dir, "SELECT account_id, balance_minor, low_balance_minor, currency FROM accounts "
        "ORDER BY account_id")]


def settlements(data_dir: str | Path, *, meter: str | None = None, account: str | None = None,
                limit: int = 100, newest_first: bool = True, every_kind: bool = False
                ) -> list[dict[str, Any]]:
    """Settlements (``every_kind``: every ledger entry — payments, invoices, credit notes
    too), each with its ``hash``; filtered and limited in SQL."""
    order = "DESC" if newest_first else "ASC"
    return [{**json.loads(e), "hash": h} for e, h in _rows(
        data_dir, "SELECT entry, hash FROM ledger WHERE (?1 IS NULL OR json_extract(entry, "
        "'$.meter') = ?1) AND (?2 IS NULL OR json_extract(entry, '$.account') = ?2) "
        "AND (?4 OR json_extract(entry, '$.kind') IS NULL) "
        f"ORDER BY seq {order} LIMIT ?3", (meter or None, account or None, limit, every_kind))]


# When an entry happened, by kind: a settlement's settling, a payment's confirmation, an
# invoice's or a credit note's issue (the first of these an entry has).
_WHEN = ("settled_at_ms", "confirmed_at_ms", "issued_at_ms", "created_ms")


def entry_time(entry: dict[str, Any]) -> int | None:
    """When a ledger entry happened (epoch ms), whatever its kind."""
    for name in _WHEN:
        if isinstance(entry.get(name), int):
            return entry[name]
    return None


def entries_after(data_dir: str | Path, seq: int, limit: int = 1000
                  ) -> list[tuple[int, dict[str, Any], str]]:
    """Ledger entries after ``seq``, oldest first: (seq, entry, hash). One indexed read."""
    return [(n, json.loads(e), h) for n, e, h in _rows(
        data_dir, "SELECT seq, entry, hash FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?",
        (seq, limit))]


def last_seq(data_dir: str | Path) -> int:
    rows = _rows(data_dir, "SELECT coalesce(max(seq), 0) FROM ledger")
    return rows[0][0] if rows else 0


def ledger_status(data_dir: str | Path, head: str | None = None) -> LedgerStatus:
    """Whether the ledger's hash chain verifies (and still holds ``head``), its size and head."""
    p = path(data_dir)
    if not p.exists():
        return LedgerStatus(ok=True, entries=0, head=None)
    try:
        count, newest = verify(p, head)
    except LedgerError as e:
        return LedgerStatus(ok=False, entries=0, head=None, error=str(e))
    return LedgerStatus(ok=True, entries=count, head=newest)





def check_balances(data_dir: str | Path) -> tuple[int, str]:
    """The ledger verifies, and every account's balance is the one its newest entry left (a
    settlement was never half written). Returns (entries, head); raises LedgerError."""
    entries, head = verify(path(data_dir))
    balances = {a.account_id: a.balance_minor for a in accounts(data_dir)}
    last = {e["account"]: e["balance_after_minor"]
            for e in settlements(data_dir, limit=-1, newest_first=False, every_kind=True)}
    for account, after in last.items():
        if balances.get(account) != after:
            raise LedgerError(None, None, f"account {account}: balance {balances.get(account)} "
                              f"but its newest ledger entry left {after} (a half-written "
                              "settlement)")
    return entries, head
__all__ = ["FILENAME", "Account", "LedgerStatus", "accounts", "check_balances", "entries_after",
           "entry_time", "last_seq", "ledger_status", "path", "settlements"]
