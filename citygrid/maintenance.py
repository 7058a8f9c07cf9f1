"""Work orders for the street-lighting crews, and the citizens' reports that open them.

One store, ``maintenance.sqlite`` under ``CITYGRID_DATA_DIR``, shared by the processes that
write it: the rule runner opens and joins orders from its alerts (rules/workorders.py), the
gateway from citizens' reports and operators' transitions (gateway/routes/workorders.py).

An order is for a *target*: one streetlight (``device``) or one control cabinet
(``cabinet``). A trigger (an alert, a report) for a target that has an order not yet done
joins that order; a light's trigger joins its cabinet's order when the light has none of its
own; a trigger after the order is done opens a new one. States go ``open`` → ``assigned`` →
``done`` (or ``open`` → ``done``); ``done`` is final and carries a cause. Every trigger and
transition stays in the order's history, with who and when.

Each order done gets the next ``done_seq``: a reader (the rule runner) asks
:meth:`WorkOrders.done_since` with the last one it saw, a one-index read.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import statistics
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citygrid import statedb
from citygrid.fleet import FleetDevice

FILENAME = "maintenance.sqlite"
STATES = ("open", "assigned", "done")
PROBLEMS = ("lamp_fault", "lamp_power", "day_burning", "cycling", "cabinet_supply_loss",
            "missing_ack", "citizen_report")
CAUSES = ("lamp_replaced", "driver_replaced", "cable_fault", "no_fault_found")
TARGETS = ("device", "cabinet")
_ID = re.compile(r"^WO-(\d{1,12})$")
_REPORT_ID = re.compile(r"^SR-(\d{1,12})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS work_orders (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, target_kind TEXT NOT NULL, target TEXT NOT NULL,
    district TEXT NOT NULL, lat REAL, lon REAL, problem TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'open', assignee TEXT, cause TEXT, note TEXT,
    created_ms INTEGER NOT NULL, assigned_ms INTEGER, done_ms INTEGER, done_seq INTEGER);
CREATE INDEX IF NOT EXISTS work_orders_target ON work_orders (target_kind, target, state);
CREATE UNIQUE INDEX IF NOT EXISTS work_orders_done ON work_orders (done_seq);
CREATE TABLE IF NOT EXISTS work_order_history (
    order_seq INTEGER NOT NULL REFERENCES work_orders (seq), ts_ms INTEGER NOT NULL,
    event TEXT NOT NULL, who TEXT NOT NULL, ref TEXT, problem TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS work_order_history_order ON work_order_history (order_seq);
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, service_code TEXT NOT NULL, description TEXT,
    lat REAL NOT NULL, lon REAL NOT NULL, address TEXT, email TEXT, first_name TEXT,
    last_name TEXT, media_url TEXT, device_id TEXT NOT NULL, order_seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL);
"""
_COLUMNS = ("seq", "target_kind", "target", "district", "lat", "lon", "problem", "state",
            "assignee", "cause", "note", "created_ms", "assigned_ms", "done_ms")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM work_orders"


class WorkOrderError(ValueError):
    """A work-order change that cannot be made; carries the order's id when there is one."""

    def __init__(self, message: str, order_id: str | None = None):
        super().__init__(message)
        self.order_id = order_id


class NoSuchOrder(WorkOrderError):
    """No work order (or report) with that id."""


class InvalidTransition(WorkOrderError):
    """A transition the order's state does not allow (a done order is final)."""

    def __init__(self, message: str, order_id: str, state: str):
        super().__init__(message, order_id)
        self.state = state


def order_id(seq: int) -> str:
    return f"WO-{seq:06d}"


def report_id(seq: int) -> str:
    return f"SR-{seq:06d}"


def _seq(text: str, pattern: re.Pattern[str], what: str) -> int:
    m = pattern.match(text)
    if m is None:
        raise NoSuchOrder(f"no {what} {text!r} (ids look like "
                          f"{'WO-000042' if what == 'work order' else 'SR-000042'})", text)
    return int(m.group(1))


@dataclass(frozen=True)
class Trigger:
    """What opens or joins an order: an alert (``ref`` its key) or a report (its id).

    ``cabinet`` is the light's cabinet (a device target) or the target itself (a cabinet
    target); ``lat``/``lon`` are where a new order is placed."""

    target_kind: str
    target: str
    district: str
    problem: str
    ref: str
    who: str
    lat: float | None = None
    lon: float | None = None
    cabinet: str | None = None


def device_trigger(device: FleetDevice, problem: str, ref: str, who: str, *,
                   lat: float | None = None, lon: float | None = None) -> Trigger:
    """A trigger for one light (at its own position unless ``lat``/``lon`` are given)."""
    return Trigger("device", device.device_id, device.district, problem, ref, who,
                   device.lat if lat is None else lat, device.lon if lon is None else lon,
                   device.cabinet)


def cabinet_trigger(cabinet: str, lights: Iterable[FleetDevice], problem: str, ref: str,
                    who: str) -> Trigger | None:
    """A trigger for a cabinet, placed at its first light (by id); None if no light of
    ``lights`` is fed by it (its district is unknown then)."""
    fed = sorted((d for d in lights if d.cabinet == cabinet), key=lambda d: d.device_id)
    if not fed:
        return None
    first = fed[0]
    return Trigger("cabinet", cabinet, first.district, problem, ref, who, first.lat, first.lon,
                   cabinet)


@dataclass
class HistoryEntry:
    ts_ms: int
    event: str  # opened | joined | assigned | done
    who: str
    ref: str | None = None  # the alert key or report id of an opened/joined
    problem: str | None = None
    detail: str | None = None


@dataclass
class WorkOrder:
    id: str
    target_kind: str
    target: str
    district: str
    lat: float | None
    lon: float | None
    problem: str
    state: str
    assignee: str | None
    cause: str | None
    note: str | None
    created_ms: int
    assigned_ms: int | None
    done_ms: int | None
    history: list[HistoryEntry] = field(default_factory=list)

    @property
    def repair_h(self) -> float | None:
        """Hours from opened to done (None while not done)."""
        return None if self.done_ms is None else (self.done_ms - self.created_ms) / 3_600_000

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("id", "target_kind", "target", "district", "lat",
                                           "lon", "problem", "state", "assignee", "cause",
                                           "note", "created_ms", "assigned_ms", "done_ms")}
        d["repair_h"] = self.repair_h
        d["history"] = [vars(h).copy() for h in self.history]
        return d


@dataclass(frozen=True)
class Report:
    """A citizen's report (Open311 service request) and the order it opened or joined."""

    id: str
    service_code: str
    description: str | None
    lat: float
    lon: float
    address: str | None
    media_url: str | None
    device_id: str
    order_id: str
    ts_ms: int


@dataclass(frozen=True)
class DistrictStats:
    district: str
    open: int
    assigned: int
    done: int
    median_repair_h: float | None
    mean_repair_h: float | None


class WorkOrders:
    """The store in ``data_dir/maintenance.sqlite`` (created if missing)."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / FILENAME
        self.db = statedb.connect(self.path)
        self.db.executescript(_SCHEMA)
        # One connection, shared by the gateway's worker threads: one transaction at a time.
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; IMMEDIATE: two processes' triggers for one light never open
        two orders."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ opening and joining

    def open_or_join(self, trigger: Trigger, now_ms: int) -> tuple[WorkOrder, bool]:
        """The order ``trigger`` belongs to, and whether it is new: the target's order not yet
        done, else (a light) its cabinet's, else a new one."""
        with self._write():
            seq, new = self._open_or_join(trigger, now_ms)
        return self.get(order_id(seq)), new  # type: ignore[return-value]

    def _open_or_join(self, trigger: Trigger, now_ms: int) -> tuple[int, bool]:
        if trigger.target_kind not in TARGETS:
            raise WorkOrderError(f"target_kind must be one of {', '.join(TARGETS)}, "
                                 f"not {trigger.target_kind!r}")
        if trigger.problem not in PROBLEMS:
            raise WorkOrderError(f"problem must be one of {', '.join(PROBLEMS)}, "
                                 f"not {trigger.problem!r}")
        db = self.db
        seq = self._pending(trigger.target_kind, trigger.target)
        if seq is None and trigger.target_kind == "device" and trigger.cabinet:
            seq = self._pending("cabinet", trigger.cabinet)
        new = seq is None
        if new:
            seq = db.execute(
                "INSERT INTO work_orders (target_kind, target, district, lat, lon, problem, "
                "created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (trigger.target_kind, trigger.target, trigger.district, trigger.lat,
                 trigger.lon, trigger.problem, now_ms)).lastrowid
        # A light's trigger names the light: it finds the cabinet's order it joined.
        detail = trigger.target if trigger.target_kind == "device" else None
        db.execute("INSERT INTO work_order_history VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (seq, now_ms, "opened" if new else "joined", trigger.who, trigger.ref,
                    trigger.problem, detail))
        return seq, new  # type: ignore[return-value]

    def _pending(self, target_kind: str, target: str) -> int | None:
        row = self.db.execute("SELECT seq FROM work_orders WHERE target_kind = ? AND target = ? "
                              "AND state != 'done' ORDER BY seq LIMIT 1",
                              (target_kind, target)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ transitions

    def assign(self, id_: str, assignee: str, who: str, now_ms: int) -> WorkOrder:
        """Give an open order to a crew (an assigned one to another crew)."""
        if not assignee.strip():
            raise WorkOrderError("assignee must not be empty", id_)
        return self._transition(id_, "assigned", who, now_ms, assignee=assignee,
                                detail=f"assigned to {assignee}")

    def done(self, id_: str, cause: str, who: str, now_ms: int,
             note: str | None = None) -> WorkOrder:
        """Close an open or assigned order with its cause; done is final."""
        if cause not in CAUSES:
            raise WorkOrderError(f"cause must be one of {', '.join(CAUSES)}, not {cause!r}", id_)
        return self._transition(id_, "done", who, now_ms, cause=cause, note=note,
                                detail=cause + (f": {note}" if note else ""))

    def _transition(self, id_: str, state: str, who: str, now_ms: int, *, detail: str,
                    **changes: Any) -> WorkOrder:
        seq = _seq(id_, _ID, "work order")
        with self._write() as db:
            row = db.execute("SELECT state FROM work_orders WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                raise NoSuchOrder(f"no work order {id_!r}", id_)
            if row[0] == "done":
                raise InvalidTransition(f"{id_} is done (done is final): it cannot be "
                                        f"{state} again", id_, row[0])
            changes["state"] = state
            changes[f"{state}_ms"] = now_ms
            if state == "done":
                changes["done_seq"] = db.execute(
                    "SELECT coalesce(max(done_seq), 0) + 1 FROM work_orders").fetchone()[0]
            db.execute("UPDATE work_orders SET " + ", ".join(f"{k} = ?" for k in changes)
                       + " WHERE seq = ?", (*changes.values(), seq))
            db.execute("INSERT INTO work_order_history VALUES (?, ?, ?, ?, NULL, NULL, ?)",
                       (seq, now_ms, state, who, detail))
        return self.get(id_)  # type: ignore[return-value]

    # ------------------------------------------------------------------ reading

    def get(self, id_: str) -> WorkOrder | None:
        """One order with its history, or None."""
        try:
            seq = _seq(id_, _ID, "work order")
        except NoSuchOrder:
            return None
        with self._lock:
            row = self.db.execute(_SELECT + " WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return None
            order = _order(row)
            order.history = [HistoryEntry(*r) for r in self.db.execute(
                "SELECT ts_ms, event, who, ref, problem, detail FROM work_order_history "
                "WHERE order_seq = ? ORDER BY rowid", (seq,))]
        return order

    def list(self, *, state: Iterable[str] | None = None, district: str | None = None,
             device: str | None = None, limit: int | None = None) -> list[WorkOrder]:
        """Orders newest first (without their history), optionally filtered: by states, a
        district, a light (its own orders and the ones it joined, its cabinet's included)."""
        sql, args = _SELECT + " WHERE 1=1", []
        states = list(state or ())
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += states
        if district:
            sql += " AND district = ?"
            args.append(district)
        if device:
            sql += (" AND ((target_kind = 'device' AND target = ?) OR seq IN (SELECT order_seq "
                    "FROM work_order_history WHERE detail = ? AND event = 'joined'))")
            args += [device, device]
        sql += " ORDER BY seq DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            return [_order(r) for r in self.db.execute(sql, args)]

    def last_done_seq(self) -> int:
        return self.db.execute("SELECT coalesce(max(done_seq), 0) FROM work_orders").fetchone()[0]

    def done_since(self, after_seq: int) -> list[tuple[int, WorkOrder]]:
        """(done_seq, order) of the orders done after ``after_seq``, in the order they were
        done."""
        with self._lock:
            rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)}, done_seq FROM work_orders "
                                   "WHERE done_seq > ? ORDER BY done_seq",
                                   (after_seq,)).fetchall()
        return [(r[-1], _order(r[:-1])) for r in rows]

    def counts(self, now_ms: int, window_ms: int = 86_400_000) -> dict[str, dict[str, int]]:
        """Per district: orders open, assigned, and done within ``window_ms`` before now."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            rows = self.db.execute(
                "SELECT district, sum(state = 'open'), sum(state = 'assigned'), "
                "sum(state = 'done' AND done_ms > ? AND done_ms <= ?) FROM work_orders "
                "GROUP BY district", (now_ms - window_ms, now_ms)).fetchall()
        for district, open_, assigned, done in rows:
            out[district] = {"open": open_, "assigned": assigned, "done_24h": done}
        return out

    def stats(self, district: str | None = None) -> list[DistrictStats]:
        """Per district (by name): orders open, assigned and done, and the median and mean
        hours from opened to done."""
        rows: dict[str, dict[str, Any]] = {}
        sql = "SELECT district, state, created_ms, done_ms FROM work_orders"
        args: tuple = ()
        if district:
            sql, args = sql + " WHERE district = ?", (district,)
        with self._lock:
            found = self.db.execute(sql, args).fetchall()
        for d, state, created, done in found:
            r = rows.setdefault(d, {"open": 0, "assigned": 0, "done": 0, "hours": []})
            r[state] += 1
            if state == "done":
                r["hours"].append((done - created) / 3_600_000)
        return [DistrictStats(d, r["open"], r["assigned"], r["done"],
                              statistics.median(r["hours"]) if r["hours"] else None,
                              statistics.fmean(r["hours"]) if r["hours"] else None)
                for d, r in sorted(rows.items())]

    # ------------------------------------------------------------------ citizens' reports

    def report(self, trigger_for: Callable[[str], Trigger], *, service_code: str,
               lat: float, lon: float, device_id: str, now_ms: int, description: str | None = None,
               address: str | None = None, email: str | None = None,
               first_name: str | None = None, last_name: str | None = None,
               media_url: str | None = None) -> tuple[Report, WorkOrder, bool]:
        """Record a report matched to ``device_id``; ``trigger_for(report_id)`` gives the
        trigger that opens or joins its light's order. Returns the report, its order, and
        whether the order is new."""
        with self._write() as db:
            seq = db.execute(
                "INSERT INTO reports (service_code, description, lat, lon, address, email, "
                "first_name, last_name, media_url, device_id, order_seq, ts_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (service_code, description, lat, lon, address, email, first_name, last_name,
                 media_url, device_id, now_ms)).lastrowid
            rid = report_id(seq)
            order_seq, new = self._open_or_join(trigger_for(rid), now_ms)
            db.execute("UPDATE reports SET order_seq = ? WHERE seq = ?", (order_seq, seq))
        order = self.get(order_id(order_seq))
        return self.get_report(rid), order, new  # type: ignore[return-value]

    def get_report(self, id_: str) -> Report | None:
        try:
            seq = _seq(id_, _REPORT_ID, "report")
        except NoSuchOrder:
            return None
        row = self.db.execute("SELECT seq, service_code, description, lat, lon, address, "
                              "media_url, device_id, order_seq, ts_ms FROM reports "
                              "WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return None
        return Report(report_id(row[0]), *row[1:8], order_id(row[8]), row[9])

    def close(self) -> None:
        self.db.close()


def _order(row: tuple) -> WorkOrder:
    values = dict(zip(_COLUMNS, row, strict=True))
    return WorkOrder(id=order_id(values.pop("seq")), **values)


__all__ = ["CAUSES", "FILENAME", "PROBLEMS", "STATES", "TARGETS", "DistrictStats",
           "HistoryEntry", "InvalidTransition", "NoSuchOrder", "Report", "Trigger", "WorkOrder",
           "WorkOrderError", "WorkOrders", "cabinet_trigger", "device_trigger", "order_id",
           "report_id"]
