"""The embedded store: SQLite in the data directory, so CityGrid runs with nothing installed.

Same identity rule as InfluxDB: measurement + tags + timestamp; a rewrite merges
its fields into the stored point.
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    measurement TEXT NOT NULL,
    series      TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    device_id   TEXT,
    district    TEXT,
    tags        TEXT NOT NULL,
    fields      TEXT NOT NULL,
    PRIMARY KEY (measurement, series, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_by_time ON points (measurement, ts);
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
_ROLLUP_SQL = {"mean": "sum(json_extract(stats, ?1 || '.sum')) / "
                       "sum(json_extract(stats, ?1 || '.count'))",
               "min": "min(json_extract(stats, ?1 || '.min'))",
               "max": "max(json_extract(stats, ?1 || '.max'))",
               "sum": "sum(json_extract(stats, ?1 || '.sum'))",
               "count": "sum(json_extract(stats, ?1 || '.count'))"}

_SQL_AGG = {"mean": "avg", "min": "min", "max": "max", "sum": "sum", "count": "count"}


class SqliteStore:
    def __init__(self, path: str | Path, lifecycle: Lifecycle | None = None):
        self.lifecycle = lifecycle
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = statedb.connect(self.path)
        self._db.executescript(_SCHEMA)  # a reader of a fresh data dir finds it empty, not broken

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def ensure_ready(self) -> None:
        with self._lock:
            self._db.executescript(_SCHEMA)

    def write(self, points: Sequence[Point]) -> None:
        rows = [
            (m, series_id(tags), ts, tags.get("device_id"), tags.get("district"),
             orjson.dumps(tags).decode(), orjson.dumps(fields).decode())
            for m, tags, fields, ts, _ in points
        ]
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (measurement, series, ts) "
                        "DO UPDATE SET fields = json_patch(fields, excluded.fields)",
                        rows,
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as e:  # locked, disk full: the caller spools
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e

    def _where(self, measurement: str, start_ms: int | None, end_ms: int | None,
               district: str | None, device_id: str | None) -> tuple[str, list[object]]:
        sql, args = ["measurement = ?"], [measurement]
        for column, value in (("district", district), ("device_id", device_id)):
            if value:
                sql.append(f"{column} = ?")
                args.append(value)
        if start_ms is not None:
            sql.append("ts >= ?")
            args.append(start_ms)
        if end_ms is not None:
            sql.append("ts < ?")
            args.append(end_ms)
        return " WHERE " + " AND ".join(sql), args

    def _query(self, sql: str, args: Sequence[object]) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:  # locked, damaged: the caller gets a store error
            raise StoreUnavailable(f"SQLite store {self.path}: {e}") from e

    def latest(self, measurement: str, *, district: str | None = None,
               device_id: str | None = None) -> dict[str, Point]:
        where, args = self._where(measurement, None, None, district, device_id)
        # SQLite takes bare columns from the row that holds max(ts).
        rows = self._query(f"SELECT series, max(ts), tags, fields FROM points{where} "
                           "GROUP BY series", args)
        out = {}
        for _, ts, tags, fields in rows:
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
        where, args = self._where(measurement, start_ms, end_ms, district, device_id)
        value = "json_extract(fields, ?)"
        path = "$." + '"' + field.replace('"', '""') + '"'
        if fn == "last":
            sql = (f"SELECT (ts / ?) * ? AS b, max(ts), {value} FROM points{where} "
                   f"AND {value} IS NOT NULL GROUP BY b ORDER BY b")
            rows = self._query(sql, [every_ms, every_ms, path, *args, path])
            return [Bucket(b, v) for b, _, v in rows]
        sql = (f"SELECT (ts / ?) * ? AS b, {_SQL_AGG[fn]}({value}) FROM points{where} "
               f"AND {value} IS NOT NULL GROUP BY b ORDER BY b")
        rows = self._query(sql, [every_ms, every_ms, path, *args, path])
        return [Bucket(b, v) for b, v in rows]

    def count(self, measurement: str, *, start_ms: int | None = None, end_ms: int | None = None,
              district: str | None = None, device_id: str | None = None) -> int:
        where, args = self._where(measurement, start_ms, end_ms, district, device_id)
        return self._query(f"SELECT count(*) FROM points{where}", args)[0][0]

    def points(self, measurement: str, *, start_ms: int, end_ms: int) -> Iterator[Point]:
        last = (start_ms - 1, "")
        while True:  # in pages, so a long replay does not hold the lock or the heap
            rows = self._query("SELECT ts, series, tags, fields FROM points WHERE measurement = ? "
                               "AND (ts, series) > (?, ?) AND ts < ? ORDER BY ts, series "
                               "LIMIT 5000", (measurement, *last, end_ms))
            for ts, _, tags, fields in rows:
                yield Point(measurement, orjson.loads(tags), orjson.loads(fields), ts)
            if len(rows) < 5000:
                return
            last = rows[-1][:2]

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
            row = self._db.execute("SELECT value FROM lifecycle WHERE key = 'rolled_until'"
                                   ).fetchone()
            start = row[0] if row else self._db.execute(
                "SELECT min(ts) / ?1 * ?1 FROM points", (HOUR_MS,)).fetchone()[0]
            newest = self._db.execute("SELECT max(ts) FROM points").fetchone()[0]
        if start is not None and newest is not None:
            # Complete hours only: up to the hour of the newest reading (data time may run
            # behind the wall clock, as in an accelerated simulation).
            until = min(newest, now) // HOUR_MS * HOUR_MS
            for lo in range(start, until, HOUR_MS):  # an hour at a time: bounded memory
                hi = lo + HOUR_MS
                done["rollups"] += self._roll(lo, hi)
                done["hours"] += (hi - lo) // HOUR_MS
                with self._lock:
                    self._db.execute("INSERT OR REPLACE INTO lifecycle VALUES "
                                     "('rolled_until', ?)", (hi,))
        with self._lock:
            done["raw_deleted"] = self._db.execute(
                "DELETE FROM points WHERE ts < ?", (now - lc.raw_hours * HOUR_MS,)).rowcount
            done["rollups_deleted"] = self._db.execute(
                "DELETE FROM points_1h WHERE hour < ?",
                (now - lc.rollup_hours * HOUR_MS,)).rowcount
        return done

    def _roll(self, lo: int, hi: int) -> int:
        stats: dict[tuple, dict] = {}
        with self._lock:
            rows = self._db.execute(
                "SELECT measurement, series, ts, device_id, district, fields FROM points "
                "WHERE ts >= ? AND ts < ? ORDER BY ts", (lo, hi)).fetchall()
        for m, series, ts, device_id, district, fields in rows:
            if m not in MEASUREMENTS:
                continue
            key = (m, series, ts // HOUR_MS * HOUR_MS, device_id, district)
            per = stats.setdefault(key, {})
            for f, v in orjson.loads(fields).items():
                if isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                s = per.get(f)
                if s is None:
                    per[f] = {"sum": v, "count": 1, "min": v, "max": v, "last": v}
                else:
                    s["sum"] += v
                    s["count"] += 1
                    s["min"], s["max"], s["last"] = min(s["min"], v), max(s["max"], v), v
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO points_1h VALUES (?,?,?,?,?,?)", [
                    (m, series, hour, device_id, district, orjson.dumps(per).decode())
                    for (m, series, hour, device_id, district), per in stats.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(stats)

    def close(self) -> None:
        with self._lock:
            self._db.close()
