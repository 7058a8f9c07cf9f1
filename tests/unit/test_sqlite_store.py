"""The embedded SQLite store: merge on rewrite, series numbering across connections and
failed writes, the first schema's data dirs migrated, retention and latest()."""

from __future__ import annotations

import sqlite3

import orjson
import pytest

from citygrid.store import Point, StoreUnavailable
from citygrid.store.base import series_id
from citygrid.store.lifecycle import HOUR_MS, Lifecycle
from citygrid.store.lineproto import series_key
from citygrid.store.sqlite import VERSION, SqliteStore

T0 = 1_790_000_000_000 // HOUR_MS * HOUR_MS


def light(device: str, ts: int, keyed: bool = True, district: str = "valby", **fields) -> Point:
    tags = {"device_id": device, "district": district}
    return Point("streetlight", tags, fields, ts, series_key("streetlight", tags) if keyed
                 else None)


def test_a_rewrite_merges_its_fields_into_the_stored_point(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    store.write([light("sl-1", T0, seq=1, power_w=20.0)])
    # Redelivered (twice in one batch), and once more with a field changed and one added,
    # without the series key this time: still the same point.
    store.write([light("sl-1", T0, seq=1, power_w=20.0)] * 2)
    store.write([light("sl-1", T0, keyed=False, power_w=25.0, lux=3.0)])
    assert store.count("streetlight") == 1
    got = store.latest("streetlight")["sl-1"]
    assert got.fields == {"seq": 1, "power_w": 25.0, "lux": 3.0}
    assert got.ts_ms == T0
    assert [p.fields for p in store.points("streetlight", start_ms=T0, end_ms=T0 + 1)] == [
        got.fields]
    store.close()


def test_two_connections_number_series_alike(tmp_path):
    """Ingest and the rule engine write the same file; each remembers series numbers."""
    a, b = SqliteStore(tmp_path / "t.sqlite"), SqliteStore(tmp_path / "t.sqlite")
    a.write([light("sl-1", T0, seq=1)])
    b.write([light("sl-2", T0, seq=1), light("sl-1", T0 + 1000, seq=2)])
    a.write([light("sl-2", T0 + 1000, seq=2), light("sl-1", T0 + 1000, lux=1.0)])
    for store in (a, b):
        assert store.count("streetlight") == 4
        assert store.count("streetlight", device_id="sl-1") == 2
        latest = store.latest("streetlight")
        assert {k: (p.ts_ms, p.fields) for k, p in latest.items()} == {
            "sl-1": (T0 + 1000, {"seq": 2, "lux": 1.0}), "sl-2": (T0 + 1000, {"seq": 2})}
    db = sqlite3.connect(tmp_path / "t.sqlite")
    assert db.execute("SELECT count(*) FROM series").fetchone()[0] == 2
    a.close()
    b.close()


def test_a_failed_write_leaves_no_series_number_behind(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    with pytest.raises(TypeError):  # not storable: the transaction rolls back
        store.write([light("sl-9", T0, seq=object())])
    assert store.count("streetlight") == 0
    store.write([light("sl-9", T0, seq=1)])
    assert store.latest("streetlight")["sl-9"].fields == {"seq": 1}
    store.close()


def test_a_locked_file_is_unavailable(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    store._db.execute("PRAGMA busy_timeout = 10")
    other = sqlite3.connect(tmp_path / "t.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable):
            store.write([light("sl-1", T0, seq=1)])
    finally:
        other.execute("ROLLBACK")
    store.write([light("sl-1", T0, seq=1)])
    assert store.count("streetlight") == 1
    store.close()


def test_points_are_those_of_the_range_in_time_then_series_order(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    # Numbered in the order first written (z before a), listed by series name.
    store.write([light(d, T0 + i, seq=i) for i in (-1, 0, 1) for d in ("sl-z", "sl-a")])
    got = [(p.ts_ms, p.tags["device_id"]) for p in
           store.points("streetlight", start_ms=T0, end_ms=T0 + 2)]
    assert got == [(T0, "sl-a"), (T0, "sl-z"), (T0 + 1, "sl-a"), (T0 + 1, "sl-z")]
    assert list(store.points("meter", start_ms=T0, end_ms=T0 + 2)) == []
    store.close()


def test_last_of_simultaneous_readings_is_the_first_series_by_name(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    for device, level in (("sl-z", 1.0), ("sl-a", 2.0), ("sl-m", 3.0)):
        store.write([light(device, T0, level=level)])
    got = store.aggregate("streetlight", "level", "last", start_ms=T0, end_ms=T0 + 1,
                          every_ms=1000)
    assert [b.value for b in got] == [2.0]
    store.close()


def test_latest_follows_retention(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite", lifecycle=Lifecycle(1, 24, 1))
    now = T0 + 10 * HOUR_MS
    store.write([light("sl-1", T0, seq=1), light("sl-2", T0, seq=1),
                 light("sl-2", now - 60_000, seq=2)])
    assert store.maintain(now)["raw_deleted"] == 2
    assert {k: p.fields["seq"] for k, p in store.latest("streetlight").items()} == {"sl-2": 2}
    store.write([light("sl-1", T0 + HOUR_MS, seq=3)])  # a late one, older than retention
    assert store.latest("streetlight")["sl-1"].fields == {"seq": 3}
    store.close()


def test_a_newer_schema_is_refused(tmp_path):
    SqliteStore(tmp_path / "t.sqlite").close()
    db = sqlite3.connect(tmp_path / "t.sqlite")
    db.execute(f"PRAGMA user_version = {VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreUnavailable, match="newer"):
        SqliteStore(tmp_path / "t.sqlite")


# ------------------------------------------------------------------ the first schema

_V0_SCHEMA = """
CREATE TABLE points (
    measurement TEXT NOT NULL, series TEXT NOT NULL, ts INTEGER NOT NULL, device_id TEXT,
    district TEXT, tags TEXT NOT NULL, fields TEXT NOT NULL,
    PRIMARY KEY (measurement, series, ts)) WITHOUT ROWID;
CREATE INDEX points_by_time ON points (measurement, ts);
CREATE TABLE points_1h (
    measurement TEXT NOT NULL, series TEXT NOT NULL, hour INTEGER NOT NULL, device_id TEXT,
    district TEXT, stats TEXT NOT NULL, PRIMARY KEY (measurement, series, hour)) WITHOUT ROWID;
CREATE INDEX points_1h_by_time ON points_1h (measurement, hour);
CREATE TABLE lifecycle (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _v0_data_dir(path) -> list[Point]:
    """A telemetry file as the first schema's store wrote it (its own INSERT), with an hour
    rolled up."""
    points = [light(f"sl-{d}", T0 + i * 60_000, district=f"d{d % 2}", seq=i,
                    power_w=20.0 + d + i % 7, motion=i % 2 == 0)
              for i in range(150) for d in range(3)]
    points += [Point("meter", {"device_id": "m-1", "district": "d0"},
                     {"seq": i, "power_w": 500.0 + i}, T0 + i * 60_000) for i in range(150)]
    points += [Point("citygrid_ingest", {"worker": "w"}, {"readings_per_s": 1.5}, T0)]
    db = sqlite3.connect(path)
    db.executescript(_V0_SCHEMA)
    db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (m, series_id(tags), ts, tags.get("device_id"), tags.get("district"),
         orjson.dumps(tags).decode(), orjson.dumps(fields).decode())
        for m, tags, fields, ts, _ in points])
    db.commit()
    db.close()
    return points


def test_a_data_dir_of_the_first_schema_is_migrated_and_reads_the_same(tmp_path):
    path = tmp_path / "telemetry.sqlite"
    points = _v0_data_dir(path)
    # The first schema's rollup of the first hour, as its maintain() left it.
    lc = Lifecycle(24 * 365, 24 * 400, 1)
    fresh = SqliteStore(tmp_path / "fresh.sqlite", lifecycle=lc)
    fresh.write(points)
    assert fresh.maintain(T0 + HOUR_MS + 1)["rollups"] == 4
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO points_1h VALUES (?, ?, ?, ?, ?, ?)", sqlite3.connect(
        tmp_path / "fresh.sqlite").execute("SELECT * FROM points_1h").fetchall())
    db.execute("INSERT INTO lifecycle VALUES ('rolled_until', ?)", (T0 + HOUR_MS,))
    db.commit()
    db.close()

    migrated = SqliteStore(path, lifecycle=lc)
    tables = {r[0] for r in sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "points_v0" not in tables
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == VERSION

    def answers(store: SqliteStore) -> list:
        out = []
        for m in ("streetlight", "meter", "citygrid_ingest"):
            out.append(store.count(m))
            out.append({k: (p.tags, p.fields, p.ts_ms) for k, p in store.latest(m).items()})
            out.append(list(store.points(m, start_ms=T0, end_ms=T0 + 3 * HOUR_MS)))
        for fn in ("mean", "min", "max", "sum", "count", "last"):
            for kw in ({}, {"district": "d1"}, {"device_id": "sl-2"}):
                for start in (T0, T0 - 2 * HOUR_MS):  # raw, and (longer than 1 h) rollups
                    out.append(store.aggregate("streetlight", "power_w", fn, start_ms=start,
                                               end_ms=T0 + 3 * HOUR_MS, every_ms=HOUR_MS, **kw))
        return out

    assert answers(migrated) == answers(fresh)
    assert answers(migrated)[0] == 450
    # It goes on as any other: a redelivered old reading merges, the next hour rolls up.
    migrated.write([light("sl-0", T0, district="d0", lux=2.0)])
    assert next(migrated.points("streetlight", start_ms=T0, end_ms=T0 + 1)).fields == {
        "seq": 0, "power_w": 20.0, "motion": True, "lux": 2.0}
    assert migrated.maintain(T0 + 3 * HOUR_MS)["rollups"] == 4  # the second hour
    migrated.close()
    again = SqliteStore(path)  # opened again: nothing left to migrate
    assert again.count("streetlight") == 450
    again.close()
    fresh.close()
