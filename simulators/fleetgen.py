"""Generate a city's fleet: lights along streets 25–40 m apart, meters in the districts."""

from __future__ import annotations

import math
import random

from citygrid.city import CityProfile, District
from citygrid.fleet import Fleet, FleetDevice

# How much street lighting a district has, relative to its area.
DENSITY = {"downtown": 3.0, "urban": 2.0, "suburban": 1.0}
SPACING_M = (25.0, 40.0)
BLOCK_M = (70.0, 130.0)  # distance between parallel streets
BUSINESS_SHARE = {"downtown": 0.45, "urban": 0.15, "suburban": 0.08}
TARIFFS = {"household": "household-tou", "business": "business-flat"}
MAX_POWER_W = {"household": 3 * 25 * 230.0, "business": 3 * 63 * 230.0}


def _to_latlon(district: District, x: float, y: float) -> tuple[float, float]:
    lat = district.lat + y / 111_320
    lon = district.lon + x / (111_320 * math.cos(math.radians(district.lat)))
    return round(lat, 7), round(lon, 7)  # ≈ 1 cm; what the GeoJSON file keeps


def _quotas(n: int, districts: tuple[District, ...]) -> list[int]:
    weights = [DENSITY[d.character] * d.radius_m ** 2 for d in districts]
    total = sum(weights)
    quotas = [int(n * w / total) for w in weights]
    for i in sorted(range(len(districts)), key=lambda i: -weights[i])[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _streetlights(district: District, count: int, rng: random.Random,
                  first: int) -> list[FleetDevice]:
    """Lay a street grid over the district (a random orientation) and walk along streets."""
    angle = rng.uniform(0, math.pi / 2)
    ux, uy = math.cos(angle), math.sin(angle)  # along one family of streets
    vx, vy = -uy, ux
    r = district.radius_m
    streets = []
    for family, (ax, ay, bx, by) in enumerate(((ux, uy, vx, vy), (vx, vy, ux, uy))):
        offset = -r + rng.uniform(0, BLOCK_M[1])
        while offset < r:
            streets.append((family, offset, ax, ay, bx, by))
            offset += rng.uniform(*BLOCK_M)
    rng.shuffle(streets)
    lights: list[FleetDevice] = []
    for s, (_, offset, ax, ay, bx, by) in enumerate(streets):
        if len(lights) >= count:
            break
        half = math.sqrt(max(r * r - offset * offset, 0))
        arterial = s % 4 == 0
        rated = rng.choice((90.0, 110.0, 120.0)) if arterial else rng.choice((30.0, 40.0, 55.0))
        t = -half + rng.uniform(0, SPACING_M[0])
        while t < half and len(lights) < count:
            x, y = ax * t + bx * offset, ay * t + by * offset
            lat, lon = _to_latlon(district, x, y)
            lights.append(FleetDevice(f"sl-{first + len(lights):05d}", "streetlight",
                                      district.slug, lat, lon, rated_w=rated,
                                      street=f"{district.slug}-s{s:02d}"))
            t += rng.uniform(*SPACING_M)
    if len(lights) < count:  # a small district asked for many lights: a second, offset grid
        more = _streetlights(district, count - len(lights), rng, first + len(lights))
        lights += more
    return lights


def _meters(district: District, count: int, rng: random.Random, first: int) -> list[FleetDevice]:
    meters = []
    for i in range(count):
        rho, phi = district.radius_m * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        lat, lon = _to_latlon(district, rho * math.cos(phi), rho * math.sin(phi))
        n = first + i
        profile = "business" if rng.random() < BUSINESS_SHARE[district.character] else "household"
        meters.append(FleetDevice(f"m-{n:05d}", "meter", district.slug, lat, lon,
                                  account_id=f"acc-{n:05d}", tariff=TARIFFS[profile],
                                  profile=profile, max_power_w=MAX_POWER_W[profile]))
    return meters


def generate(city: CityProfile, streetlights: int, meters: int, seed: int = 1) -> Fleet:
    """A reproducible fleet: the same arguments give the same file."""
    rng = random.Random(seed)
    devices: list[FleetDevice] = []
    n = 0
    for district, quota in zip(city.districts, _quotas(streetlights, city.districts),
                               strict=True):
        devices += _streetlights(district, quota, rng, n)
        n += quota
    n = 0
    for district, quota in zip(city.districts, _quotas(meters, city.districts), strict=True):
        devices += _meters(district, quota, rng, n)
        n += quota
    return Fleet(devices)
