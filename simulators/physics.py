"""What the world does to a device: daylight, people passing, weather, air, household load."""

from __future__ import annotations

import math
import random
from datetime import datetime

# People and cars passing a light, per minute, by local hour (weekday), per unit of busyness.
HOURLY_TRAFFIC = (0.30, 0.20, 0.10, 0.06, 0.08, 0.25, 0.90, 1.60, 1.80, 1.20, 1.00, 1.10,
                  1.20, 1.10, 1.10, 1.30, 1.70, 1.90, 1.60, 1.30, 1.10, 0.90, 0.70, 0.50)
WEEKEND_TRAFFIC = (0.60, 0.50, 0.35, 0.20, 0.10, 0.10, 0.20, 0.40, 0.70, 1.00, 1.20, 1.30,
                   1.30, 1.30, 1.30, 1.30, 1.30, 1.30, 1.30, 1.20, 1.10, 1.00, 0.90, 0.80)
BUSYNESS = {"downtown": 6.0, "urban": 3.0, "suburban": 1.0}


def _hourly(table: tuple[float, ...], hour: float) -> float:
    """Linear interpolation in an hour-of-day table."""
    h0 = int(hour) % 24
    f = hour - int(hour)
    return table[h0] * (1 - f) + table[(h0 + 1) % 24] * f


def traffic_per_min(local: datetime, character: str) -> float:
    hour = local.hour + local.minute / 60
    table = WEEKEND_TRAFFIC if local.weekday() >= 5 else HOURLY_TRAFFIC
    return _hourly(table, hour) * BUSYNESS[character]


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


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


def household_w(local: datetime, season: float, rng: random.Random) -> float:
    """A home: standby, breakfast, the evening peak; ``season`` 0 (summer) … 1 (winter)."""
    hour = local.hour + local.minute / 60
    weekend = local.weekday() >= 5
    morning = 7.0 if not weekend else 9.0
    w = 180 + 120 * season
    w += 700 * math.exp(-((hour - morning) ** 2) / 1.0)
    w += (1500 + 600 * season) * math.exp(-((hour - 19) ** 2) / 3.0)
    if weekend:
        w += 400 * math.exp(-((hour - 13) ** 2) / 6.0)
    if rng.random() < 0.04:  # a kettle, an oven, a washing machine
        w += rng.choice((2000, 1200, 2200))
    return max(60.0, w * rng.lognormvariate(0, 0.15))


def business_w(local: datetime, season: float, rng: random.Random) -> float:
    """A shop or office: open hours on weekdays, a skeleton load otherwise."""
    hour = local.hour + local.minute / 60
    open_now = local.weekday() < 5 and 8 <= hour < 17.5
    w = (6000 + 2500 * season) if open_now else (1200 + 500 * season)
    return max(200.0, w * rng.lognormvariate(0, 0.1))


def season(local: datetime) -> float:
    """0 in midsummer, 1 in midwinter (northern hemisphere)."""
    day = local.timetuple().tm_yday
    return (1 + math.cos((day - 10) / 365.25 * 2 * math.pi)) / 2
