"""A meter's interval data as files: CSV, and Green Button (NAESB REQ.21 ESPI) Atom XML.

The Green Button feed follows the Green Button Alliance's sample data: a UsagePoint
(electricity), a MeterReading per direction with its ReadingType (Wh integrated over the
interval: deltaData, commodity electricity, forward or reverse flow) and IntervalBlocks of
IntervalReadings, tied together by the Atom links ``self``, ``up`` and ``related``. Values
are milliwatt-hours (``uom`` 72 = Wh with ``powerOfTenMultiplier`` -3), exactly the
intervals' energies, so nothing is lost to rounding.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import quote
from xml.etree import ElementTree as ET

from billing import Interval

ATOM = "http://www.w3.org/2005/Atom"
ESPI = "http://naesb.org/espi"
DAY_MS = 86_400_000
# ReadingType codes (ESPI enumerations)
DELTA_DATA, ELECTRICITY, ENERGY, NORMAL, WH, MILLI = 4, 1, 12, 12, 72, -3
FORWARD, REVERSE = 1, 19
ET.register_namespace("", ATOM)
ET.register_namespace("espi", ESPI)


def iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kwh(mwh: int) -> str:
    return f"{mwh // 1_000_000}.{mwh % 1_000_000:06d}"


def has_export(rows: Sequence[Interval]) -> bool:
    return any(r.export_mwh is not None for r in rows)


def to_csv(rows: Sequence[Interval]) -> str:
    """``start,end,import_kwh[,export_kwh]``: one row per interval the readings cover."""
    export = has_export(rows)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["start", "end", "import_kwh"] + (["export_kwh"] if export else []))
    for r in rows:
        row = [iso(r.start_ms), iso(r.end_ms), _kwh(r.import_mwh)]
        if export:
            row.append("" if r.export_mwh is None else _kwh(r.export_mwh))
        w.writerow(row)
    return out.getvalue()


def _sub(parent: ET.Element, tag: str, text: object = None, ns: str = ESPI) -> ET.Element:
    el = ET.SubElement(parent, f"{{{ns}}}{tag}")
    if text is not None:
        el.text = str(text)
    return el


class _Feed:
    def __init__(self, feed_id: str, title: str, now: str, self_href: str):
        self.root = ET.Element(f"{{{ATOM}}}feed")
        self.now = now
        _sub(self.root, "id", feed_id, ATOM)
        _sub(self.root, "title", title, ATOM)
        _sub(self.root, "updated", now, ATOM)
        _sub(self.root, "link", ns=ATOM).attrib.update(rel="self", href=self_href)

    def entry(self, key: str, title: str, self_href: str, up: str,
              related: Sequence[str] = ()) -> ET.Element:
        """An entry; returns its ``content`` element to put the ESPI resource in."""
        entry = _sub(self.root, "entry", ns=ATOM)
        _sub(entry, "id", f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, key + self_href)}", ATOM)
        for rel, href in [("self", self_href), ("up", up)] + [("related", h) for h in related]:
            _sub(entry, "link", ns=ATOM).attrib.update(rel=rel, href=href)
        _sub(entry, "title", title, ATOM)
        content = _sub(entry, "content", ns=ATOM)
        _sub(entry, "published", self.now, ATOM)
        _sub(entry, "updated", self.now, ATOM)
        return content


def _reading_type(content: ET.Element, flow: int, every_s: int) -> None:
    rt = _sub(content, "ReadingType")
    for tag, value in (("accumulationBehaviour", DELTA_DATA), ("commodity", ELECTRICITY),
                       ("dataQualifier", NORMAL), ("flowDirection", flow),
                       ("intervalLength", every_s), ("kind", ENERGY),
                       ("powerOfTenMultiplier", MILLI), ("timeAttribute", 0), ("uom", WH)):
        _sub(rt, tag, value)


def _blocks(content: ET.Element, readings: Sequence[tuple[int, int, int]]) -> None:
    """An IntervalBlock of ``(start_ms, end_ms, mWh)`` readings, spanning them."""
    block = _sub(content, "IntervalBlock")
    interval = _sub(block, "interval")
    _sub(interval, "duration", (readings[-1][1] - readings[0][0]) // 1000)
    _sub(interval, "start", readings[0][0] // 1000)
    for start, end, mwh in readings:
        reading = _sub(block, "IntervalReading")
        period = _sub(reading, "timePeriod")
        _sub(period, "duration", (end - start) // 1000)
        _sub(period, "start", start // 1000)
        _sub(reading, "value", mwh)


def to_greenbutton(meter_id: str, rows: Sequence[Interval], *, start_ms: int, end_ms: int,
                   every_ms: int, now_ms: int) -> bytes:
    """The ESPI Atom feed of ``rows``: one IntervalBlock per UTC day with data."""
    m = quote(meter_id, safe="")
    base = "/espi/1_1/resource"
    up = f"{base}/RetailCustomer/{m}/UsagePoint"
    point = f"{up}/1"
    key = f"citygrid:{meter_id}:{start_ms}:{end_ms}:{every_ms}:"
    feed = _Feed(f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, key)}",
                 f"CityGrid interval data of meter {meter_id}", iso(now_ms),
                 f"/api/v1/meters/{m}/greenbutton.xml")
    _sub(_sub(_sub(feed.entry(key, f"Meter {meter_id}", point, up, [f"{point}/MeterReading"]),
                   "UsagePoint"), "ServiceCategory"), "kind", 0)  # 0: electricity
    directions = [("01", "Energy imported", FORWARD, [(r.start_ms, r.end_ms, r.import_mwh)
                                                       for r in rows])]
    if has_export(rows):
        directions.append(("02", "Energy exported", REVERSE, [
            (r.start_ms, r.end_ms, r.export_mwh) for r in rows if r.export_mwh is not None]))
    for n, title, flow, readings in directions:
        reading = f"{point}/MeterReading/{n}"
        reading_type = f"{base}/ReadingType/{m}-{n}"
        _sub(feed.entry(key, title, reading, f"{point}/MeterReading",
                        [f"{reading}/IntervalBlock", reading_type]), "MeterReading")
        _reading_type(feed.entry(key, f"{title}, Wh per interval", reading_type,
                                 f"{base}/ReadingType"), flow, every_ms // 1000)
        days: dict[int, list[tuple[int, int, int]]] = {}
        for r in readings:
            days.setdefault(r[0] // DAY_MS, []).append(r)
        for day, of_day in sorted(days.items()):
            _blocks(feed.entry(key, "", f"{reading}/IntervalBlock/{day}",
                               f"{reading}/IntervalBlock"), of_day)
    return ET.tostring(feed.root, encoding="utf-8", xml_declaration=True)


__all__ = ["has_export", "iso", "to_csv", "to_greenbutton"]
