"""Spot prices from a price file shaped like the Danish Energi Data Service datasets.

Two shapes are read (docs/tariffs.md, "Spot prices"), each the dataset's API answer
``{"records": [...], ...}`` saved as it is:

- ``Elspotprices`` (hourly, until 2025-09-30): ``HourUTC``, ``HourDK``, ``PriceArea``,
  ``SpotPriceDKK``, ``SpotPriceEUR``;
- ``DayAheadPrices`` (quarter-hourly, from 2025-10-01): ``TimeUTC``, ``TimeDK``,
  ``PriceArea``, ``DayAheadPriceDKK``, ``DayAheadPriceEUR``.

Prices are per MWh and may be negative. Times are read from the UTC column (the local one
repeats an hour each autumn). Records may come in any order (the API sorts newest first).
Within a price area every slot from the first to the last must be there exactly once: a gap,
a duplicate, a slot off the grid or a missing price is refused with the record's place, and
the prices in use stay as they were. Consumption in a slot the file does not cover is never
priced by a guess: billing holds it until a file that covers it is read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

HOUR_MS, QUARTER_MS = 3_600_000, 900_000
# dataset shape → (time column, price column prefix, slot length)
SHAPES = (("HourUTC", "SpotPrice", HOUR_MS), ("TimeUTC", "DayAheadPrice", QUARTER_MS))


class PriceFileError(ValueError):
    """A price file that cannot be used; ``problems`` says what and where, one per line."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems = path, problems
        shown = problems[:10] + ([f"… and {len(problems) - 10} more"] if len(problems) > 10
                                 else [])
        super().__init__("\n".join(f"{path}: {p}" for p in shown))


@dataclass(frozen=True)
class Area:
    first_ms: int  # the first slot's start
    slot_ms: int
    prices: tuple[Decimal, ...]  # per MWh, one per slot from first_ms

    def at(self, ts_ms: int) -> Decimal | None:
        i = (ts_ms - self.first_ms) // self.slot_ms
        return self.prices[i] if 0 <= i < len(self.prices) else None


@dataclass(frozen=True)
class SpotPrices:
    path: str
    currency: str
    areas: dict[str, Area]

    def per_mwh(self, area: str, ts_ms: int) -> Decimal | None:
        """The price per MWh of the slot ``ts_ms`` falls in, None if the file has none."""
        a = self.areas.get(area)
        return a.at(ts_ms) if a is not None else None

    def slot_ms(self, area: str) -> int:
        a = self.areas.get(area)
        return a.slot_ms if a is not None else HOUR_MS


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M")


def _utc_ms(text: Any) -> int:
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a time")
    t = datetime.fromisoformat(text.replace(" ", "T"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def parse(data: Any, path: str, currency: str) -> SpotPrices:
    """A price file's decoded JSON (numbers as ``Decimal``) → its prices, or PriceFileError."""
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not records:
        raise PriceFileError(path, ["not a price file: expected {\"records\": [...]} with at "
                                    "least one record (an Energi Data Service dataset answer)"])
    shape = next((s for s in SHAPES if isinstance(records[0], dict) and s[0] in records[0]),
                 None)
    if shape is None:
        raise PriceFileError(path, ["records[0]: neither HourUTC (Elspotprices) nor TimeUTC "
                                    "(DayAheadPrices)"])
    time_col, prefix, slot = shape
    price_col = prefix + currency
    problems: list[str] = []
    by_area: dict[str, dict[int, tuple[int, Decimal]]] = {}
    for i, r in enumerate(records):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where}: not an object")
            continue
        area, value = r.get("PriceArea"), r.get(price_col)
        try:
            ts = _utc_ms(r.get(time_col))
        except ValueError as e:
            problems.append(f"{where}: {time_col}: {e}")
            continue
        if not isinstance(area, str) or not area:
            problems.append(f"{where}: no PriceArea")
            continue
        if ts % slot:
            problems.append(f"{where}: {time_col} {r.get(time_col)} is not on the "
                            f"{slot // 60_000}-minute grid")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
            problems.append(f"{where}: {price_col} is {value!r}, not a number "
                            f"(the billing file's currency is {currency})")
            continue
        seen = by_area.setdefault(area, {})
        if ts in seen:
            problems.append(f"{where}: {area} {_iso(ts)} UTC is a duplicate of "
                            f"records[{seen[ts][0]}]")
            continue
        seen[ts] = (i, Decimal(value))
    areas = {}
    for area, slots in sorted(by_area.items()):
        times = sorted(slots)
        for a, b in zip(times, times[1:], strict=False):
            if b - a != slot:
                problems.append(f"records[{slots[a][0]}], records[{slots[b][0]}]: {area} has "
                                f"no price from {_iso(a + slot)} to {_iso(b)} UTC (a gap)")
        areas[area] = Area(times[0], slot, tuple(slots[t][1] for t in times))
    if problems:
        raise PriceFileError(path, problems)
    return SpotPrices(path, currency, areas)


# The last file read, by (path, device, inode, size, mtime) and currency: the billing file's
# check at start-up and the store's PriceFile then read and parse it once, not twice.
_last: tuple[tuple, SpotPrices] | None = None


def load(path: str | Path, currency: str) -> SpotPrices:
    global _last
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, currency)
            if _last is not None and _last[0] == key:
                return _last[1]
            text = f.read().decode()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise PriceFileError(str(path), [f"cannot read: {why}"]) from None
    try:
        data = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as e:
        raise PriceFileError(str(path), [f"line {e.lineno}, column {e.colno}: not JSON: "
                                         f"{e.msg}"]) from None
    prices = parse(data, str(path), currency)
    _last = (key, prices)
    return prices


class PriceFile:
    """A price file kept up to date: read again when it changes on disk. A new version that
    is refused (a gap, a duplicate, a half-written file) leaves the prices as they were, and
    ``error`` says why until a good one is read."""

    def __init__(self, path: str | Path, currency: str):
        self.path, self.currency = Path(path), currency
        self._lock = threading.Lock()
        self._stamp = self._mtime()
        self._checked = time.monotonic()
        self.prices = load(self.path, currency)  # at start-up a bad file is refused outright
        self.error: str | None = None

    def _mtime(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self, *, now: bool = False) -> SpotPrices:
        """The prices, read again first if the file changed since they were read (looked
        at once a second at most, every time with ``now``)."""
        if not now and time.monotonic() - self._checked < 1.0:
            return self.prices
        self._checked = time.monotonic()
        stamp = self._mtime()
        if stamp != self._stamp and stamp is not None:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self.prices = load(self.path, self.currency)
                        self.error = None
                    except PriceFileError as e:
                        self.error = str(e)
        return self.prices
