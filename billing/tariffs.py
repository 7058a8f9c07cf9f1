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
from billing.prices import QUARTER_MS, SpotPrices

KWH = Decimal(1000)  # spot prices are per MWh


@dataclass(frozen=True)
class Segment:
    start_ms: int
    end_ms: int
    mwh: int  # milliwatt-hours: registers are integers in these
    price: Decimal | None  # currency units per kWh; None: a spot price the file lacks
    amount: Decimal | None  # currency units, exact (negative: a credit); None if unpriced
    period: str  # YYYY-MM in the city's timezone
    kind: str = "energy"  # a settlement line's kind (docs/tariffs.md)
    label: str = "Energy"  # and its label: segments with the same kind, label, price group


def period_of(ts_ms: int, tz: ZoneInfo) -> str:
    local = datetime.fromtimestamp(ts_ms / 1000, tz)
    if local.year < 1000:  # strftime's %Y is not zero-padded there
        return local.strftime("%Y-%m")
    return f"{local.year}-{local.month:02d}"  # = strftime("%Y-%m"), without its cost


def next_period(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def periods_between(first: str, end: str) -> list[str]:
    """The months from ``first`` up to, not including, ``end`` (both YYYY-MM)."""
    out = []
    while first < end:
        out.append(first)
        first = next_period(first)
    return out


def period_bounds(period: str, tz: ZoneInfo) -> tuple[int, int]:
    """The month's first and next month's first local midnight, in epoch ms."""
    def start(p: str) -> int:
        return int(datetime(int(p[:4]), int(p[5:7]), 1, tzinfo=tz).timestamp() * 1000)
    return start(period), start(next_period(period))


def _instant(day: date, hhmm: str, tz: ZoneInfo) -> int:
    m = minutes(hhmm)
    if m == 24 * 60:
        day, m = day + timedelta(days=1), 0
    local = datetime.combine(day, time(m // 60, m % 60), tz)
    return int(local.timestamp() * 1000)


def _day_cuts(tariff: Tariff, tz: ZoneInfo, day: date) -> tuple[int, ...]:
    """The instants a price may change on ``day``: its windows' and grid bands' ends (of the
    version valid that day), a month's start, a version's start and, at spot, every quarter
    hour (a price file's slot is an hour or a quarter)."""
    cuts = []
    midnight = int(datetime.combine(day, time(0), tz).timestamp() * 1000)
    if day.day == 1 or any(v.valid_from == day for v in tariff.versions):
        cuts.append(midnight)
    prices = tariff.on(day)
    bands = prices.grid.bands if prices.grid is not None else []
    for w in [*prices.windows, *bands]:
        cuts.append(_instant(day, w.start, tz))
        cuts.append(_instant(day, w.end, tz))
    if prices.spot is not None or (prices.export is not None and prices.export.spot):
        end = int(datetime.combine(day + timedelta(days=1), time(0), tz).timestamp() * 1000)
        first = -(-midnight // QUARTER_MS) * QUARTER_MS
        cuts.extend(range(first, end, QUARTER_MS))
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


def _priced_at(tariff: Tariff, tz: ZoneInfo, ts_ms: int, spot: SpotPrices | None = None
               ) -> tuple[Decimal | None, str]:
    """The energy price per kWh at a moment, and its line's label (the window it falls in,
    or the spot area); at spot, None when the price file has no price for the moment."""
    local = datetime.fromtimestamp(ts_ms / 1000, tz)
    prices = tariff.on(local.date())
    if prices.spot is not None:
        per_mwh = spot.per_mwh(prices.spot.area, ts_ms) if spot is not None else None
        label = f"Spot {prices.spot.area}"
        return (None if per_mwh is None else per_mwh / KWH + prices.spot.markup), label
    if prices.tiers:
        return prices.tiers[0].price, "Energy tier 1"
    now = local.hour * 60 + local.minute + local.second / 60
    for w in prices.windows:
        if DAYS[local.weekday()] in w.days and minutes(w.start) <= now < minutes(w.end):
            return w.price, f"Energy {w.start}\u2013{w.end}"
    return prices.price, "Energy"


def _grid_at(prices: Prices, tz: ZoneInfo, ts_ms: int) -> tuple[Decimal, str]:
    """The grid price per kWh at a moment and its label (the band it falls in, else Grid)."""
    assert prices.grid is not None
    local = datetime.fromtimestamp(ts_ms / 1000, tz)
    now = local.hour * 60 + local.minute + local.second / 60
    for b in prices.grid.bands:
        if (DAYS[local.weekday()] in b.days and local.month in b.months
                and minutes(b.start) <= now < minutes(b.end)):
            return b.price, f"Grid {b.label}"
    return prices.grid.price, "Grid"


def export_area(prices: Prices) -> str:
    """The price area an export at spot is credited in: its own, else the energy's."""
    assert prices.export is not None
    if prices.export.area is not None:
        return prices.export.area
    assert prices.spot is not None
    return prices.spot.area


def averaged(label: str) -> bool:
    """A line whose unit price changes every slot (spot): one line, at its average price."""
    return "spot" in label.lower()


def version_at(tariff: Tariff, tz: ZoneInfo, ts_ms: int) -> Prices:
    """The tariff version valid at a moment (the local day it falls on)."""
    return tariff.on(datetime.fromtimestamp(ts_ms / 1000, tz).date())


def share(mwh: int, weights: list[int]) -> list[int]:
    """Split an integer by weights; the parts add up exactly."""
    total = sum(weights)
    if total <= 0:
        return [mwh] + [0] * (len(weights) - 1)
    parts = [mwh * w // total for w in weights]
    parts[-1] += mwh - sum(parts)
    return parts


def _pieces(tariff: Tariff, tz: ZoneInfo, t0: int, t1: int, mwh: int
            ) -> list[tuple[int, int, int]]:
    cuts = [t0, *_cuts_inside(tariff, tz, t0, t1), t1] if t1 > t0 else [t0, t1]
    pieces = list(zip(cuts, cuts[1:], strict=False)) or [(t0, t1)]
    shares = share(mwh, [b - a for a, b in pieces])
    return [(a, b, part) for (a, b), part in zip(pieces, shares, strict=True)]


def price(config: BillingConfig, tariff_name: str, tz: ZoneInfo, t0: int, t1: int, mwh: int,
          used_in_period: dict[str, int], spot: SpotPrices | None = None) -> list[Segment]:
    """Price ``mwh`` imported between t0 and t1: energy segments and, when the tariff has
    grid charges, grid segments. ``used_in_period`` (period → mWh already priced) is read and
    updated, for tiers. At spot, a piece the price file does not cover is a segment with
    ``price`` None: the caller holds it until prices for it are known."""
    tariff = config.tariffs[tariff_name]
    segments = []
    for a, b, part in _pieces(tariff, tz, t0, t1, mwh):
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
            p, label = _priced_at(tariff, tz, a, spot)
            segments.append(Segment(a, b, part, p, None if p is None else
                                    p * part / Decimal(1_000_000), period, "energy", label))
            used_in_period[period] = used_in_period.get(period, 0) + part
        if prices.grid is not None:
            g, glabel = _grid_at(prices, tz, a)
            if g:
                segments.append(Segment(a, b, part, g, g * part / Decimal(1_000_000), period,
                                        "grid", glabel))
    return segments


def credit(config: BillingConfig, tariff_name: str, tz: ZoneInfo, t0: int, t1: int, mwh: int,
           spot: SpotPrices | None = None) -> list[Segment]:
    """Credit ``mwh`` exported between t0 and t1 (kind ``export``, negative amounts), as the
    tariff's export mode says: ``net``, a surplus at the moment's energy price; ``separate``,
    at the export price or the spot price less the fee. A tariff without an export mode
    credits nothing (the export is recorded, not paid). Unpriced pieces as in ``price``."""
    tariff = config.tariffs[tariff_name]
    segments = []
    for a, b, part in _pieces(tariff, tz, t0, t1, mwh):
        prices = version_at(tariff, tz, a)
        export = prices.export
        if export is None:
            continue
        p: Decimal | None
        if export.mode == "net":
            p, energy = _priced_at(tariff, tz, a, spot)
            label = f"Export (net, {energy})" if energy.startswith("Spot") else "Export (net)"
        elif export.spot:
            area = export_area(prices)
            per_mwh = spot.per_mwh(area, a) if spot is not None else None
            p = None if per_mwh is None else per_mwh / KWH - export.fee
            label = f"Export at spot {area}"
        else:
            p, label = export.price, "Export"
        segments.append(Segment(a, b, part, p, None if p is None else
                                -p * part / Decimal(1_000_000), period_of(a, tz), "export",
                                label))
    return segments


def price_now(config: BillingConfig, tariff_name: str, tz: ZoneInfo, ts_ms: int,
              spot: SpotPrices | None = None) -> Decimal | None:
    """The tariff's energy price per kWh at a moment (a tiered tariff: its first band; at
    spot, None when the price file has none), without grid charges."""
    return _priced_at(config.tariffs[tariff_name], tz, ts_ms, spot)[0]


def price_held(config: BillingConfig, tariff_name: str, tz: ZoneInfo, kind: str, t0: int,
               t1: int, mwh: int, spot: SpotPrices | None) -> Segment | None:
    """A piece held for want of a spot price (one piece: no cut inside it), priced now, or
    None while the price file still lacks it. Its grid charge was priced when it was read."""
    if kind == "export":
        segs = credit(config, tariff_name, tz, t0, t1, mwh, spot)
        return segs[0] if len(segs) == 1 and segs[0].price is not None else None
    p, label = _priced_at(config.tariffs[tariff_name], tz, t0, spot)
    if p is None:
        return None
    return Segment(t0, t1, mwh, p, p * mwh / Decimal(1_000_000), period_of(t0, tz), "energy",
                   label)
