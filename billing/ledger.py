"""The billing store: meter state, unbilled consumption, accounts and the hash-chained ledger.

A settlement prices a meter's unbilled consumption, debits its account and
appends a ledger entry in one SQLite transaction, under a deterministic
idempotency key (meter + the register interval settled): a replay, a duplicate
or a crash anywhere in between never settles twice and never skips.

Each ledger entry carries the SHA-256 of its canonical encoding (sorted keys,
no insignificant whitespace) and its predecessor's hash, so an edited, deleted,
inserted or reordered entry breaks the chain (`citygrid ledger verify`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from billing import payments, settlement, tariffs
from billing.accounting import MeterState, Outcome, account, to_mwh
from billing.config import BillingConfig, MeterBinding, Tariff
from billing.prices import QUARTER_MS, PriceFile, SpotPrices
from citygrid import statedb
from citygrid.fleet import Fleet

GENESIS = "0" * 64

# A register's accounting state (billing/accounting.py MeterState): the import register's in
# `meters`, the export register's in `export_meters`.
_REGISTER = """(
    meter_id TEXT PRIMARY KEY, last_ts INTEGER, last_register INTEGER NOT NULL,
    spike_ts INTEGER, spike_register INTEGER NOT NULL, held_mwh INTEGER NOT NULL,
    resets INTEGER NOT NULL, ignored INTEGER NOT NULL);"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meters {_REGISTER}
CREATE TABLE IF NOT EXISTS unbilled (
    meter_id TEXT NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
    mwh INTEGER NOT NULL, price TEXT NOT NULL, amount TEXT NOT NULL, period TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'energy', label TEXT NOT NULL DEFAULT 'Energy');
CREATE INDEX IF NOT EXISTS unbilled_by_meter ON unbilled (meter_id, start_ms);
CREATE TABLE IF NOT EXISTS period_usage (
    meter_id TEXT NOT NULL, period TEXT NOT NULL, mwh INTEGER NOT NULL,
    PRIMARY KEY (meter_id, period));
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY, balance_minor INTEGER NOT NULL,
    low_balance_minor INTEGER NOT NULL, currency TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS standing_charged (
    meter_id TEXT NOT NULL, period TEXT NOT NULL, PRIMARY KEY (meter_id, period));
CREATE TABLE IF NOT EXISTS export_meters {_REGISTER}
CREATE TABLE IF NOT EXISTS unpriced (
    meter_id TEXT NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
    mwh INTEGER NOT NULL, period TEXT NOT NULL, kind TEXT NOT NULL, label TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS demand (
    meter_id TEXT NOT NULL, period TEXT NOT NULL, peak_mwh INTEGER NOT NULL,
    peak_start_ms INTEGER, q_start_ms INTEGER, q_mwh INTEGER NOT NULL,
    PRIMARY KEY (meter_id, period));
CREATE TABLE IF NOT EXISTS export_carry (meter_id TEXT PRIMARY KEY, amount TEXT NOT NULL);
-- The month of a meter's first reading: its fixed charges run from there (billing/ledger.py
-- BillingStore.settle), a month it sent nothing in included.
CREATE TABLE IF NOT EXISTS meter_since (meter_id TEXT PRIMARY KEY, period TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, entry TEXT NOT NULL,
    hash TEXT NOT NULL);
"""


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


class LedgerError(ValueError):
    def __init__(self, seq: int | None, key: str | None, reason: str):
        where = f"entry {seq} ({key})" if seq is not None else "the ledger"
        super().__init__(f"{where}: {reason}")
        self.seq, self.key, self.reason = seq, key, reason


@dataclass
class Settlement:
    entry: dict[str, Any]
    hash: str
    low_balance: bool


class BillingStore:
    def __init__(self, path: str | Path, config: BillingConfig, fleet: Fleet | None,
                 tz: ZoneInfo):
        self.config, self.fleet, self.tz = config, fleet, tz
        self.path = Path(path)
        self.db = statedb.connect(path)
        # WAL + NORMAL: a commit survives a process crash (the tested case); after a power
        # loss the last settlement may be gone whole — debit and entry together — and is
        # simply settled again from the unbilled readings. Per-reading fsyncs cost more.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        _migrate(self.db)
        self._checkpoints = statedb.checkpoint_in_background(self.db, self.path)
        self._lock = threading.Lock()
        self._bindings: dict[str, tuple[Any, MeterBinding | None]] = {}
        self._states: dict[str, MeterState] = {}
        # Per meter: unbilled (mwh, rows, oldest period, amount) — summed from the table once,
        # then kept up to date, so the rules' `meter.unbilled_kwh` does not re-read every
        # unbilled row on every reading (bench/pipeline.py's profile); settling drops it.
        self._unbilled: dict[str, tuple[int, int, str | None, Decimal]] = {}
        self._uncharged_from: dict[str, str | None] = {}  # unbilled()'s uncharged_period
        # Per meter: mWh priced per period so far (tiers count per month), as the table has
        # it after the last commit — read once, like the meter state, not on every reading.
        self._usage: dict[str, dict[str, int]] = {}
        self._export_states: dict[str, MeterState] = {}
        # Per meter and month: [peak mWh in a quarter hour, its start, the current quarter's
        # start, its mWh so far] — for capacity charges (billing/config.py Demand).
        self._demand: dict[str, dict[str, list]] = {}
        self._demand_tariffs: dict[int, tuple[Tariff, bool]] = {}
        # Spot prices (billing/prices.py), read again when the file changes.
        self.prices = (PriceFile(config.price_file, config.currency)
                       if config.price_file else None)
        self.appended = 0  # ledger entries this store appended (the anchor looks after a change)

    # ------------------------------------------------------------------ readings

    def _state(self, meter_id: str, table: str = "meters") -> MeterState:
        """A register's state (``meters``: import, ``export_meters``: export), read once."""
        states = self._states if table == "meters" else self._export_states
        state = states.get(meter_id)
        if state is None:
            row = self.db.execute("SELECT last_ts, last_register, spike_ts, spike_register, "
                                  f"held_mwh, resets, ignored FROM {table} WHERE meter_id = ?",
                                  (meter_id,)).fetchone()
            state = states[meter_id] = MeterState(*row) if row else MeterState()
        return state

    def _save_state(self, meter_id: str, state: MeterState, table: str = "meters") -> None:
        self.db.execute(f"INSERT OR REPLACE INTO {table} VALUES (?,?,?,?,?,?,?,?)",
                        (meter_id, state.last_ts, state.last_register, state.spike_ts,
                         state.spike_register, state.held_mwh, state.resets, state.ignored))

    def spot(self) -> SpotPrices | None:
        return self.prices.current() if self.prices is not None else None

    def price_now(self, tariff: str, ts_ms: int) -> Decimal | None:
        """The tariff's energy price per kWh now (None at spot when the file has none)."""
        return tariffs.price_now(self.config, tariff, self.tz, ts_ms, self.spot())

    def max_power_w(self, meter_id: str) -> float:
        device = self.fleet.by_id.get(meter_id) if self.fleet else None
        return (device.max_power_w if device and device.max_power_w else 3 * 63 * 230.0)

    def on_reading(self, meter_id: str, ts_ms: int, energy_kwh: float,
                   export_kwh: float | None = None) -> list[tuple[str, str]]:
        """Account one meter reading — its import register and, when the meter reports one,
        its export register; returns events worth an alert (reset, spike, held, unpriced;
        the export register's prefixed ``export-``)."""
        binding = self._binding(meter_id)
        if binding is None:
            return [("unbilled_meter", f"{meter_id} has no account and tariff")]
        tariff = self.config.tariffs[binding.tariff]
        with self._lock:
            state = self._state(meter_id)
            first = state.last_ts is None
            max_w = self.max_power_w(meter_id)
            outcome = account(state, ts_ms, to_mwh(energy_kwh), max_w)
            events = outcome.events
            imports, exports = outcome.intervals, []
            xstate = None
            if export_kwh is not None:
                xstate = self._state(meter_id, "export_meters")
                x: Outcome = account(xstate, ts_ms, to_mwh(export_kwh), max_w)
                events = events + [(f"export-{k}", f"export register: {d}") for k, d in x.events]
                imports, exports = _net(tariff, self.tz, imports, x.intervals)
            before = self._usage.get(meter_id)
            if before is None:
                before = {p: m for p, m in self.db.execute(
                    "SELECT period, mwh FROM period_usage WHERE meter_id = ?", (meter_id,))}
            used = dict(before)
            spot = self.spot()
            segments = [s for t0, t1, mwh in imports
                        for s in tariffs.price(self.config, binding.tariff, self.tz, t0, t1, mwh,
                                               used, spot)]
            segments += [s for t0, t1, mwh in exports
                         for s in tariffs.credit(self.config, binding.tariff, self.tz, t0, t1,
                                                 mwh, spot)]
            held = [s for s in segments if s.price is None]
            if held:
                segments = [s for s in segments if s.price is not None]
                events = events + [_unpriced(held, spot)]
            demand = self._track_demand(meter_id, tariff, imports)
            with self.db:
                self._save_state(meter_id, state)
                if first:
                    self.db.execute("INSERT OR IGNORE INTO meter_since VALUES (?, ?)",
                                    (meter_id, tariffs.period_of(ts_ms, self.tz)))
                if xstate is not None:
                    self._save_state(meter_id, xstate, "export_meters")
                self.db.executemany("INSERT INTO unbilled VALUES (?,?,?,?,?,?,?,?,?)", [
                    (meter_id, s.start_ms, s.end_ms, s.mwh, str(s.price), str(s.amount),
                     s.period, s.kind, s.label) for s in segments])
                if held:
                    self.db.executemany("INSERT INTO unpriced VALUES (?,?,?,?,?,?,?)", [
                        (meter_id, s.start_ms, s.end_ms, s.mwh, s.period, s.kind, s.label)
                        for s in held])
                self.db.executemany("INSERT OR REPLACE INTO period_usage VALUES (?,?,?)", [
                    (meter_id, p, m) for p, m in used.items() if before.get(p) != m])
                if demand:
                    self.db.executemany("INSERT OR REPLACE INTO demand VALUES (?,?,?,?,?,?)", [
                        (meter_id, p, *row) for p, row in demand.items()])
            self._usage[meter_id] = used  # committed
            if first:
                self._uncharged_from.pop(meter_id, None)
            self._cache_unbilled(meter_id, segments)
        return events

    def _cache_unbilled(self, meter_id: str, segments: list[tariffs.Segment]) -> None:
        cached = self._unbilled.get(meter_id)
        if cached is not None and segments:
            mwh, rows, oldest, amount = cached
            periods = [s.period for s in segments] + ([oldest] if oldest else [])
            self._unbilled[meter_id] = (
                mwh + sum(s.mwh for s in segments if s.kind == "energy"),
                rows + len(segments), min(periods),
                amount + sum((s.amount for s in segments if s.amount is not None), Decimal(0)))

    def _track_demand(self, meter_id: str, tariff: Tariff, imports: list[tuple[int, int, int]]
                      ) -> dict[str, list]:
        """Add imported energy to its quarter hours; returns the months whose row changed."""
        if not imports:
            return {}
        has = self._demand_tariffs.get(id(tariff))
        if has is None or has[0] is not tariff:
            has = self._demand_tariffs[id(tariff)] = (tariff, any(
                p.demand is not None for p in (tariff, *tariff.versions)))
        if not has[1]:
            return {}
        months = self._demand.get(meter_id)
        if months is None:
            months = self._demand[meter_id] = {
                r[0]: list(r[1:]) for r in self.db.execute(
                    "SELECT period, peak_mwh, peak_start_ms, q_start_ms, q_mwh FROM demand "
                    "WHERE meter_id = ?", (meter_id,))}
        changed = {}
        for t0, t1, mwh in imports:
            cuts = [t0, *range(-(-t0 // QUARTER_MS) * QUARTER_MS, t1, QUARTER_MS), t1]
            cuts = sorted(set(cuts))
            pieces = list(zip(cuts, cuts[1:], strict=False))
            for (a, _), part in zip(pieces, tariffs.share(mwh, [b - a for a, b in pieces]),
                                    strict=True):
                q = a // QUARTER_MS * QUARTER_MS
                period = tariffs.period_of(q, self.tz)
                row = months.setdefault(period, [0, None, None, 0])
                if row[2] == q:
                    row[3] += part
                else:
                    row[2], row[3] = q, part
                if row[3] > row[0]:
                    row[0], row[1] = row[3], q
                changed[period] = row
        return changed

    def reprice(self, meter_id: str) -> int:
        """Price consumption held for want of a spot price, where the price file now has one
        (read again if it changed); returns how many pieces were priced."""
        binding = self.config.binding(meter_id, self.fleet)
        if binding is None or self.prices is None:
            return 0
        spot = self.prices.current(now=True)
        with self._lock:
            rows = self.db.execute("SELECT rowid, start_ms, end_ms, mwh, kind FROM unpriced "
                                   "WHERE meter_id = ? ORDER BY start_ms", (meter_id,)).fetchall()
            priced = [(rowid, seg) for rowid, t0, t1, mwh, kind in rows
                      if (seg := tariffs.price_held(self.config, binding.tariff, self.tz, kind,
                                                    t0, t1, mwh, spot)) is not None]
            if not priced:
                return 0
            with self.db:
                self.db.executemany("DELETE FROM unpriced WHERE rowid = ?",
                                    [(rowid,) for rowid, _ in priced])
                self.db.executemany("INSERT INTO unbilled VALUES (?,?,?,?,?,?,?,?,?)", [
                    (meter_id, s.start_ms, s.end_ms, s.mwh, str(s.price), str(s.amount),
                     s.period, s.kind, s.label) for _, s in priced])
            self._unbilled.pop(meter_id, None)
        return len(priced)

    def unpriced(self, meter_id: str, kind: str = "energy") -> int:
        """mWh imported (``energy``) or exported (``export``) held for want of a spot price."""
        with self._lock:
            return self.db.execute("SELECT coalesce(sum(mwh), 0) FROM unpriced WHERE "
                                   "meter_id = ? AND kind = ?", (meter_id, kind)).fetchone()[0]

    def _binding(self, meter_id: str) -> MeterBinding | None:
        """``config.binding``, kept per meter while its fleet entry is the same object (a
        reading per meter a minute: no model built for each)."""
        device = self.fleet.by_id.get(meter_id) if self.fleet else None
        hit = self._bindings.get(meter_id)
        if hit is not None and hit[0] is device:
            return hit[1]
        binding = self.config.binding(meter_id, self.fleet)
        if len(self._bindings) > 100_000:
            self._bindings.clear()
        self._bindings[meter_id] = (device, binding)
        return binding

    def unbilled(self, meter_id: str) -> dict[str, Any]:
        """What the meter has not been billed for: kWh, amount, the oldest month it is from,
        and the first month whose fixed charges are not charged yet (None for a meter never
        read) — a month that ended with nothing unbilled still owes its fixed charges."""
        with self._lock:
            cached = self._unbilled.get(meter_id)
            if cached is None:
                row = self.db.execute("SELECT coalesce(sum(CASE kind WHEN 'energy' THEN mwh "
                                      "ELSE 0 END), 0), count(*), min(period) FROM unbilled "
                                      "WHERE meter_id = ?", (meter_id,)).fetchone()
                amount = sum((Decimal(a) for (a,) in self.db.execute(
                    "SELECT amount FROM unbilled WHERE meter_id = ?", (meter_id,))), Decimal(0))
                cached = self._unbilled[meter_id] = (row[0], row[1], row[2], amount)
            uncharged = self._uncharged_from.get(meter_id, "")
            if uncharged == "":
                uncharged = self._uncharged_from[meter_id] = self._first_uncharged(meter_id)
        mwh, _, oldest, amount = cached
        return {"kwh": mwh / 1_000_000, "amount": float(amount), "oldest_period": oldest,
                "uncharged_period": uncharged}

    def _since(self, meter_id: str) -> str | None:
        """The month of the meter's first reading. A meter first read by a store from before
        ``meter_since`` has none: its months count from the one after the newest already
        charged (an upgrade never bills months long past), else from the oldest it has
        consumption in."""
        row = self.db.execute("SELECT period FROM meter_since WHERE meter_id = ?",
                              (meter_id,)).fetchone()
        if row:
            return row[0]
        after = self._after_charged(meter_id)
        return after or self.db.execute(
            "SELECT min(p) FROM (SELECT min(period) AS p FROM period_usage WHERE meter_id = ?1 "
            "UNION ALL SELECT min(period) FROM unbilled WHERE meter_id = ?1)",
            (meter_id,)).fetchone()[0]

    def _after_charged(self, meter_id: str) -> str | None:
        """The month after the newest whose fixed charges were charged (None: none was)."""
        last = self.db.execute("SELECT max(period) FROM standing_charged WHERE meter_id = ?",
                               (meter_id,)).fetchone()[0]
        return tariffs.next_period(last) if last else None

    def _first_uncharged(self, meter_id: str) -> str | None:
        """The month after the newest whose fixed charges were charged, else the first."""
        return self._after_charged(meter_id) or self._since(meter_id)

    def _uncharged(self, meter_id: str, current: str) -> list[str]:
        """Ended months, from the meter's first up to its last reading's, whose fixed and
        capacity charges were not charged."""
        since = self._since(meter_id)
        last_ts = self._state(meter_id).last_ts
        if since is None or last_ts is None:
            return []
        end = min(current, tariffs.next_period(tariffs.period_of(last_ts, self.tz)))
        charged = {p for (p,) in self.db.execute(
            "SELECT period FROM standing_charged WHERE meter_id = ? AND period >= ?",
            (meter_id, since))}
        return [p for p in tariffs.periods_between(since, end) if p not in charged]

    # ------------------------------------------------------------------ settlement

    def settle(self, meter_id: str, now_ms: int, *, ended_periods_only: bool = False
               ) -> list[Settlement]:
        """Settle the meter's unbilled consumption, one ledger entry per month it spans."""
        binding = self.config.binding(meter_id, self.fleet)
        if binding is None:
            return []
        if self.prices is not None:
            self.reprice(meter_id)
        current = tariffs.period_of(now_ms, self.tz)
        done = []
        with self._lock:
            rows = self.db.execute("SELECT start_ms, end_ms, mwh, amount, period, kind, label, "
                                   "price FROM unbilled WHERE meter_id = ? ORDER BY start_ms",
                                   (meter_id,)).fetchall()
            periods: dict[str, list[tuple]] = {}
            for r in rows:
                if not (ended_periods_only and r[4] >= current):
                    periods.setdefault(r[4], []).append(r)
            for period in self._uncharged(meter_id, current):  # nothing unbilled in them
                periods.setdefault(period, [])
            for period, segs in sorted(periods.items()):
                s = self._settle_period(meter_id, binding.account, binding.tariff, period, segs,
                                        now_ms, ended=period < current)
                if s is not None:
                    done.append(s)
            self._uncharged_from.pop(meter_id, None)
        return done

    def _settle_period(self, meter_id: str, account_id: str, tariff_name: str, period: str,
                       segs: list[tuple], now_ms: int, ended: bool) -> Settlement | None:
        if segs:
            first, last = segs[0][0], max(s[1] for s in segs)
            key = f"{meter_id}:{first}:{last}"
        else:  # an ended month with nothing unbilled: its fixed and capacity charges only
            first, last = tariffs.period_bounds(period, self.tz)
            key = f"{meter_id}:fixed:{period}"
        tariff = self.config.tariffs[tariff_name]
        imported = sum(s[2] for s in segs if s[5] == "energy")
        exported = sum(s[2] for s in segs if s[5] == "export")
        amount = sum((Decimal(s[3]) for s in segs), Decimal(0))
        lines = settlement.energy_lines(segs)
        if ended and not self.db.execute("SELECT 1 FROM standing_charged WHERE meter_id = ? "
                                         "AND period = ?", (meter_id, period)).fetchone():
            lines += settlement.fixed_lines(tariff, period)
            peak = self.db.execute("SELECT peak_mwh FROM demand WHERE meter_id = ? AND "
                                   "period = ?", (meter_id, period)).fetchone()
            lines += settlement.demand_lines(tariff, period, peak[0] if peak else 0)
        if not segs and not lines:  # no charge at all: the month is done, no empty entry
            if ended:
                with self.db:
                    self.db.execute("INSERT OR IGNORE INTO standing_charged VALUES (?, ?)",
                                    (meter_id, period))
            return None
        carried = self.db.execute("SELECT amount FROM export_carry WHERE meter_id = ?",
                                  (meter_id,)).fetchone()
        export = tariffs.version_at(tariff, self.tz, first).export
        lines, carry = settlement.apply_export_credit(
            lines, Decimal(carried[0]) if carried else Decimal(0),
            offsets_fixed=export is not None and export.offsets_fixed)
        standing = sum((ln.amount for ln in lines if ln.kind == "fixed"), Decimal(0))
        vat_rate = tariff.vat_rate
        net, vat, minor = settlement.totals(lines, vat_rate, self.config.minor_units)
        entry = {"meter": meter_id, "account": account_id, "tariff": tariff_name,
                 "period": period, "from_ms": first, "to_ms": last,
                 "kwh": f"{Decimal(imported) / Decimal(1_000_000):.6f}",
                 "energy_amount": f"{amount:.6f}", "standing_charge": f"{standing:.2f}",
                 "amount_minor": minor, "currency": self.config.currency,
                 "settled_at_ms": now_ms,
                 "lines": [ln.as_dict() for ln in lines], "net_amount": settlement.dec(net),
                 "vat_rate": str(vat_rate), "vat_amount": settlement.dec(vat),
                 "export_kwh": f"{Decimal(exported) / Decimal(1_000_000):.6f}"}

        def again() -> None:
            if ended:
                self.db.execute("INSERT OR IGNORE INTO standing_charged VALUES (?, ?)",
                                (meter_id, period))
            self.db.execute("DELETE FROM unbilled WHERE meter_id = ? AND start_ms >= ? AND "
                            "end_ms <= ?", (meter_id, first, last))
            self._unbilled.pop(meter_id, None)
            payments.on_settled(self.db, self.config, {**entry, "key": key})

        def also() -> None:
            again()
            if carry or carried:  # the credit carried on, in the same transaction
                self.db.execute("INSERT OR REPLACE INTO export_carry VALUES (?, ?)",
                                (meter_id, str(carry)))

        done = append(self.db, self.config, key, account_id, entry, -minor, also=also,
                      again=again)
        if done is None:
            return None
        self.appended += 1
        return done

    # ------------------------------------------------------------------ reading the ledger

    def entries(self) -> list[tuple[int, dict[str, Any], str]]:
        return [(seq, json.loads(entry), h) for seq, entry, h in self.db.execute(
            "SELECT seq, entry, hash FROM ledger ORDER BY seq")]

    def head(self) -> tuple[int, str | None]:
        """The ledger's entries and head hash as committed, whoever appended them (workers
        sharing the file included)."""
        with self._lock:
            row = self.db.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1"
                                  ).fetchone()
        return (row[0], row[1]) if row else (0, None)

    def balance(self, account_id: str) -> int:
        with self._lock:
            balance, _ = account_row(self.db, self.config, account_id)
        return balance

    def close(self) -> None:
        self._checkpoints.set()
        self.db.close()


def _net(tariff: Tariff, tz: ZoneInfo, imports: list[tuple[int, int, int]],
         exports: list[tuple[int, int, int]]
         ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Import and export intervals as billed: with net metering (the version valid at the
    interval's start), an interval both registers cover is netted — what is left of import
    is imported, a surplus exported; otherwise both as they are."""
    if not exports:
        return imports, exports
    by_span = {(t0, t1): mwh for t0, t1, mwh in exports}
    out_i, out_e = [], []
    for t0, t1, mwh in imports:
        version = tariffs.version_at(tariff, tz, t0)
        x = by_span.get((t0, t1))
        if x is None or version.export is None or version.export.mode != "net":
            out_i.append((t0, t1, mwh))
            continue
        del by_span[(t0, t1)]
        if mwh > x:
            out_i.append((t0, t1, mwh - x))
        elif x > mwh:
            out_e.append((t0, t1, x - mwh))
    out_e += [(t0, t1, mwh) for (t0, t1), mwh in by_span.items()]
    return out_i, out_e


def _unpriced(held: list[tariffs.Segment], spot: SpotPrices | None) -> tuple[str, str]:
    kwh = sum(s.mwh for s in held) / 1_000_000
    start, end = min(s.start_ms for s in held), max(s.end_ms for s in held)
    where = spot.path if spot is not None else "the price file"
    return ("unpriced", f"{kwh:.3f} kWh between {start} and {end} (ms) has no spot price in "
                        f"{where}: held, not guessed, until a price file covers it")


def _migrate(db: sqlite3.Connection) -> None:
    """Billing files from before settlement lines: their unbilled rows are energy."""
    have = {r[1] for r in db.execute("PRAGMA table_info(unbilled)")}
    for column, sql in (("kind", "TEXT NOT NULL DEFAULT 'energy'"),
                        ("label", "TEXT NOT NULL DEFAULT 'Energy'")):
        if column not in have:
            db.execute(f"ALTER TABLE unbilled ADD COLUMN {column} {sql}")


def append(db: sqlite3.Connection, config: BillingConfig, key: str, account_id: str,
           fields: dict[str, Any], delta_minor: int, *, also: Callable[[], None] | None = None,
           again: Callable[[], None] | None = None) -> Settlement | None:
    """Append one ledger entry — a settlement, a payment, a credit note — in one transaction:
    the account's balance moved by ``delta_minor`` (negative: a debit), the entry chained to
    the head with ``seq``, ``key``, ``balance_after_minor`` and ``prev_hash`` added to
    ``fields``. ``also`` runs inside the same transaction (the caller's own tables). A key
    already in the ledger changes nothing (``again`` runs instead, to tidy up) and returns
    None: a replay, a duplicate or a retry after a crash is applied once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT 1 FROM ledger WHERE key = ?", (key,)).fetchone():
            if again is not None:
                again()
            db.execute("COMMIT")
            return None
        balance, low = account_row(db, config, account_id)
        balance += delta_minor
        db.execute("UPDATE accounts SET balance_minor = ? WHERE account_id = ?",
                   (balance, account_id))
        head = db.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        entry = {**fields, "seq": seq, "key": key, "account": account_id,
                 "balance_after_minor": balance, "prev_hash": prev}
        digest = entry_hash(entry)
        db.execute("INSERT INTO ledger VALUES (?, ?, ?, ?)",
                   (seq, key, canonical(entry).decode(), digest))
        if also is not None:
            also()
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return Settlement(entry, digest, balance < low)


def account_row(db: sqlite3.Connection, config: BillingConfig, account_id: str
                ) -> tuple[int, int]:
    """The account's (balance, low-balance threshold) in minor units, opened from the config
    (its opening balance) the first time it is asked for."""
    row = db.execute("SELECT balance_minor, low_balance_minor FROM accounts "
                     "WHERE account_id = ?", (account_id,)).fetchone()
    if row:
        return row
    a = config.account(account_id)
    opening, low = config.minor(a.opening_balance), config.minor(a.low_balance)
    db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?)",
               (account_id, opening, low, config.currency))
    return opening, low


def verify(db_path: str | Path, head: str | None = None) -> tuple[int, str]:
    """Walk the chain; return (entries, head hash) or raise LedgerError naming the first bad one."""
    db = statedb.connect_readonly(db_path)  # reads only: leaves the file as it is
    if db is None:
        raise LedgerError(None, None, f"no ledger at {db_path}")
    try:
        rows = db.execute("SELECT seq, key, entry, hash FROM ledger ORDER BY seq").fetchall()
    finally:
        db.close()
    prev, seen = GENESIS, set()
    for n, (seq, key, text, stored) in enumerate(rows, start=1):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            raise LedgerError(seq, key, "is not valid JSON") from None
        if entry.get("prev_hash") != prev:
            raise LedgerError(seq, key, "does not follow its predecessor (an entry was deleted, "
                              "inserted or moved before it)")
        if entry.get("seq") != seq or seq != n:
            raise LedgerError(seq, key, f"is numbered {entry.get('seq')} at position {n}")
        if entry_hash(entry) != stored:
            raise LedgerError(seq, key, "its content does not match its hash (edited)")
        prev = stored
        seen.add(stored)
    if head is not None and head not in seen:
        raise LedgerError(None, None, f"head {head} is not in the ledger (truncated and "
                          "rewritten since it was recorded?)")
    return len(rows), prev
