"""Rule state in the state database: holds, `for:` timers, alerts, lights and the lamp
monitor's counters (burning hours, switch-ons) survive restarts.

Only what changed since the last save is written: the engine's snapshot() hands out just that,
as plain data, and its restore() takes it back.

Several workers (``rules run --workers N``) share one ``rules.sqlite``: its rows are keyed by
device, rule instance (rule, source) or alert (rule@device, rule@district), each worker writes
and restores only the rows of what it owns (``foreign`` says what it does not), SQLite's WAL
and busy timeout serialise their commits. What every worker has — a rule's health — is kept per
worker in ``rule_health_workers`` and summed into ``rule_health`` on every save, so its readers
see the whole city.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from citygrid import statedb
from rules.engine import RuleEngine
from rules.snapshot import SavedAlert, SavedInstance, SavedLamp, SavedLight, Snapshot

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rule_lights (
    device_id TEXT PRIMARY KEY, level REAL, reason TEXT, wishes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rule_instances (
    rule_id TEXT NOT NULL, source TEXT NOT NULL, fingerprint TEXT NOT NULL,
    active INTEGER NOT NULL, pending_since INTEGER, PRIMARY KEY (rule_id, source));
CREATE TABLE IF NOT EXISTS rule_alerts (
    key TEXT PRIMARY KEY, rule_id TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
    scope TEXT NOT NULL, since_ms INTEGER NOT NULL, sources TEXT NOT NULL,
    active INTEGER NOT NULL, cleared_ms INTEGER);
CREATE TABLE IF NOT EXISTS rule_lamps (
    device_id TEXT PRIMARY KEY, lamp_type TEXT NOT NULL, rated_life_h REAL NOT NULL,
    burning_ms INTEGER NOT NULL, switch_ons INTEGER NOT NULL, replaced_ms INTEGER);
CREATE TABLE IF NOT EXISTS rule_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rule_health (
    rule_id TEXT PRIMARY KEY, evaluations INTEGER, fired INTEGER, last_fired_ms INTEGER,
    errors INTEGER, last_error TEXT);
CREATE TABLE IF NOT EXISTS rule_health_workers (
    worker TEXT NOT NULL, rule_id TEXT NOT NULL, evaluations INTEGER, fired INTEGER,
    last_fired_ms INTEGER, errors INTEGER, last_error TEXT, PRIMARY KEY (worker, rule_id));
"""
# rule_health as the sum over the workers' rows (the last error: of the worker with most).
_SUM_HEALTH = """
INSERT OR REPLACE INTO rule_health
SELECT rule_id, sum(evaluations), sum(fired), max(last_fired_ms), sum(errors),
       (SELECT o.last_error FROM rule_health_workers o WHERE o.rule_id = w.rule_id
        AND o.last_error IS NOT NULL ORDER BY o.errors DESC LIMIT 1)
FROM rule_health_workers w GROUP BY rule_id
"""


def _json(value: Any) -> str:
    """A saved column's JSON text (orjson: the saves run five times a second; json.loads
    reads it back)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


class RuleStateStore:
    """Saves in a writer thread: the engine only snapshots what changed (a few ms at most),
    and the SQLite commit never holds up reading→command latency."""

    def __init__(self, path: str | Path, *, worker: str | None = None,
                 foreign: Callable[[str], bool] | None = None):
        """``worker``: this worker's name among several sharing the file (None: the only
        one); ``foreign(name)``: True for a device id or district another worker owns — its
        rows are neither written nor restored here."""
        self.path = Path(path)
        self.worker, self.foreign = worker, foreign
        self.db = statedb.connect(self.path)
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
        self.db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write, name="rules-state", daemon=True)
        self._writer.start()

    def save(self, engine: RuleEngine) -> None:
        """Snapshot what changed since the last save and queue it for the writer."""
        snap = engine.snapshot()
        if self.foreign is not None:
            _drop_foreign(snap, self.foreign)
        ops: list[tuple[str, tuple]] = []
        for device_id, light in snap.lights.items():
            if light is None:
                ops.append(("DELETE FROM rule_lights WHERE device_id = ?", (device_id,)))
            else:
                ops.append(("INSERT OR REPLACE INTO rule_lights VALUES (?, ?, ?, ?)",
                            (device_id, light.level, light.reason, _json(light.wishes))))
        for key, inst in snap.instances.items():
            if inst is None:
                ops.append(("DELETE FROM rule_instances WHERE rule_id = ? AND source = ?", key))
            else:
                ops.append(("INSERT OR REPLACE INTO rule_instances VALUES (?, ?, ?, ?, ?)",
                            (*key, inst.fingerprint, int(inst.active), inst.pending_since)))
        for key, a in snap.alerts.items():
            ops.append(("INSERT OR REPLACE INTO rule_alerts VALUES (?,?,?,?,?,?,?,?,?)",
                        (key, a.rule_id, a.severity, a.message, a.scope, a.since_ms,
                         _json(a.sources), int(a.active), a.cleared_ms)))
        for device_id, lamp in snap.lamps.items():
            ops.append(("INSERT OR REPLACE INTO rule_lamps VALUES (?, ?, ?, ?, ?, ?)",
                        (device_id, *lamp)))
        if snap.watermark is not None:
            ops.append(("INSERT OR REPLACE INTO rule_meta VALUES ('watermark', ?)",
                        (str(snap.watermark),)))
        self._queue.put(ops)

    def _write(self) -> None:
        while True:
            ops = self._queue.get()
            if ops is None:
                self._queue.task_done()
                return
            by_sql: dict[str, list[tuple]] = {}
            for sql, params in ops:  # in order per statement; rows are keyed, so order across
                by_sql.setdefault(sql, []).append(params)  # statements does not matter
            with self._lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in by_sql.items():
                        self.db.executemany(sql, rows)  # one C loop: the GIL stays free
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                finally:
                    self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything saved so far is on disk."""
        self._queue.join()

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    def save_health(self, engine: RuleEngine) -> None:
        rows = [(rid, h.evaluations, h.fired, h.last_fired_ms, h.errors, h.last_error)
                for rid, h in engine.health.items()]
        if self.worker is None:
            with self._lock, self.db:
                self.db.executemany(
                    "INSERT OR REPLACE INTO rule_health VALUES (?, ?, ?, ?, ?, ?)", rows)
            return
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(
                    "INSERT OR REPLACE INTO rule_health_workers VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(self.worker, *r) for r in rows])
                self.db.execute(_SUM_HEALTH)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def forget_workers(self) -> None:
        """A new set of workers starts: the counts of the last set go (counts are since a
        worker started, as a single engine's are since it started)."""
        with self._lock:
            self.db.execute("DELETE FROM rule_health_workers")

    def restore(self, engine: RuleEngine) -> None:
        """Put the saved state into a fresh engine (which drops the state of rules whose text
        changed); a worker takes only what it owns."""
        with self._lock:
            saved = _saved(self.db)
        if self.foreign is not None:
            # A border device's instance of a rule crossing into this worker's district is
            # saved by the device's owner, and taken here too (the engine keeps those).
            _drop_foreign(saved, self.foreign, instances=False)
        engine.restore(saved)

    def meta(self, key: str) -> str | None:
        rows = self.execute("SELECT value FROM rule_meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self.execute("INSERT OR REPLACE INTO rule_meta VALUES (?, ?)", (key, value))

    def health(self) -> list[tuple]:
        return self.execute("SELECT * FROM rule_health ORDER BY rule_id")

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(30)
        self.db.close()


def _drop_foreign(snap: Snapshot, foreign: Callable[[str], bool], *,
                  instances: bool = True) -> None:
    """Leave out what another worker owns: its lights, the instances its devices are the
    source of, the alerts of its devices and districts (``rule@device``, ``rule@district``)."""
    for device_id in [d for d in snap.lights if foreign(d)]:
        del snap.lights[device_id]
    for key in [k for k in snap.instances if instances and foreign(k[1])]:
        del snap.instances[key]
    for key in [k for k in snap.alerts if foreign(k.rpartition("@")[2])]:
        del snap.alerts[key]
    for device_id in [d for d in snap.lamps if foreign(d)]:
        del snap.lamps[device_id]


def _saved(db: sqlite3.Connection) -> Snapshot:
    """Everything `rules run` saved, as the engine's plain data."""
    saved = Snapshot()
    for device_id, level, reason, wishes in db.execute("SELECT * FROM rule_lights"):
        saved.lights[device_id] = SavedLight(level, reason, json.loads(wishes))
    for rule_id, source, fp, active, pending in db.execute("SELECT * FROM rule_instances"):
        saved.instances[(rule_id, source)] = SavedInstance(fp, bool(active), pending)
    for row in db.execute("SELECT * FROM rule_alerts"):
        key, rule_id, severity, message, scope, since, sources, active, cleared = row
        saved.alerts[key] = SavedAlert(rule_id, severity, message, scope, since,
                                       json.loads(sources), bool(active), cleared)
    row = db.execute("SELECT value FROM rule_meta WHERE key = 'watermark'").fetchone()
    if row:
        saved.watermark = int(row[0])
    try:
        for device_id, *lamp in db.execute("SELECT * FROM rule_lamps"):
            saved.lamps[device_id] = SavedLamp(*lamp)
    except sqlite3.OperationalError as e:
        if "no such table" not in str(e):  # a state file from before the lamp monitor
            raise
    return saved


class _NoOutbox:
    """For a read-only engine: it explains, it never acts."""

    def command(self, *args: Any) -> None: ...

    def publish(self, *args: Any) -> None: ...

    def alert(self, *args: Any) -> None: ...

    def points(self, *args: Any) -> None: ...


def engine_from_state(ruleset: Any, fleet: Any, city: Any, path: str | Path) -> RuleEngine:
    """A read-only engine holding the state `rules run` saved at ``path`` (if any): for
    `rules explain` and the gateway's explain route."""
    engine = RuleEngine(ruleset, fleet, city, _NoOutbox(), track_acks=False)
    db = statedb.connect_readonly(path)  # a reader: it never creates or writes the file
    if db is not None:
        try:
            engine.restore(_saved(db))
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):  # created, never saved into: no state yet
                raise
        finally:
            db.close()
    return engine


# --------------------------------------------------------------------------- read functions
# For other services (the gateway, `citygrid up`): what `rules run` saved, read over a
# read-only connection; an absent database or table reads as empty (the engine has not run).

FILENAME = "rules.sqlite"


RUNNING_META = "running:"  # + a client id: when that engine was subscribed (epoch s)


def read_running(data_dir: str | Path) -> dict[str, float]:
    """When each rule engine (by MQTT client id) last came up subscribed, epoch seconds."""
    return {key.removeprefix(RUNNING_META): float(value) for key, value in _read(
        data_dir, "SELECT key, value FROM rule_meta WHERE key LIKE ?", (RUNNING_META + "%",))}


def _read(data_dir: str | Path, sql: str, params: tuple = ()) -> list[tuple]:
    return statedb.read_rows(Path(data_dir) / FILENAME, sql, params)


@dataclass(frozen=True)
class RuleHealthRow:
    rule_id: str
    evaluations: int
    fired: int
    last_fired_ms: int | None
    errors: int
    last_error: str | None


@dataclass(frozen=True)
class AlertRow:
    key: str
    rule_id: str
    severity: str
    message: str
    scope: str
    since_ms: int
    active: bool
    cleared_ms: int | None


@dataclass(frozen=True)
class LampRow:
    device_id: str
    lamp_type: str
    burning_h: float
    switch_ons: int
    remaining_life_h: float  # the lamp type's rated life less its burning hours (may be < 0)
    replaced_ms: int | None


@dataclass(frozen=True)
class LightRow:
    device_id: str
    level: float
    reason: str | None


def read_health(data_dir: str | Path) -> dict[str, RuleHealthRow]:
    """Each rule's evaluations, firings and errors, by rule id."""
    return {r[0]: RuleHealthRow(*r) for r in _read(
        data_dir, "SELECT rule_id, evaluations, fired, last_fired_ms, errors, last_error "
        "FROM rule_health")}


def read_reload_error(data_dir: str | Path) -> str | None:
    """Why the last reload of the rule files was refused, if it was."""
    rows = _read(data_dir, "SELECT value FROM rule_meta WHERE key = 'reload_error'")
    return rows[0][0] if rows else None


def read_alerts(data_dir: str | Path, *, active: bool | None = None, limit: int = 100,
                key: str | None = None) -> list[AlertRow]:
    """Alerts, newest first; only active (or cleared) ones if asked; filtered in SQL."""
    rows = _read(
        data_dir, "SELECT key, rule_id, severity, message, scope, since_ms, active, cleared_ms "
        "FROM rule_alerts WHERE (?1 IS NULL OR active = ?1) AND (?2 IS NULL OR key = ?2) "
        "ORDER BY since_ms DESC LIMIT ?3",
        (None if active is None else int(active), key, limit))
    return [AlertRow(k, r, sev, m, sc, since, bool(a), c) for k, r, sev, m, sc, since, a, c
            in rows]


def read_lights(data_dir: str | Path) -> list[LightRow]:
    """Each light's commanded level and the reason that won, as last saved."""
    return [LightRow(*r) for r in _read(
        data_dir, "SELECT device_id, level, reason FROM rule_lights WHERE level IS NOT NULL")]


def read_lamps(data_dir: str | Path) -> list[LampRow]:
    """Each light's lamp as the lamp monitor last saved it: its type, burning hours,
    switch-ons and the life that remains, most burnt first."""
    return [LampRow(d, t, burning / 3_600_000, n, life - burning / 3_600_000, replaced)
            for d, t, life, burning, n, replaced in _read(
                data_dir, "SELECT device_id, lamp_type, rated_life_h, burning_ms, switch_ons, "
                "replaced_ms FROM rule_lamps ORDER BY burning_ms DESC, device_id")]
