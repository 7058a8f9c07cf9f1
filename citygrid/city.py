"""City profiles: where a city is, its timezone and its districts (CITYGRID_CITY)."""

from __future__ import annotations

from dataclasses import dataclass, field
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class District:
    slug: str
    lat: float
    lon: float
    radius_m: float
    character: str  # "downtown", "urban" or "suburban": how busy its streets are


@dataclass(frozen=True)
class CityProfile:
    name: str
    lat: float
    lon: float
    timezone: str
    districts: tuple[District, ...] = field(default=())
    # Monthly mean air temperature, °C, January first (for the simulator's weather).
    monthly_temp_c: tuple[float, ...] = (1, 1, 3, 7, 12, 15, 18, 18, 14, 10, 6, 3)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def district(self, slug: str) -> District:
        for d in self.districts:
            if d.slug == slug:
                return d
        raise KeyError(f"{self.name} has no district {slug!r}")


COPENHAGEN = CityProfile(
    "Copenhagen", 55.6761, 12.5683, "Europe/Copenhagen",
    (
        District("indre-by", 55.6800, 12.5790, 900, "downtown"),
        District("vesterbro", 55.6690, 12.5490, 900, "urban"),
        District("norrebro", 55.6960, 12.5440, 1000, "urban"),
        District("osterbro", 55.7100, 12.5750, 1100, "urban"),
        District("frederiksberg", 55.6790, 12.5240, 1100, "urban"),
        District("amager", 55.6560, 12.6010, 1400, "suburban"),
        District("sydhavn", 55.6490, 12.5370, 900, "suburban"),
        District("valby", 55.6620, 12.5030, 1300, "suburban"),
        District("vanlose", 55.6870, 12.4900, 1100, "suburban"),
        District("bispebjerg", 55.7120, 12.5330, 1100, "suburban"),
    ),
)

AARHUS = CityProfile(
    "Aarhus", 56.1567, 10.2108, "Europe/Copenhagen",
    (
        District("midtbyen", 56.1560, 10.2080, 900, "downtown"),
        District("trojborg", 56.1720, 10.2050, 900, "urban"),
        District("frederiksbjerg", 56.1460, 10.2060, 800, "urban"),
        District("viby", 56.1290, 10.1600, 1500, "suburban"),
    ),
    (1, 1, 3, 7, 11, 15, 17, 17, 13, 9, 5, 2),
)

CITIES = {"copenhagen": COPENHAGEN, "aarhus": AARHUS}


def city(name: str) -> CityProfile:
    try:
        return CITIES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown city {name!r}; known: {', '.join(sorted(CITIES))}") from None
