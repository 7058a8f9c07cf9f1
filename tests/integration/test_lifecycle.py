"""Retention and hourly rollups, against the real InfluxDB (and the embedded store)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from citygrid.settings import Settings
from citygrid.store import Point
from citygrid.store.influx import InfluxStore
from citygrid.store.lifecycle import HOUR_MS, Lifecycle, rollup_queries
from citygrid.store.sqlite import SqliteStore
from tests.helpers import REPO

pytestmark = pytest.mark.integration
FNS = ("mean", "min", "max", "sum", "count", "last")


def policies(store: InfluxStore) -> dict[str, tuple[str, bool]]:
    return {r[0]: (r[1], r[4]) for s in store.query(
        f'SHOW RETENTION POLICIES ON "{store.database}"') for r in s["values"]}


def continuous_queries(store: InfluxStore) -> dict[str, str]:
    return {r[0]: r[1] for s in store.query("SHOW CONTINUOUS QUERIES")
            if s.get("name") == store.database for r in s.get("values", [])}


def test_policies_and_continuous_queries_are_created_once_and_follow_the_settings(
        influxd, uid):
    store = InfluxStore(influxd.url, f"lc_{uid}", lifecycle=Lifecycle(10 * 24, 100 * 168, 24))
    for _ in range(3):  # ingest starting three times
        store.ensure_ready()
    assert policies(store) == {"autogen": ("240h0m0s", True), "rollup_1h": ("16800h0m0s", False)}
    cqs = continuous_queries(store)
    assert set(cqs) == set(rollup_queries(store.database))
    assert store.ensure_lifecycle() == []  # nothing left to do
    assert "RESAMPLE FOR 2h" in cqs["cg_meter_1h_delta"]

    # New settings: the durations follow, the queries stay.
    changed = InfluxStore(influxd.url, f"lc_{uid}", lifecycle=Lifecycle(30 * 24, 5 * 8760, 168))
    done = changed.ensure_lifecycle()
    assert done == ["set retention policy autogen to 720h (was 240h0m0s)",
                    "set retention policy rollup_1h to 43800h (was 16800h0m0s)"]
    assert continuous_queries(changed) == cqs

    # The command operators run does the same, from the settings.
    out = subprocess.run([sys.executable, "-m", "cityctl", "store", "init", "--influx-url",
                          influxd.url, "--influx-db", f"lc_{uid}"], cwd=REPO, text=True,
                         capture_output=True, env={"CITYGRID_RAW_RETENTION": "14d",
                                                   "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "set retention policy autogen to 336h" in out.stdout
    assert policies(store)["autogen"] == ("336h0m0s", True)


def _readings(hour0: int) -> list[Point]:
    """Three hours of two lights and a meter, a reading a minute, registers advancing."""
    points = []
    for i in range(180):
        ts = hour0 + i * 60_000
        for d, district in (("sl-1", "valby"), ("sl-2", "amager")):
            points.append(Point("streetlight", {"device_id": d, "district": district}, {
                "seq": i, "brightness_pct": float((i * 7) % 101), "power_w": 20.0 + i % 13,
                "energy_wh": 1000.0 + 0.5 * i, "lux": 1.0, "motion": i % 3 == 0}, ts))
        points.append(Point("meter", {"device_id": "m-1", "district": "valby"}, {
            "seq": i, "energy_kwh": 50.0 + 0.01 * i, "power_w": 600.0 + i}, ts))
    return points


@pytest.mark.parametrize("kind", ["influx", "sqlite"])
def test_rollups_equal_the_raw_aggregates_and_long_ranges_read_them(influxd, uid, tmp_path,
                                                                     kind):
    lifecycle = Lifecycle(30 * 24, 5 * 8760, 7 * 24)
    now = int(time.time() * 1000)
    hour0 = (now - 5 * HOUR_MS) // HOUR_MS * HOUR_MS
    if kind == "influx":
        store = InfluxStore(influxd.url, f"roll_{uid}", lifecycle=lifecycle)
        store.ensure_ready()
        store.write(_readings(hour0))
        # The continuous queries' own statements, for the past range, now.
        store.rollup(hour0, hour0 + 3 * HOUR_MS)
    else:
        store = SqliteStore(tmp_path / "t.sqlite", lifecycle=lifecycle)
        store.write(_readings(hour0))
        # An hour is rolled up once data from a later hour arrived (it may still be filling).
        store.write([Point("citygrid_ingest", {"worker": "w"}, {"readings_per_s": 1.0},
                           hour0 + 3 * HOUR_MS + 60_000)])
        done = store.maintain(now)
        assert done["hours"] >= 3 and done["rollups"] == 9  # 3 hours × 3 devices
        assert store.maintain(now)["rollups"] == 0  # nothing twice

    month = {"start_ms": now - 30 * 24 * HOUR_MS, "end_ms": now, "every_ms": HOUR_MS}
    day = {"start_ms": now - 24 * HOUR_MS, "end_ms": now, "every_ms": HOUR_MS}
    for measurement, field in (("streetlight", "power_w"), ("streetlight", "brightness_pct"),
                               ("meter", "power_w")):
        for fn in FNS:
            for filters in ({}, {"district": "valby"}, {"device_id": "sl-2"}):
                if measurement == "meter" and filters.get("device_id"):
                    continue
                long = store.aggregate(measurement, field, fn, **month, **filters)
                short = store.aggregate(measurement, field, fn, **day, **filters)
                assert [b.start_ms for b in long] == [b.start_ms for b in short]
                assert [b.value for b in long] == pytest.approx([b.value for b in short]), (
                    measurement, field, fn, filters)

    # Proof that the month reads the rollups: a late raw point changes the day, not the month.
    store.write([Point("streetlight", {"device_id": "sl-1", "district": "valby"},
                       {"power_w": 10_000.0}, hour0 + 30 * 60_000 + 1)])
    assert store.aggregate("streetlight", "power_w", "max", **day)[0].value == 10_000.0
    assert store.aggregate("streetlight", "power_w", "max", **month)[0].value < 100

    if kind == "influx":
        # Each register's advance per hour, and a district's sum of them.
        deltas = store.query(f'SELECT "energy_wh_delta" FROM "rollup_1h"."streetlight" WHERE '
                             f'"device_id" = \'sl-1\' AND time >= {hour0}ms')
        assert [v for _, v in deltas[0]["values"]] == [30.0, 30.0]  # 60 readings × 0.5 Wh
        district = store.query(f'SELECT "energy_kwh_delta" FROM "rollup_1h"."meter_district" '
                               f'WHERE "district" = \'valby\' AND time >= {hour0}ms')
        assert [round(v, 6) for _, v in district[0]["values"]] == [0.6, 0.6]
        lights = store.query('SELECT "energy_wh_delta" FROM "rollup_1h"."streetlight_district" '
                             f'WHERE time >= {hour0}ms GROUP BY "district"')
        assert {s["tags"]["district"]: [v for _, v in s["values"]] for s in lights} == {
            "valby": [30.0, 30.0], "amager": [30.0, 30.0]}
    store.close()


def test_the_embedded_store_drops_raw_rows_past_retention_and_keeps_the_hours(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite", lifecycle=Lifecycle(48, 24 * 400, 24))
    now = int(time.time() * 1000)
    old = (now - 10 * 24 * HOUR_MS) // HOUR_MS * HOUR_MS
    store.write(_readings(old) + _readings(now - 4 * HOUR_MS))
    done = store.maintain(now)
    assert done["raw_deleted"] == 540  # the old three hours: 180 minutes × 3 devices
    assert store.count("streetlight", end_ms=now - 5 * 24 * HOUR_MS) == 0
    # The old hours survive as rollups: a range longer than the horizon reads them.
    around = store.aggregate("meter", "power_w", "count", start_ms=old - 12 * HOUR_MS,
                             end_ms=old + 13 * HOUR_MS, every_ms=HOUR_MS)
    assert [b.value for b in around] == [60, 60, 60]
    store.close()


def test_a_bad_lifecycle_setting_is_named():
    from citygrid.settings import SettingsError

    with pytest.raises(SettingsError, match="CITYGRID_RAW_RETENTION"):
        Settings(raw_retention="30 days")
