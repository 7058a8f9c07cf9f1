"""The embedded store: SQLite in the data directory, so CityGrid runs with nothing installed.

Same identity rule as InfluxDB: measurement + tags + timestamp; a rewrite merges
its fields into the stored point.

Schema (``PRAGMA user_version`` 2): a measurement and a series (its tags) are numbered once,
in ``measurements`` and ``series``; a point is ``(mid, ts, sid, fields)`` in ``points``,
clustered by measurement and time, so a batch of new readings lands on the few pages at the
end of the table instead of one page per series; ``series_last`` holds each series' newest
timestamp, for ``latest()``. Data dirs of the first schema (version 0: one row per point with
its measurement, series string and tags) are migrated when opened.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

from citygrid import statedb
from citygrid.store.base import (
    Bucket,
    Point,
    StoreUnavailable,
    check_aggregate,
    latest_key,
    series_id,
)
from citygrid.store.lifecycle import HOUR_MS, MEASUREMENTS, Lifecycle

VERSION = 2
_TABLES = """
CREATE TABLE IF NOT EXISTS measurements (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS series (
    id          INTEGER PRIMARY KEY,
    mid         INTEGER NOT NULL,
    series      TEXT NOT NULL,   -- series_id(tags): k=v,… sorted, empty values left out
    device_id   TEXT,
    district    TEXT,
    tags        TEXT NOT NULL,   -- as first written
    UNIQUE (mid, series)
);
CREATE TABLE IF NOT EXISTS points (
    mid         INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    sid         INTEGER NOT NULL,
    fields      TEXT NOT NULL,
    PRIMARY KEY (mid, ts, sid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS series_last (
    sid         INTEGER PRIMARY KEY,
    ts          INTEGER NOT NULL  -- the newest ts of the series' points
);
CREATE TABLE IF NOT EXISTS points_1h (
    measurement TEXT NOT NULL,
    series      TEXT NOT NULL,
    hour        INTEGER NOT NULL,
    device_id   TEXT,
    district    TEXT,
    stats       TEXT NOT NULL,   -- {field: {sum, count, min, max, last}} of numeric fields
    PRIMARY KEY (measurement, series, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_1h_by_time ON points_1h (measurement, hour);
CREATE TABLE IF NOT EXISTS lifecycle (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Version 0 → 2: the points move into the numbered tables; points_1h and lifecycle stay.
_MIGRATE_FROM_0 = """
ALTER TABLE points RENAME TO points_v0;
DROP INDEX IF EXISTS points_by_time;
{tables}
INSERT INTO measurements (name) SELECT DISTINCT measurement FROM points_v0 ORDER BY 1;
INSERT INTO series (mid, series, device_id, district, tags)
    SELECT m.id, p.series, p.device_id, p.district, p.tags
    FROM (SELECT measurement, series, device_id, district, min(tags) AS tags
          FROM points_v0 GROUP BY measurement, series) AS p
    JOIN measurements AS m ON m.name = p.measurement ORDER BY m.id, p.series;
INSERT INTO points (mid, ts, sid, fields)
    SELECT s.mid, p.ts, s.id, p.fields FROM points_v0 AS p
    JOIN measurements AS m ON m.name = p.measurement
    JOIN series AS s ON s.mid = m.id AND s.series = p.series ORDER BY s.mid, p.ts, s.id;
INSERT INTO series_last (sid, ts)
    SELECT s.id, max(p.ts) FROM points_v0 AS p
    JOIN measurements AS m ON m.name = p.measurement
    JOIN series AS s ON s.mid = m.id AND s.series = p.series GROUP BY s.id;
DROP TABLE points_v0;
"""
_INSERT = ("INSERT INTO points (mid, sid, ts, fields) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (mid, ts, sid) DO UPDATE SET fields = json_patch(fields, excluded.fields)")
_LAST = ("INSERT INTO series_last (sid, ts) VALUES (?, ?) "
         "ON CONFLICT (sid) DO UPDATE SET ts = excluded.ts WHERE excluded.ts > ts")
_ROLLUP_SQL = {"mean": "sum(json_extract(stats, ?1 || '.sum')) / "
                       "sum(json_extract(stats, ?1 || '.count'))",
               "min": "min(json_extract(stats, ?1 || '.min'))",
               "max": "max(json_extract(stats, ?1 || '.max'))",
               "sum": "sum(json_extract(stats, ?1 || '.sum'))",
               "count": "sum(json_extract(stats, ?1 || '.count'))"}

_SQL_AGG = {"mean": "avg", "min": "min", "max": "max", "sum": "sum", "count": "count"}
_CACHE_MAX = 1_000_000  # series remembered by key; past it the cache starts over


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _rollback(db: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not already (a failed COMMIT may have)."""
    if db.in_transaction:
        db.execute("ROLLBACK")


class SqliteStore:
    def __init__(self, path: str | Path, lifecycle: Lifecycle | None = None):
        self.lifecycle = lifecycle
        self.path = Path(path)
        self._lock = threading.Lock()
        # Series key (Point.key, or (measurement, series_id)) → (mid, sid), and measurement
        # name → mid: numbers never change once committed, so any process may remember them.
        self._series: dict[object, tuple[int, int]] = {}
        self._mids: dict[str, int] = {}
        self._db = statedb.connect(self.path)
        try:
            self._db.execute("PRAGMA cache_size=-16000")  # 16 MB: the hot end of the tables
            self._ensure_schema()  # a reader of a fresh data dir finds it empty, not broken
        except sqlite3.OperationalError as e:
            self._db.close()
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def ensure_ready(self) -> None:
        with self._lock:
            try:
                self._ensure_schema()
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e

    def _ensure_schema(self) -> None:
        db = self._db
        if db.execute("PRAGMA user_version").fetchone()[0] == VERSION:
            return
        db.execute("BEGIN IMMEDIATE")  # one process creates or migrates; the others wait
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > VERSION:
                raise sqlite3.OperationalError(
                    f"schema version {version} is newer than this CityGrid's ({VERSION})")
            if version < VERSION:
                old = {r[1] for r in db.execute("PRAGMA table_info(points)")}
                script = _MIGRATE_FROM_0.format(tables=_TABLES) if "series" in old else _TABLES
                for statement in _statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {VERSION}")
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    # ------------------------------------------------------------------ numbering

    def _mid(self, measurement: str, create: bool = False) -> int | None:
        """The measurement's number (under the lock; ``create``: in a write transaction)."""
        mid = self._mids.get(measurement)
        if mid is None:
            row = self._db.execute("SELECT id FROM measurements WHERE name = ?",
                                   (measurement,)).fetchone()
            if row is None:
                if not create:
                    return None
                row = (self._db.execute("INSERT INTO measurements (name) VALUES (?)",
                                        (measurement,)).lastrowid,)
            mid = row[0]
        return mid

    def _number(self, points: Sequence[Point], misses: list[int], rows: list[tuple]
                ) -> tuple[dict[object, tuple[int, int]], dict[str, int]]:
        """Number the series of ``points[i]`` for i in ``misses`` (in the write transaction)
        and fill in their rows; returns the numbers to remember once committed."""
        db = self._db
        new: dict[object, tuple[int, int]] = {}
        mids: dict[str, int] = {}
        for i in misses:
            m, tags, fields, ts, key = points[i]
            series = series_id(tags)
            ids = new.get(key) or new.get((m, series)) or self._series.get((m, series))
            if ids is None:
                mid = mids.get(m)
                if mid is None:
                    mid = mids[m] = self._mid(m, create=True)
                row = db.execute("SELECT id FROM series WHERE mid = ? AND series = ?",
                                 (mid, series)).fetchone()
                if row is None:
                    row = (db.execute(
                        "INSERT INTO series (mid, series, device_id, district, tags) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (mid, series, tags.get("device_id"), tags.get("district"),
                         orjson.dumps(tags).decode())).lastrowid,)
                ids = (mid, row[0])
            new[(m, series)] = ids
            if key is not None:
                new[key] = ids
            rows[i] = (*ids, ts, orjson.dumps(fields).decode())
        return new, mids

    # ------------------------------------------------------------------ writing

    def write(self, points: Sequence[Point]) -> None:
        if not points:
            return
        known = self._series
        get = known.get
        dumps = orjson.dumps
        rows: list[tuple] = []
        misses: list[int] = []
        for i, (m, tags, fields, ts, key) in enumerate(points):
            ids = get(key) if key is not None else get((m, series_id(tags)))
            if ids is None:
                misses.append(i)
                rows.append(())
            else:
                rows.append((*ids, ts, dumps(fields).decode()))
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                try:
                    new, mids = self._number(points, misses, rows) if misses else ({}, {})
                    db.executemany(_INSERT, rows)
                    last: dict[int, int] = {}
                    for _, sid, ts, _ in rows:
                        if ts > last.get(sid, ts - 1):
                            last[sid] = ts
                    db.executemany(_LAST, last.items())
                    db.execute("COMMIT")
                except BaseException:
                    _rollback(db)
                    raise
                if new:  # numbers are only worth remembering once committed
                    if len(known) + len(new) > _CACHE_MAX:
                        known.clear()
                    known.update(new)
                    self._mids.update(mids)
        except sqlite3.OperationalError as e:  # locked, disk full: the caller spools
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e

    # ------------------------------------------------------------------ reading

    def _query(self, sql: str, args: Sequence[object]) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:  # locked, damaged: the caller gets a store error
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e

    def _measurement(self, measurement: str) -> int | None:
        try:
            with self._lock:
                mid = self._mid(measurement)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e
        if mid is not None:
            self._mids[measurement] = mid
        return mid

    @staticmethod
    def _where(mid: int, start_ms: int | None, end_ms: int | None, district: str | None,
               device_id: str | None) -> tuple[str, list[object]]:
        """The points of one measurement (``p``), in a time range, of the series filtered."""
        sql, args = ["p.mid = ?"], [mid]
        if start_ms is not None:
            sql.append("p.ts >= ?")
            args.append(start_ms)
        if end_ms is not None:
            sql.append("p.ts < ?")
            args.append(end_ms)
        of = [(c, v) for c, v in (("district", district), ("device_id", device_id)) if v]
        if of:
            sql.append("p.sid IN (SELECT id FROM series WHERE mid = ? AND "
                       + " AND ".join(f"{c} = ?" for c, _ in of) + ")")
            args += [mid, *(v for _, v in of)]
        return " WHERE " + " AND ".join(sql), args

    def latest(self, measurement: str, *, district: str | None = None,
               device_id: str | None = None) -> dict[str, Point]:
        mid = self._measurement(measurement)
        if mid is None:
            return {}
        sql, args = ["s.mid = ?"], [mid]
        for column, value in (("district", district), ("device_id", device_id)):
            if value:
                sql.append(f"s.{column} = ?")
                args.append(value)
        rows = self._query(
            "SELECT s.tags, l.ts, p.fields FROM series AS s "
            "JOIN series_last AS l ON l.sid = s.id "
            "JOIN points AS p ON p.mid = s.mid AND p.ts = l.ts AND p.sid = s.id "
            f"WHERE {' AND '.join(sql)} ORDER BY s.series", args)
        out = {}
        for tags, ts, fields in rows:
            tags = orjson.loads(tags)
            out[latest_key(tags)] = Point(measurement, tags, orjson.loads(fields), ts)
        return out

    def aggregate(self, measurement: str, field: str, fn: str, *, start_ms: int, end_ms: int,
                  every_ms: int, district: str | None = None,
                  device_id: str | None = None) -> list[Bucket]:
        check_aggregate(fn)
        lc = self.lifecycle
        if lc is not None and end_ms - start_ms > lc.horizon_hours * HOUR_MS \
                and measurement in MEASUREMENTS:
            return self._aggregate_rollup(measurement, field, fn, start_ms, end_ms, every_ms,
                                          district, device_id)
        mid = self._measurement(measurement)
        if mid is None:
            return []
        where, args = self._where(mid, start_ms, end_ms, district, device_id)
        value = "json_extract(p.fields, ?)"
        path = "$." + '"' + field.replace('"', '""') + '"'
        if fn == "last":
            # The value at the bucket's newest ts; of several series then, the first by
            # series name (as the first schema's scan order gave it).
            at, at_args = self._where(mid, None, None, district, device_id)
            sql = (f"SELECT m.b, (SELECT {value} FROM points AS p JOIN series AS s "
                   f"ON s.id = p.sid{at} AND p.ts = m.t AND {value} IS NOT NULL "
                   f"ORDER BY s.series LIMIT 1) FROM (SELECT (p.ts / ?) * ? AS b, "
                   f"max(p.ts) AS t FROM points AS p{where} AND {value} IS NOT NULL "
                   f"GROUP BY b) AS m ORDER BY m.b")
            rows = self._query(sql, [path, *at_args, path, every_ms, every_ms, *args, path])
            return [Bucket(b, v) for b, v in rows]
        sql = (f"SELECT (p.ts / ?) * ? AS b, {_SQL_AGG[fn]}({value}) FROM points AS p{where} "
               f"AND {value} IS NOT NULL GROUP BY b ORDER BY b")
        rows = self._query(sql, [every_ms, every_ms, path, *args, path])
        return [Bucket(b, v) for b, v in rows]

    def count(self, measurement: str, *, start_ms: int | None = None, end_ms: int | None = None,
              district: str | None = None, device_id: str | None = None) -> int:
        mid = self._measurement(measurement)
        if mid is None:
            return 0
        where, args = self._where(mid, start_ms, end_ms, district, device_id)
        return self._query(f"SELECT count(*) FROM points AS p{where}", args)[0][0]

    def points(self, measurement: str, *, start_ms: int, end_ms: int,
               device_id: str | None = None) -> Iterator[Point]:
        mid = self._measurement(measurement)
        if mid is None:
            return
        of = "AND s.device_id = ?5 " if device_id else ""
        select = ("SELECT p.ts, s.series, s.tags, p.fields FROM points AS p "
                  "JOIN series AS s ON s.id = p.sid WHERE p.mid = ?1 AND p.ts >= ?2 "
                  "{after}AND p.ts < ?4 " + of + "ORDER BY p.ts, s.series LIMIT 5000")
        first, after = select.format(after=""), select.format(
            after="AND (p.ts > ?2 OR s.series > ?3) ")
        sql, last = first, (start_ms, "")
        while True:  # in pages, so a long replay does not hold the lock or the heap
            rows = self._query(sql, (mid, *last, end_ms, *([device_id] if device_id else [])))
            for ts, _, tags, fields in rows:
                yield Point(measurement, orjson.loads(tags), orjson.loads(fields), ts)
            if len(rows) < 5000:
                return
            sql, last = after, rows[-1][:2]

    # ------------------------------------------------------------------ lifecycle

    def _aggregate_rollup(self, measurement: str, field: str, fn: str, start_ms: int,
                          end_ms: int, every_ms: int, district: str | None,
                          device_id: str | None) -> list[Bucket]:
        every = max(HOUR_MS, -(-int(every_ms) // HOUR_MS) * HOUR_MS)
        path = "$." + '"' + field.replace('"', '""') + '"'
        sql, args = ["measurement = ?2", "hour >= ?3", "hour < ?4"], [path, measurement,
                                                                      start_ms, end_ms]
        for column, value in (("district", district), ("device_id", device_id)):
            if value:
                args.append(value)
                sql.append(f"{column} = ?{len(args)}")
        args.append(every)
        n = len(args)
        where = " AND ".join(sql) + " AND json_extract(stats, ?1) IS NOT NULL"
        if fn == "last":
            rows = self._query(f"SELECT (hour / ?{n}) * ?{n} AS b, max(hour), "
                               f"json_extract(stats, ?1 || '.last') FROM points_1h WHERE "
                               f"{where} GROUP BY b ORDER BY b", args)
            return [Bucket(b, v) for b, _, v in rows]
        rows = self._query(f"SELECT (hour / ?{n}) * ?{n} AS b, {_ROLLUP_SQL[fn]} FROM points_1h "
                           f"WHERE {where} GROUP BY b ORDER BY b", args)
        return [Bucket(b, v) for b, v in rows]

    def maintain(self, now_ms: int | None = None) -> dict[str, int]:
        """Roll up every complete hour not rolled up yet, then drop raw rows older than the
        raw retention and rollups older than theirs. Ingest runs this every few minutes."""
        import time

        lc = self.lifecycle or Lifecycle()
        now = int(time.time() * 1000) if now_ms is None else now_ms
        done = {"hours": 0, "rollups": 0, "raw_deleted": 0, "rollups_deleted": 0}
        with self._lock:
            db = self._db
            mids = db.execute("SELECT id, name FROM measurements").fetchall()
            row = db.execute("SELECT value FROM lifecycle WHERE key = 'rolled_until'").fetchone()
            # Per measurement: each is a range of the primary key, so min and max are lookups.
            ends = [db.execute("SELECT min(ts), max(ts) FROM points WHERE mid = ?",
                               (mid,)).fetchone() for mid, _ in mids]
        ends = [e for e in ends if e[0] is not None]
        start = row[0] if row else (min(e[0] for e in ends) // HOUR_MS * HOUR_MS
                                    if ends else None)
        newest = max(e[1] for e in ends) if ends else None
        rolled = [(mid, name) for mid, name in mids if name in MEASUREMENTS]
        names: dict[int, tuple[str, str | None, str | None]] = {}
        if start is not None and newest is not None:
            # Complete hours only: up to the hour of the newest reading (data time may run
            # behind the wall clock, as in an accelerated simulation).
            until = min(newest, now) // HOUR_MS * HOUR_MS
            for lo in range(start, until, HOUR_MS):  # an hour at a time: bounded memory
                hi = lo + HOUR_MS
                done["rollups"] += self._roll(rolled, lo, hi, names)
                done["hours"] += (hi - lo) // HOUR_MS
        with self._lock:
            db = self._db
            cutoff = now - lc.raw_hours * HOUR_MS
            db.execute("BEGIN IMMEDIATE")
            try:
                done["raw_deleted"] = sum(db.execute(
                    "DELETE FROM points WHERE mid = ? AND ts < ?", (mid, cutoff)).rowcount
                    for mid, in db.execute("SELECT id FROM measurements").fetchall())
                # A series whose newest point went has none left.
                db.execute("DELETE FROM series_last WHERE ts < ?", (cutoff,))
                done["rollups_deleted"] = db.execute(
                    "DELETE FROM points_1h WHERE hour < ?",
                    (now - lc.rollup_hours * HOUR_MS,)).rowcount
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return done

    def _roll(self, measurements: list[tuple[int, str]], lo: int, hi: int,
              names: dict[int, tuple[str, str | None, str | None]]) -> int:
        """Roll up [lo, hi) (an hour) into points_1h, and note it rolled up. ``names``:
        series number → (series, device_id, district), filled in as series turn up."""
        out = []
        for mid, m in measurements:
            with self._lock:
                rows = self._db.execute("SELECT sid, fields FROM points WHERE mid = ? "
                                        "AND ts >= ? AND ts < ?", (mid, lo, hi)).fetchall()
                if rows and any(sid not in names for sid, _ in rows):
                    names.update((sid, rest) for sid, *rest in self._db.execute(
                        "SELECT id, series, device_id, district FROM series WHERE mid = ?",
                        (mid,)))
            by_series: dict[int, list[str]] = {}
            for sid, fields in rows:  # in time order: the last value is the newest
                texts = by_series.get(sid)
                if texts is None:
                    by_series[sid] = [fields]
                else:
                    texts.append(fields)
            for sid, texts in by_series.items():
                readings = orjson.loads("[" + ",".join(texts) + "]")  # one parse a series
                names_seen: dict[str, object] = {}
                for r in readings:
                    names_seen.update(r)
                per = {}
                for f in names_seen:  # numbers only: not bool, not text, not missing
                    values = [v for r in readings
                              if (v := r.get(f)).__class__ is float or v.__class__ is int]
                    if values:
                        per[f] = {"sum": sum(values), "count": len(values), "min": min(values),
                                  "max": max(values), "last": values[-1]}
                if per:
                    name, device_id, district = names[sid]
                    out.append((m, name, lo // HOUR_MS * HOUR_MS, device_id, district,
                                orjson.dumps(per).decode()))
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO points_1h VALUES (?,?,?,?,?,?)", out)
                db.execute("INSERT OR REPLACE INTO lifecycle VALUES ('rolled_until', ?)", (hi,))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return len(out)

    def close(self) -> None:
        with self._lock:
            self._db.close()
