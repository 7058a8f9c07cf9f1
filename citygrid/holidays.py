"""Public holidays, a fact about the city: the Danish ones computed (Easter by the anonymous
Gregorian algorithm), and the customary days a city may name as well.

    >>> easter(2026)
    datetime.date(2026, 4, 5)
    >>> on(date(2026, 12, 25), "dk")
    Holiday(name='juledag', title='Juledag', official=True)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from functools import lru_cache
from typing import NamedTuple


class Holiday(NamedTuple):
    name: str  # what a rule file calls it: "2-juledag"
    title: str  # what people call it: "2. juledag"
    official: bool  # a public holiday (else a customary day, only when asked for by name)


def easter(year: int) -> date:
    """Easter Sunday (Western, Gregorian calendar): the anonymous Gregorian algorithm
    (Meeus/Jones/Butcher)."""
    a = year % 19
    b, c = divmod(year, 100)
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    ell = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * ell) // 451
    month, day = divmod(h + ell - 7 * m + 114, 31)
    return date(year, month, day + 1)


# Denmark: (name, title, official, the day from Easter Sunday or a fixed (month, day)).
_DK: tuple[tuple[str, str, bool, int | tuple[int, int]], ...] = (
    ("nytaarsdag", "Nytårsdag", True, (1, 1)),
    ("skaertorsdag", "Skærtorsdag", True, -3),
    ("langfredag", "Langfredag", True, -2),
    ("paaskedag", "Påskedag", True, 0),
    ("2-paaskedag", "2. påskedag", True, 1),
    ("store-bededag", "Store bededag", True, 26),  # the 4th Friday after Easter; until 2023
    ("kristi-himmelfartsdag", "Kristi himmelfartsdag", True, 39),
    ("pinsedag", "Pinsedag", True, 49),
    ("2-pinsedag", "2. pinsedag", True, 50),
    ("grundlovsdag", "Grundlovsdag", False, (6, 5)),
    ("juleaftensdag", "Juleaftensdag", False, (12, 24)),
    ("juledag", "Juledag", True, (12, 25)),
    ("2-juledag", "2. juledag", True, (12, 26)),
    ("nytaarsaftensdag", "Nytårsaftensdag", False, (12, 31)),
)
STORE_BEDEDAG_ABOLISHED = 2024  # law 2023-03-01: a working day from 2024 on


def _denmark(year: int) -> dict[date, Holiday]:
    sunday = easter(year)
    days = {}
    for name, title, official, when in _DK:
        if name == "store-bededag" and year >= STORE_BEDEDAG_ABOLISHED:
            continue
        day = date(year, *when) if isinstance(when, tuple) else sunday + timedelta(days=when)
        days[day] = Holiday(name, title, official)
    return days


# Countries by the code a rule file names them with.
COUNTRIES: dict[str, Callable[[int], dict[date, Holiday]]] = {"dk": _denmark}
NAMES: dict[str, tuple[str, ...]] = {"dk": tuple(x[0] for x in _DK)}


@lru_cache(maxsize=64)
def of_year(country: str, year: int) -> dict[date, Holiday]:
    """Every holiday and customary day of ``country`` in ``year``, by date."""
    try:
        return COUNTRIES[country](year)
    except KeyError:
        raise KeyError(f"no holidays known for {country!r}; known: "
                       f"{', '.join(sorted(COUNTRIES))}") from None


def on(day: date, country: str, names: frozenset[str] | None = None) -> Holiday | None:
    """The holiday on ``day``: an official one, or (``names`` given) one of those named,
    customary days included; None if there is none."""
    holiday = of_year(country, day.year).get(day)
    if holiday is None:
        return None
    if names is None:
        return holiday if holiday.official else None
    return holiday if holiday.name in names else None
