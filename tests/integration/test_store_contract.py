"""One contract suite, every store backend (InfluxDB for real, and the embedded SQLite)."""

import pytest

from citygrid.store import DatabaseNotFound, Point, StoreRejected, StoreUnavailable
from citygrid.store.influx import InfluxStore

T0 = 1_790_000_000_000


def light(device: str, district: str, ts: int, level: float, seq: int) -> Point:
    return Point("streetlight", {"device_id": device, "district": district},
                 {"brightness_pct": level, "seq": seq, "motion": level > 50}, ts)


def test_write_and_count(store):
    store.write([light("sl-1", "norrebro", T0 + i * 1000, 40.0, i) for i in range(10)])
    assert store.count("streetlight") == 10
    assert store.count("streetlight", device_id="sl-1") == 10
    assert store.count("streetlight", device_id="sl-2") == 0
    assert store.count("meter") == 0
    assert store.count("streetlight", start_ms=T0 + 3000, end_ms=T0 + 6000) == 3


def test_same_identity_overwrites(store):
    """Redelivered readings land on the same point: at-least-once → exactly-once storage."""
    p = light("sl-1", "norrebro", T0, 40.0, 1)
    store.write([p, p])
    store.write([p, light("sl-1", "norrebro", T0, 60.0, 1)])
    assert store.count("streetlight") == 1
    assert store.latest("streetlight")["sl-1"].fields["brightness_pct"] == 60.0
    # Same time, another device: another point.
    store.write([light("sl-2", "norrebro", T0, 40.0, 1)])
    assert store.count("streetlight") == 2


def test_latest_per_device_with_filters(store):
    store.write([light("sl-1", "norrebro", T0 + i, 10.0 * i, i) for i in range(5)]
                + [light("sl-2", "valby", T0 + 100, 70.0, 9)])
    latest = store.latest("streetlight")
    assert set(latest) == {"sl-1", "sl-2"}
    one = latest["sl-1"]
    assert one.ts_ms == T0 + 4
    assert one.fields == {"brightness_pct": 40.0, "seq": 4, "motion": False}
    assert one.tags == {"device_id": "sl-1", "district": "norrebro"}
    assert set(store.latest("streetlight", district="valby")) == {"sl-2"}
    assert set(store.latest("streetlight", device_id="sl-1")) == {"sl-1"}


def test_time_bucketed_aggregates(store):
    # Two devices, 6 minutes, one reading a minute each.
    points = [light(d, "norrebro", T0 + m * 60_000, level + m, m)
              for m in range(6) for d, level in (("sl-1", 10.0), ("sl-2", 30.0))]
    store.write(points)
    start = T0 - T0 % 180_000  # align to the bucket like both backends do
    kw = dict(start_ms=start, end_ms=T0 + 6 * 60_000, every_ms=180_000)
    means = store.aggregate("streetlight", "brightness_pct", "mean", **kw)
    expected = {}
    for p in points:
        b = p.ts_ms - p.ts_ms % 180_000
        expected.setdefault(b, []).append(p.fields["brightness_pct"])
    assert [(b.start_ms, b.value) for b in means] == [
        (b, sum(v) / len(v)) for b, v in sorted(expected.items())]
    maxes = store.aggregate("streetlight", "brightness_pct", "max", device_id="sl-1", **kw)
    assert [b.value for b in maxes] == [max(v for v in vals if v < 30) for _, vals in
                                        sorted(expected.items())]
    counts = store.aggregate("streetlight", "brightness_pct", "count", **kw)
    assert sum(b.value for b in counts) == 12


def test_awkward_tag_and_string_values_round_trip(store):
    p = Point("streetlight", {"device_id": "sl 1,a=b", "district": "indre by"},
              {"fault": 'lamp "failure" \\ now', "seq": 1}, T0)
    store.write([p])
    got = store.latest("streetlight")["sl 1,a=b"]
    assert got.tags == p.tags
    assert got.fields == p.fields


def test_unknown_aggregate_is_refused(store):
    with pytest.raises(ValueError):
        store.aggregate("streetlight", "lux", "median", start_ms=0, end_ms=1, every_ms=1)


# --------------------------------------------------------------------------- InfluxDB specifics


def test_influx_400_rejects_only_the_bad_points(influx_store):
    """A field-type conflict is a 400: not retried, the bad points named, the good ones kept."""
    influx_store.write([Point("meter", {"device_id": "m-1", "district": "x"},
                              {"power_w": 1.0}, T0)])
    good = [Point("meter", {"device_id": f"m-{i}", "district": "x"}, {"power_w": 2.0}, T0 + i)
            for i in range(2, 40)]
    bad = Point("meter", {"device_id": "m-1", "district": "x"}, {"power_w": "oops"}, T0 + 1)
    with pytest.raises(StoreRejected) as e:
        influx_store.write(good[:20] + [bad] + good[20:])
    assert e.value.points == [bad]
    assert "conflict" in e.value.message
    assert influx_store.count("meter") == 1 + len(good)


def test_influx_down_is_unavailable_not_rejected(tmp_path):
    from cityctl.localservices import free_port

    store = InfluxStore(f"http://127.0.0.1:{free_port()}", "x", timeout_s=1)
    with pytest.raises(StoreUnavailable):
        store.write([light("sl-1", "n", T0, 1.0, 1)])
    assert not store.ping()


def test_influx_recreates_a_database_dropped_under_it(influx_store):
    """The server's "database not found" on a write is DatabaseNotFound: created, rewritten."""
    influx_store.write([light("sl-1", "n", T0, 1.0, 1)])
    influx_store.drop()
    influx_store.write([light("sl-1", "n", T0 + 1, 1.0, 2)])
    assert influx_store.count("streetlight") == 1


def test_influx_statement_on_a_missing_database_is_database_not_found(influxd, uid):
    store = InfluxStore(influxd.url, f"never_{uid}")
    assert store.count("streetlight") == 0  # reading one not written yet: empty
    with pytest.raises(DatabaseNotFound):
        store.query(f'SHOW RETENTION POLICIES ON "never_{uid}"')
    store.close()


def test_points_in_time_order_across_pages(store):
    points = [light(f"sl-{d}", "norrebro", T0 + (i // 3) * 1000, 40.0, i)
              for i in range(7000) for d in (i % 3,)]
    store.write(points)
    got = list(store.points("streetlight", start_ms=T0, end_ms=T0 + 10_000_000))
    assert len(got) == 7000
    assert [p.ts_ms for p in got] == sorted(p.ts_ms for p in got)
    assert {(p.tags["device_id"], p.fields["seq"]) for p in got} == {
        (p.tags["device_id"], p.fields["seq"]) for p in points}
    assert got[0].tags == {"device_id": "sl-0", "district": "norrebro"}
    assert list(store.points("streetlight", start_ms=T0, end_ms=T0 + 1000)) == [
        p for p in got if p.ts_ms < T0 + 1000]
    # one device's points, across pages too (a meter's export reads them so)
    one = list(store.points("streetlight", start_ms=T0, end_ms=T0 + 10_000_000,
                            device_id="sl-1"))
    assert one == [p for p in got if p.tags["device_id"] == "sl-1"] and len(one) > 2000
