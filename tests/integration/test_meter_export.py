"""A meter's interval data through the gateway, from readings in the real InfluxDB and in the
SQLite store: CSV parsed back and summed, Green Button XML validated against NAESB's ESPI
schema (tests/data/greenbutton, see its README) and checked for the structure it links."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import xmlschema
from fastapi.testclient import TestClient

from citygrid.city import COPENHAGEN
from citygrid.clock import iso_time
from citygrid.registry import Registry
from citygrid.store import Point
from gateway.app import create_app
from gateway.tokens import create_token
from simulators.fleetgen import generate

DATA = Path(__file__).parent.parent / "data" / "greenbutton"
A = "{http://www.w3.org/2005/Atom}"
E = "{http://naesb.org/espi}"
T0 = iso_time("2026-11-18T09:00:00+01:00")
MIN = 60_000
# NAESB's schema, the Atom schema it imports next to it; nothing fetched from the network
ESPI_SCHEMA = xmlschema.XMLSchema([str(DATA / "espi.xsd")], allow="local", locations=[
    ("http://www.w3.org/2005/Atom", str(DATA / "atom.xsd"))])
FROM, TO = "2026-11-18T09:00:00%2B01:00", "2026-11-18T12:00:00%2B01:00"


def register(ts: int) -> float:
    """The import register at ``ts``: 1.2 kW, then 3 kW after the first hour (kWh)."""
    minutes = (ts - T0) / MIN
    return 1000.0 + 1.2 * min(minutes, 60) / 60 + 3.0 * max(minutes - 60, 0) / 60


@pytest.fixture
def api(settings, store):
    registry = Registry(settings.data_dir)
    registry.import_fleet(generate(COPENHAGEN, 5, 2, seed=1))
    meter, other = (r["device_id"] for r in registry.records(kind="meter"))
    # every 7 minutes from 20 minutes before T0 to 20 after T0 + 3 h, so boundaries are
    # interpolated; the other meter's readings must not leak in.
    points = []
    for ts in range(T0 - 20 * MIN, T0 + 200 * MIN, 7 * MIN):
        points.append(Point("meter", {"device_id": meter, "district": "indre-by"},
                            {"energy_kwh": register(ts), "power_w": 1200.0,
                             "energy_export_kwh": 50.0 + (ts - T0) / (60 * MIN)}, ts))
        points.append(Point("meter", {"device_id": other, "district": "indre-by"},
                            {"energy_kwh": 7.0 + (ts - T0) / MIN, "power_w": 1.0}, ts))
    store.write(points)
    token = create_token(settings.data_dir, "viewer", "export-test")
    with TestClient(create_app(settings, store=store, registry=registry)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, meter, other


def test_csv_rows_add_up_to_the_register_increase(api):
    client, meter, _ = api
    r = client.get(f"/api/v1/meters/{meter}/intervals.csv?from={FROM}&to={TO}&interval=15m")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["start", "end", "import_kwh", "export_kwh"]
    assert len(rows) == 12
    assert rows[0]["start"] == "2026-11-18T08:00:00Z" and rows[0]["end"] == "2026-11-18T08:15:00Z"
    assert rows[-1]["end"] == "2026-11-18T11:00:00Z"
    total = sum(float(row["import_kwh"]) for row in rows)
    assert total == pytest.approx(register(T0 + 180 * MIN) - register(T0), abs=1e-6)
    assert float(rows[0]["import_kwh"]) == pytest.approx(0.3, abs=1e-6)  # 1.2 kW × 15 min
    assert float(rows[-1]["import_kwh"]) == pytest.approx(0.75, abs=1e-6)  # 3 kW × 15 min
    assert sum(float(row["export_kwh"]) for row in rows) == pytest.approx(3.0, abs=1e-6)

    # The power changes at 10:00 (+01:00), between the readings at 09:57 and 10:04: the
    # register at 10:00 is interpolated between them (1.2 kWh + 3/7 of the 0.26 kWh after).
    r = client.get(f"/api/v1/meters/{meter}/intervals.csv?from={FROM}&to={TO}&interval=1h")
    assert [round(float(row["import_kwh"]), 6)
            for row in csv.DictReader(io.StringIO(r.text))] == [1.251429, 2.948571, 3.0]


def test_csv_leaves_out_what_the_readings_do_not_cover_and_keeps_meters_apart(api):
    client, _, other = api
    # readings end 20 minutes after 11:00 (+01:00): the hour from 11:00 is not covered
    r = client.get(f"/api/v1/meters/{other}/intervals.csv?from={FROM}"
                   "&to=2026-11-18T13:00:00%2B01:00&interval=1h")
    assert r.status_code == 200, r.text
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["start", "end", "import_kwh"]  # it reports no export
    assert [float(row["import_kwh"]) for row in rows] == [60.0, 60.0, 60.0]


def test_green_button_is_valid_espi_and_links_its_parts(api):
    client, meter, _ = api
    r = client.get(f"/api/v1/meters/{meter}/greenbutton.xml?from={FROM}&to={TO}&interval=15m")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/atom+xml")
    ESPI_SCHEMA.validate(r.content)
    feed = ET.fromstring(r.content)
    assert feed.tag == f"{A}feed"
    entries = feed.findall(f"{A}entry")

    def links(entry):
        return [(link.get("rel"), link.get("href")) for link in entry.findall(f"{A}link")]

    def resource(entry):
        return entry.find(f"{A}content")[0]

    by_self = {dict(links(e))["self"]: e for e in entries}
    points = [e for e in entries if resource(e).tag == f"{E}UsagePoint"]
    assert len(points) == 1
    assert resource(points[0]).findtext(f"{E}ServiceCategory/{E}kind") == "0"
    readings_href = dict(links(points[0]))["related"]
    meter_readings = [e for e in entries if resource(e).tag == f"{E}MeterReading"]
    assert len(meter_readings) == 2  # import and export
    flows, totals = {}, {}
    for mr in meter_readings:
        assert dict(links(mr))["up"] == readings_href
        related = [h for rel, h in links(mr) if rel == "related"]
        blocks_href = next(h for h in related if h.endswith("/IntervalBlock"))
        reading_type = resource(by_self[next(h for h in related if "ReadingType" in h)])
        assert reading_type.tag == f"{E}ReadingType"
        assert {c.tag[len(E):]: c.text for c in reading_type}.items() >= {
            "accumulationBehaviour": "4", "commodity": "1", "intervalLength": "900",
            "kind": "12", "uom": "72", "powerOfTenMultiplier": "-3"}.items()
        flow = reading_type.findtext(f"{E}flowDirection")
        blocks = [resource(e) for e in entries if dict(links(e))["up"] == blocks_href]
        assert blocks and all(b.tag == f"{E}IntervalBlock" for b in blocks)
        values = []
        for block in blocks:
            start = int(block.findtext(f"{E}interval/{E}start"))
            assert start == T0 // 1000
            for ir in block.findall(f"{E}IntervalReading"):
                assert ir.findtext(f"{E}timePeriod/{E}duration") == "900"
                assert int(ir.findtext(f"{E}timePeriod/{E}start")) == start + 900 * len(values)
                values.append(int(ir.findtext(f"{E}value")))
        flows[flow], totals[flow] = len(values), sum(values)
    assert flows == {"1": 12, "19": 12}
    assert totals["1"] == round((register(T0 + 180 * MIN) - register(T0)) * 1e6)  # mWh
    assert totals["19"] == 3_000_000


def test_the_schema_check_bites():
    schema = ESPI_SCHEMA
    sample = (DATA / "sample.xml").read_text()
    assert schema.is_valid(sample)
    broken = sample.replace("<value>282</value>", "<value>lots</value>", 1)
    assert broken != sample and not schema.is_valid(broken)


@pytest.mark.parametrize("query, status, says", [
    ("from=2026-11-18T09:00:00&to=2026-11-18T12:00:00%2B01:00", 422, "from: "),
    ("from=2026-11-18T09:00:00 01:00&to=2026-11-18T12:00:00%2B01:00", 422, "%2B"),
    (f"from={FROM}&to=yesterday", 422, "to: "),
    (f"from={TO}&to={FROM}", 422, "to: must be after from"),
    (f"from={FROM}&to=2027-11-20T00:00:00%2B01:00", 422, "366 days"),
    (f"from=2026-11-18T09:10:00%2B01:00&to={TO}", 422, "from: must be on a 15m boundary"),
    (f"from={FROM}&to={TO}&interval=5m", 422, "interval"),
    (f"to={TO}", 422, "from"),
])
def test_bad_parameters_are_problems_that_name_them(api, query, status, says):
    client, meter, _ = api
    for route in ("intervals.csv", "greenbutton.xml"):
        r = client.get(f"/api/v1/meters/{meter}/{route}?{query}")
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert says in r.json()["detail"]


def test_unknown_meters_and_other_devices_are_not_found_and_a_token_is_needed(api):
    client, meter, _ = api
    for device in ("m-nope", "sl-00000"):
        r = client.get(f"/api/v1/meters/{device}/intervals.csv?from={FROM}&to={TO}")
        assert r.status_code == 404 and r.json()["detail"] == f"no meter {device!r}"
    r = client.get(f"/api/v1/meters/{meter}/greenbutton.xml?from={FROM}&to={TO}",
                   headers={"Authorization": ""})
    assert r.status_code == 401
