"""Generate a city's fleet: lights along streets 25–40 m apart, meters in the districts.

Every street has a road class (``road``): one in four an arterial (90–120 W lamps), the others
residential streets, footpaths and park paths (30–55 W), in a mix that depends on the
district's character. Neighbouring lights along the streets share a control cabinet
(``cabinet``: ``cab-<district>-NN``, 15–40 lights each).
"""

from __future__ import annotations

import dataclasses
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
# The lamps of a road class (one is drawn per street) and, for the streets that are not
# arterials, the class by the street's number (s % 4 = 1, 2, 3; 0 is an arterial) and the
# district's character; a park's paths where s % 8 = 3 in the urban districts.
LAMPS_W = {"arterial": (90.0, 110.0, 120.0), "residential": (30.0, 40.0, 55.0),
           "footpath": (30.0, 30.0, 40.0), "park": (30.0, 40.0, 40.0)}
MINOR_ROADS = {"downtown": ("residential", "residential", "footpath"),
               "urban": ("residential", "residential", "footpath"),
               "suburban": ("residential", "residential", "park")}
CABINET_LIGHTS = (15, 40)


def road_of(street: int, character: str) -> str:
    """The road class of a district's street number ``street``."""
    if street % 4 == 0:
        return "arterial"
    if character == "urban" and street % 8 == 3:
        return "park"
    return MINOR_ROADS[character][street % 4 - 1]


def lamp_type(rated_w: float) -> str:
    return f"led-{rated_w:.0f}w"


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
    per_street = max(4, -(-count // 8))  # lights a street has at most
    for s, (_, offset, ax, ay, bx, by) in enumerate(streets):
        if len(lights) >= count:
            break
        half = math.sqrt(max(r * r - offset * offset, 0))
        road = road_of(s, district.character)
        rated = rng.choice(LAMPS_W[road])
        # A stretch of the street, so that a small fleet too has every kind of street.
        stretch = min(half, per_street * SPACING_M[1] / 2)
        t = rng.uniform(-half, half - 2 * stretch) + rng.uniform(0, SPACING_M[0])
        end, first_here = t + 2 * stretch, len(lights)
        while t < min(half, end) and len(lights) < count and \
                len(lights) - first_here < per_street:
            x, y = ax * t + bx * offset, ay * t + by * offset
            lat, lon = _to_latlon(district, x, y)
            lights.append(FleetDevice(f"sl-{first + len(lights):05d}", "streetlight",
                                      district.slug, lat, lon, rated_w=rated,
                                      street=f"{district.slug}-s{s:02d}", road=road,
                                      lamp_type=lamp_type(rated)))
            t += rng.uniform(*SPACING_M)
    if len(lights) < count:  # a small district asked for many lights: a second, offset grid
        more = _streetlights(district, count - len(lights), rng, first + len(lights))
        lights += more
    return lights


def _cabinets(district: District, lights: list[FleetDevice], seed: int) -> list[FleetDevice]:
    """Deal the lights, in the order they stand along the streets, into cabinets of 15–40
    (a generator of the district's own: the lights' places do not depend on it)."""
    rng = random.Random(f"cabinets-{seed}-{district.slug}")
    out: list[FleetDevice] = []
    n = 0
    while len(out) < len(lights):
        n += 1
        size, left = rng.randint(*CABINET_LIGHTS), len(lights) - len(out)
        if left - size < CABINET_LIGHTS[0]:  # no cabinet of a handful of lights at the end
            size = left if left <= CABINET_LIGHTS[1] else left // 2
        cabinet = f"cab-{district.slug}-{n:02d}"
        out += [dataclasses.replace(d, cabinet=cabinet) for d in lights[len(out):len(out) + size]]
    return out


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
        devices += _cabinets(district, _streetlights(district, quota, rng, n), seed)
        n += quota
    n = 0
    for district, quota in zip(city.districts, _quotas(meters, city.districts), strict=True):
        devices += _meters(district, quota, rng, n)
        n += quota
    return Fleet(devices)
