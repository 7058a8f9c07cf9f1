"""The sun's position and events for a place and a time (NOAA's solar equations).

Accurate to about a minute for sunrise/sunset at Copenhagen's latitude, which is
what lighting schedules and the simulator's ambient light need.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

# Sun events by the elevation of the sun's centre, degrees (refraction included for the horizon).
EVENTS = {
    "sunrise": -0.833, "sunset": -0.833,
    "civil_dawn": -6.0, "civil_dusk": -6.0,
    "nautical_dawn": -12.0, "nautical_dusk": -12.0,
}
_RISING = {"sunrise", "civil_dawn", "nautical_dawn"}


def _julian_century(when: datetime) -> float:
    jd = when.timestamp() / 86400.0 + 2440587.5
    return (jd - 2451545.0) / 36525.0


def _declination_and_eot(t: float) -> tuple[float, float]:
    """Solar declination (radians) and the equation of time (minutes)."""
    l0 = math.radians((280.46646 + t * (36000.76983 + 0.0003032 * t)) % 360)
    m = math.radians(357.52911 + t * (35999.05029 - 0.0001537 * t))
    e = 0.016708634 - t * (0.000042037 + 0.0000001267 * t)
    c = (math.sin(m) * (1.914602 - t * (0.004817 + 0.000014 * t))
         + math.sin(2 * m) * (0.019993 - 0.000101 * t) + math.sin(3 * m) * 0.000289)
    true_long = l0 + math.radians(c)
    omega = math.radians(125.04 - 1934.136 * t)
    apparent = true_long - math.radians(0.00569 + 0.00478 * math.sin(omega))
    obliquity = math.radians(23 + (26 + (21.448 - t * (46.815 + t * (0.00059 - t * 0.001813)))
                                   / 60) / 60 + 0.00256 * math.cos(omega))
    declination = math.asin(math.sin(obliquity) * math.sin(apparent))
    y = math.tan(obliquity / 2) ** 2
    eot = 4 * math.degrees(
        y * math.sin(2 * l0) - 2 * e * math.sin(m) + 4 * e * y * math.sin(m) * math.cos(2 * l0)
        - 0.5 * y * y * math.sin(4 * l0) - 1.25 * e * e * math.sin(2 * m))
    return declination, eot


def elevation(lat: float, lon: float, when: datetime) -> float:
    """The sun's elevation above the horizon in degrees (negative below), no refraction."""
    when = when.astimezone(UTC)
    declination, eot = _declination_and_eot(_julian_century(when))
    minutes = when.hour * 60 + when.minute + when.second / 60 + when.microsecond / 6e7
    true_solar = (minutes + eot + 4 * lon) % 1440
    hour_angle = math.radians(true_solar / 4 - 180)
    phi = math.radians(lat)
    cos_zenith = (math.sin(phi) * math.sin(declination)
                  + math.cos(phi) * math.cos(declination) * math.cos(hour_angle))
    return 90 - math.degrees(math.acos(max(-1.0, min(1.0, cos_zenith))))


def event(name: str, lat: float, lon: float, day: date) -> datetime | None:
    """When ``name`` (sunrise, sunset, civil_dusk, …) happens on ``day`` (UTC), or None.

    None when the sun never crosses that elevation that day (polar summer/winter).
    """
    target = EVENTS[name]
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC) - timedelta(minutes=4 * lon)
    declination, eot = _declination_and_eot(_julian_century(noon))
    noon -= timedelta(minutes=eot)
    phi = math.radians(lat)
    cos_h = ((math.sin(math.radians(target)) - math.sin(phi) * math.sin(declination))
             / (math.cos(phi) * math.cos(declination)))
    if not -1 <= cos_h <= 1:
        return None
    offset = timedelta(minutes=4 * math.degrees(math.acos(cos_h)))
    guess = noon - offset if name in _RISING else noon + offset
    # One refinement with the declination at the event itself.
    declination, eot2 = _declination_and_eot(_julian_century(guess))
    cos_h = ((math.sin(math.radians(target)) - math.sin(phi) * math.sin(declination))
             / (math.cos(phi) * math.cos(declination)))
    if not -1 <= cos_h <= 1:
        return None
    noon += timedelta(minutes=eot - eot2)
    offset = timedelta(minutes=4 * math.degrees(math.acos(cos_h)))
    return noon - offset if name in _RISING else noon + offset


def ambient_lux(elevation_deg: float, cloud: float = 0.0) -> float:
    """Horizontal illuminance outdoors, lx, from the sun's elevation; ``cloud`` 0 (clear)…1.

    Daylight ≈ 128,000 lx × sin(elevation) through the air mass, twilight falls from
    ~400 lx at the horizon to ~3 lx at civil dusk, night is moonlight and sky glow.
    """
    attenuation = 1.0 - 0.75 * max(0.0, min(1.0, cloud))
    if elevation_deg > 0:
        s = math.sin(math.radians(elevation_deg))
        air_mass = 1 / max(s, 0.05)
        return 128_000 * s * math.exp(-0.1 * air_mass) * attenuation + 400 * attenuation
    if elevation_deg > -6:
        return 400 * 10 ** (elevation_deg / 6 * math.log10(400 / 3)) * attenuation
    if elevation_deg > -12:
        return 3 * 10 ** ((elevation_deg + 6) / 6 * 1.5) * attenuation + 0.05
    return 0.05 + 0.05 * (1 - cloud)
