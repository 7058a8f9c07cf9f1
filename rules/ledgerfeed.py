"""The ledger as points: every ledger entry — a settlement, a payment, an invoice, a credit
note, whichever process appended it (a rule worker, the gateway taking a payment agent's
callback, ``citygrid invoice``) — becomes one ``citygrid_ledger`` point, so the energy and
billing dashboard shows invoices, payments and what each account owes.

Between socket reads the runner calls :meth:`LedgerFeed.tick`: one indexed read of the
entries after the last one it wrote. A point's identity is its measurement, tags and time,
so a worker that writes an entry again (after a restart, or beside another worker) only
overwrites it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from billing import entries_after, entry_time
from citygrid.store import Point

log = logging.getLogger("citygrid.rules.ledgerfeed")
LEDGER_MEASUREMENT = "citygrid_ledger"
# How an entry moves its account's balance, by kind (a settlement debits; the rest credit or,
# an invoice, only record): the point's `amount_minor` is the money, `change_minor` the move.
_CREDITS = {"payment", "credit_note"}


def point(seq: int, entry: dict[str, Any]) -> Point | None:
    """The point of one ledger entry (None: an entry with no time, written by nothing here)."""
    ts = entry_time(entry)
    if ts is None:
        return None
    kind = entry.get("kind", "settlement")
    amount = entry.get("total_minor", entry.get("amount_minor", 0))
    change = 0 if kind == "invoice" else (amount if kind in _CREDITS else -amount)
    balance = entry.get("balance_after_minor", 0)
    return Point(LEDGER_MEASUREMENT, {"account": str(entry.get("account", "")), "kind": kind}, {
        "seq": seq, "amount_minor": amount, "change_minor": change, "balance_minor": balance,
        "outstanding_minor": max(0, -balance)}, ts)


class LedgerFeed:
    """``points(list)`` is the runner's outbox writer; ``seq`` the last entry already written
    (the runner keeps it with its state)."""

    def __init__(self, data_dir: str | Path, points: Callable[[list[Point]], None], seq: int):
        self.data_dir, self.points, self.seq = data_dir, points, seq

    def tick(self, limit: int = 1000) -> bool:
        """Write the entries appended since the last look; True when there were any."""
        rows = entries_after(self.data_dir, self.seq, limit)
        if not rows:
            return False
        made = [p for seq, entry, _ in rows if (p := point(seq, entry)) is not None]
        if made:
            self.points(made)
        self.seq = rows[-1][0]
        return True
