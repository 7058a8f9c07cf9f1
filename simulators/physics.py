"""What the world does to a device: daylight, people passing, weather, air, household load.

The per-reading parts are cheap by construction (the simulator's budget is a few µs a
reading): what depends only on the time is computed once per snapshot of the world
(``*_base_w``, the Poisson table of a mean), and a reading's noise is one look-up in a table
of standard normal quantiles (``NORMAL``, indexed by ``rng.getrandbits(NORMAL_BITS)``)
instead of ``random.gauss``: the same distribution within ±4 σ, quantised to 16,384 levels
(invisible once a value is rounded for the payload), at a seventh of the cost.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from datetime import datetime
from functools import lru_cache
from statistics import NormalDist

# Standard normal quantiles at (k + ½) / 2**NORMAL_BITS: ``NORMAL[rng.getrandbits(14)]`` is a
# draw from N(0, 1) (tails beyond ±4 σ cut, which no reading's noise needs).
NORMAL_BITS = 14
NORMAL_MASK = (1 << NORMAL_BITS) - 1
NORMAL: tuple[float, ...] = tuple(
    NormalDist().inv_cdf((k + 0.5) / (1 << NORMAL_BITS)) for k in range(1 << NORMAL_BITS))


def normal(rng: random.Random) -> float:
    """A standard normal draw (see ``NORMAL``)."""
    return NORMAL[rng.getrandbits(NORMAL_BITS)]


def lognormal(rng: random.Random, sigma: float) -> float:
    """A multiplicative noise factor: exp(N(0, sigma²)), median 1."""
    return math.exp(sigma * NORMAL[rng.getrandbits(NORMAL_BITS)])

# People, bicycles and cars passing a light, by road class and hour: a day's passings (both
# directions, every mode; a weekday) spread over the hours like the trips of a travel survey.
# The figures and where they come from: docs/demo-city.md.
#
# The hour-of-day shares: vehicle trips started per hour, a Wednesday and a Saturday (FHWA,
# Highway Statistics 2006, table NT-3, from the 2001 NHTS), from midnight.
WEEKDAY_TRIPS = (147, 82, 83, 36, 249, 639, 1607, 3893, 2994, 2294, 2600, 2967,
                 3166, 3032, 3321, 3888, 3959, 4377, 3746, 2819, 2061, 1559, 783, 381)
WEEKEND_TRIPS = (432, 185, 117, 62, 185, 270, 558, 1147, 2088, 2951, 4096, 4420,
                 4561, 4088, 4256, 4037, 3823, 3536, 3626, 2665, 2206, 1925, 1069, 772)
# Passings a day on a weekday, by road class (a Saturday has NT-3's Saturday/Wednesday ratio,
# 1.05). Arterial: a busy city street with its cycle tracks; residential: a local street well
# under the 1,000 vehicles a day of livability guidance, with its walkers; footpath and park:
# assumptions (no count found; docs/demo-city.md).
DAILY_PASSINGS = {"arterial": 15_000.0, "residential": 500.0, "footpath": 300.0,
                  "park": 200.0}
# Nobody crosses a park at 3 a.m. as they drive home: the park's night hours (22–06) carry a
# third of the survey's share (an assumption).
PARK_NIGHT = 1 / 3
# The district's character on top (downtown streets of a class are busier than suburban ones).
BUSYNESS = {"downtown": 1.5, "urban": 1.0, "suburban": 0.6}
ROADS = tuple(DAILY_PASSINGS)
DEFAULT_ROAD = "residential"  # a light whose road class is not known


def _per_minute(road: str, weekend: bool) -> tuple[float, ...]:
    def weights(trips: tuple[int, ...]) -> list[float]:
        return [t * (PARK_NIGHT if road == "park" and (h >= 22 or h < 6) else 1.0)
                for h, t in enumerate(trips)]

    shares = weights(WEEKEND_TRIPS if weekend else WEEKDAY_TRIPS)
    daily = DAILY_PASSINGS[road] * (sum(WEEKEND_TRIPS) / sum(WEEKDAY_TRIPS) if weekend else 1)
    return tuple(daily * w / sum(shares) / 60 for w in shares)


# Passings per minute by (road class, weekend) and local hour.
TRAFFIC = {(road, weekend): _per_minute(road, weekend)
           for road in DAILY_PASSINGS for weekend in (False, True)}


def _hourly(table: tuple[float, ...], hour: float) -> float:
    """Linear interpolation in an hour-of-day table."""
    h0 = int(hour) % 24
    f = hour - int(hour)
    return table[h0] * (1 - f) + table[(h0 + 1) % 24] * f


def traffic_per_min(local: datetime, character: str, road: str | None = None) -> float:
    """Passings a minute past a light of this road class in a district of this character."""
    hour = local.hour + local.minute / 60
    table = TRAFFIC[(road or DEFAULT_ROAD, local.weekday() >= 5)]
    return _hourly(table, hour) * BUSYNESS[character]


# Beyond this mean a Poisson count is drawn from its normal approximation.
POISSON_TABLE_MAX = 30.0


@lru_cache(maxsize=1024)
def poisson_cdf(mean: float) -> tuple[float, ...]:
    """P(X ≤ k) for k = 0, 1, … until 1 − 1e-12 (``bisect_right(cdf, u)`` draws X from a
    uniform u: one random number and a binary search, whatever the mean)."""
    p = math.exp(-mean)
    total, k, out = p, 0, [p]
    while total < 1 - 1e-12 and k < 200:
        k += 1
        p *= mean / k
        total += p
        out.append(total)
    return tuple(out)


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > POISSON_TABLE_MAX:
        return max(0, round(mean + math.sqrt(mean) * normal(rng)))
    return bisect_right(poisson_cdf(mean), rng.random())


def air_temp_c(local: datetime, monthly: tuple[float, ...], noise: float = 0.0) -> float:
    """Monthly mean plus a daily swing, coldest before dawn and warmest mid-afternoon."""
    day = local.timetuple().tm_yday
    month_f = (day / 365.25 * 12 - 0.5) % 12
    m0 = int(month_f)
    mean = monthly[m0] * (1 - (month_f - m0)) + monthly[(m0 + 1) % 12] * (month_f - m0)
    hour = local.hour + local.minute / 60
    return mean + 3.5 * math.cos((hour - 15) / 24 * 2 * math.pi) + noise


def rush(hour: float) -> float:
    """0…1: how much of the rush hour this is (peaks at 08:00 and 17:00)."""
    return max(math.exp(-((hour - 8) ** 2) / 2), math.exp(-((hour - 17) ** 2) / 2.5))


def no2_ugm3(local: datetime, character: str, noise: float) -> float:
    base = {"downtown": 25.0, "urban": 18.0, "suburban": 10.0}[character]
    return max(0.0, base * (1 + 1.4 * rush(local.hour + local.minute / 60)) + noise)


def pm25_ugm3(local: datetime, character: str, noise: float) -> float:
    base = {"downtown": 9.0, "urban": 7.0, "suburban": 5.0}[character]
    return max(0.0, base * (1 + 0.6 * rush(local.hour + local.minute / 60)) + noise)


APPLIANCE_CHANCE = 0.04  # per reading: a kettle, an oven, a washing machine switched on
APPLIANCES_W = (2000, 1200, 2200)
HOUSEHOLD_SIGMA, BUSINESS_SIGMA = 0.15, 0.1
HOUSEHOLD_MIN_W, BUSINESS_MIN_W = 60.0, 200.0


def household_base_w(local: datetime, season: float) -> float:
    """A home's typical load at this time: standby, breakfast, the evening peak; ``season``
    0 (summer) … 1 (winter). ``household_w`` adds a reading's appliances and noise."""
    hour = local.hour + local.minute / 60
    weekend = local.weekday() >= 5
    morning = 7.0 if not weekend else 9.0
    w = 180 + 120 * season
    w += 700 * math.exp(-((hour - morning) ** 2) / 1.0)
    w += (1500 + 600 * season) * math.exp(-((hour - 19) ** 2) / 3.0)
    if weekend:
        w += 400 * math.exp(-((hour - 13) ** 2) / 6.0)
    return w


def household_w(local: datetime, season: float, rng: random.Random,
                base: float | None = None) -> float:
    """A home's load for one reading (``base``: ``household_base_w`` if already known)."""
    w = household_base_w(local, season) if base is None else base
    if rng.random() < APPLIANCE_CHANCE:
        w += rng.choice(APPLIANCES_W)
    return max(HOUSEHOLD_MIN_W, w * lognormal(rng, HOUSEHOLD_SIGMA))


def business_base_w(local: datetime, season: float) -> float:
    """A shop or office: open hours on weekdays, a skeleton load otherwise."""
    hour = local.hour + local.minute / 60
    open_now = local.weekday() < 5 and 8 <= hour < 17.5
    return (6000 + 2500 * season) if open_now else (1200 + 500 * season)


def business_w(local: datetime, season: float, rng: random.Random,
               base: float | None = None) -> float:
    w = business_base_w(local, season) if base is None else base
    return max(BUSINESS_MIN_W, w * lognormal(rng, BUSINESS_SIGMA))


def season(local: datetime) -> float:
    """0 in midsummer, 1 in midwinter (northern hemisphere)."""
    day = local.timetuple().tm_yday
    return (1 + math.cos((day - 10) / 365.25 * 2 * math.pi)) / 2
