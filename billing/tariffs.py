"""Pricing consumption: time-of-use windows and month boundaries in the city's timezone, tiers.

An interval between two readings is split at every tariff boundary inside it
(its energy shared out by time, as if the power was steady), and at month
boundaries (tiers count per month, settlements belong to a month). Local
clock times are turned into instants per day, so days of 23 and 25 hours
price right.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing.config import DAYS, BillingConfig, Prices, Tariff, minutes


@dataclass(frozen=True)
class Segment:
    start_ms: int
    end_ms: int
    mwh: int  # milliwatt-hours: registers are integers in these
    price: Decimal  # currency units per kWh
    amount: Decimal  # currency units, exact
    period: str  # YYYY-MM in the city's timezone
    kind: str = "energy"  # a settlement line's kind (docs/tariffs.md)
    label: str = "Energy"  # and its label: segments with the same kind, label, price group


def period_of(ts_ms: int, tz: ZoneInfo) -> str:
    local = datetime.fromtimestamp(ts_ms / 1000, tz)
    if local.year < 1000:  # strftime's %Y is not zero-padded there
        return local.strftime("%Y-%m")
    return f"{local.year}-{local.month:02d}"  # = strftime("%Y-%m"), without its cost


def _instant(day: date, hhmm: str, tz: ZoneInfo) -> int:
    m = minutes(hhmm)
    if m == 24 * 60:
        day, m = day + timedelta(days=1), 0
    local = datetime.combine(day, time(m // 60, m % 60), tz)
    return int(local.timestamp() * 1000)


def _day_cuts(tariff: Tariff, tz: ZoneInfo, day: date) -> tuple[int, ...]:
    """The instants a price may change on ``day``: its windows' ends (of the version valid
    that day), a month's start and a version's start."""
    cuts = []
    if day.day == 1 or any(v.valid_from == day for v in tariff.versions):
        cuts.append(int(datetime.combine(day, time(0), tz).timestamp() * 1000))
    for w in tariff.on(day).windows:
        cuts.append(_instant(day, w.start, tz))
        cuts.append(_instant(day, w.end, tz))
    return tuple(cuts)


# (id(tariff), tz, day) → (tariff, its cuts): a meter's readings ask for the same few days.
_CUTS: dict[tuple[int, ZoneInfo, date], tuple[Tariff, tuple[int, ...]]] = {}


def _boundaries(tariff: Tariff, tz: ZoneInfo, t0: int, t1: int) -> list[int]:
    first = datetime.fromtimestamp(t0 / 1000, tz).date() - timedelta(days=1)
    last = datetime.fromtimestamp(t1 / 1000, tz).date() + timedelta(days=1)
    cuts = set()
    day = first
    while day <= last:
        cuts.update(_known_cuts(tariff, tz, day))
        day += timedelta(days=1)
    return sorted(c for c in cuts if t0 < c < t1)


def _known_cuts(tariff: Tariff, tz: ZoneInfo, day: date) -> tuple[int, ...]:
    key = (id(tariff), tz, day)
    known = _CUTS.get(key)
    if known is None or known[0] is not tariff:
        if len(_CUTS) > 4096:
            _CUTS.clear()
        known = _CUTS[key] = (tariff, _day_cuts(tariff, tz, day))
    return known[1]


# (id(tariff), tz) → (tariff, lo, hi): the last span between two cuts (lo ≤ t < hi, no cut
# in between) that an interval fell in. A meter reads every minute or so and the cuts are a
# few a day: almost every interval lies in the span of the one before, any meter's.
_SPANS: dict[tuple[int, ZoneInfo], tuple[Tariff, int, int]] = {}


def _midnight(day: date, tz: ZoneInfo) -> int:
    return int(datetime.combine(day, time(0), tz).timestamp() * 1000)


def _cuts_inside(tariff: Tariff, tz: ZoneInfo, t0: int, t1: int) -> list[int]:
    """``_boundaries(tariff, tz, t0, t1)``, answered from the span cache when it can be."""
    key = (id(tariff), tz)
    span = _SPANS.get(key)
    if span is not None and span[0] is tariff and span[1] <= t0 and t1 <= span[2]:
        return []
    inside = _boundaries(tariff, tz, t0, t1)
    # Learn the span around t0 from its day and the days either side (all their cuts known).
    day = datetime.fromtimestamp(t0 / 1000, tz).date()
    lo, hi = _midnight(day - timedelta(days=1), tz), _midnight(day + timedelta(days=2), tz)
    for d in (day - timedelta(days=1), day, day + timedelta(days=1)):
        for c in _known_cuts(tariff, tz, d):
            if c <= t0:
                lo = max(lo, c)
            else:
                hi = min(hi, c)
    if len(_SPANS) > 256:
        _SPANS.clear()
    _SPANS[key] = (tariff, lo, hi)
    return inside


def _priced_at(tariff: Tariff, tz: ZoneInfo, ts_ms: int) -> tuple[Decimal, str]:
    """The price per kWh at a moment, and its line's label (the window it falls in)."""
    local = datetime.fromtimestamp(ts_ms / 1000, tz)
    prices = tariff.on(local.date())
    now = local.hour * 60 + local.minute + local.second / 60
    for w in prices.windows:
        if DAYS[local.weekday()] in w.days and minutes(w.start) <= now < minutes(w.end):
            return w.price, f"Energy {w.start}\u2013{w.end}"
    return prices.price, "Energy"  # type: ignore[return-value]


def _price_at(tariff: Tariff, tz: ZoneInfo, ts_ms: int) -> Decimal:
    return _priced_at(tariff, tz, ts_ms)[0]


def version_at(tariff: Tariff, tz: ZoneInfo, ts_ms: int) -> Prices:
    """The tariff version valid at a moment (the local day it falls on)."""
    return tariff.on(datetime.fromtimestamp(ts_ms / 1000, tz).date())


def _share(mwh: int, weights: list[int]) -> list[int]:
    """Split an integer by weights; the parts add up exactly."""
    total = sum(weights)
    if total <= 0:
        return [mwh] + [0] * (len(weights) - 1)
    parts = [mwh * w // total for w in weights]
    parts[-1] += mwh - sum(parts)
    return parts


def price(config: BillingConfig, tariff_name: str, tz: ZoneInfo, t0: int, t1: int, mwh: int,
          used_in_period: dict[str, int]) -> list[Segment]:
    """Price ``mwh`` consumed between t0 and t1. ``used_in_period`` (period → mWh already
    priced) is read and updated, for tiers."""
    tariff = config.tariffs[tariff_name]
    cuts = [t0, *_cuts_inside(tariff, tz, t0, t1), t1] if t1 > t0 else [t0, t1]
    pieces = list(zip(cuts, cuts[1:], strict=False)) or [(t0, t1)]
    shares = _share(mwh, [b - a for a, b in pieces])
    segments = []
    for (a, b), part in zip(pieces, shares, strict=True):
        period = period_of(a, tz)
        prices = version_at(tariff, tz, a)
        if prices.tiers:
            used = used_in_period.get(period, 0)
            left = part
            for n, tier in enumerate(prices.tiers, start=1):
                cap = None if tier.upto_kwh is None else int(tier.upto_kwh * 1_000_000)
                room = left if cap is None else max(0, min(left, cap - used))
                if room:
                    segments.append(Segment(a, b, room, tier.price,
                                            tier.price * room / Decimal(1_000_000), period,
                                            "energy", f"Energy tier {n}"))
                    used += room
                    left -= room
                if not left:
                    break
            used_in_period[period] = used
        else:
            p, label = _priced_at(tariff, tz, a)
            segments.append(Segment(a, b, part, p, p * part / Decimal(1_000_000), period,
                                    "energy", label))
            used_in_period[period] = used_in_period.get(period, 0) + part
    return segments


def price_now(config: BillingConfig, tariff_name: str, tz: ZoneInfo, ts_ms: int) -> Decimal:
    """The tariff's price per kWh at a moment (a tiered tariff: its first band)."""
    tariff = config.tariffs[tariff_name]
    prices = version_at(tariff, tz, ts_ms)
    return prices.tiers[0].price if prices.tiers else _price_at(tariff, tz, ts_ms)
