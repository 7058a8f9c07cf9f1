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
"""

_SQL_AGG = {"mean": "avg", "min": "min", "max": "max", "sum": "sum", "count": "count"}


class SqliteStore:
    def __init__(self, path: str | Path):
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

    def close(self) -> None:
        with self._lock:
            self._db.close()
