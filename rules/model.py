"""The rule file's schema (strict: unknown keys are errors)."""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from citygrid.holidays import NAMES as HOLIDAY_NAMES
from rules.expr import parse_duration

PRIORITIES = ("override", "safety", "sensor", "program", "default")
SEVERITIES = ("info", "minor", "major", "critical")
SUN_EVENTS = ("sunrise", "sunset", "civil_dawn", "civil_dusk", "nautical_dawn", "nautical_dusk")
_TIME = re.compile(r"^(?:(?P<hh>[01]\d|2[0-3]):(?P<mm>[0-5]\d)|(?P<sun>[a-z_]+))"
                   r"(?:\s*(?P<sign>[+-])\s*(?P<off>[\d.smhd ]+))?$")

_STRICT = ConfigDict(extra="forbid", frozen=True)
def _duration(value: Any) -> Any:
    parse_duration(value)  # raises ValueError with what a duration looks like
    return value


Duration = Annotated[str | int | float, AfterValidator(_duration),
                     Field(description="e.g. 90s, 5m, 1h30m (or seconds)")]


class _Model(BaseModel):
    model_config = _STRICT


class Select(_Model):
    """Which devices: all conditions must hold; globs like ``sl-01*`` are allowed."""

    kind: Literal["streetlight", "meter"] | None = None
    district: str | list[str] | None = None
    devices: list[str] | None = None
    road: Literal["arterial", "residential", "footpath", "park"] | list[
        Literal["arterial", "residential", "footpath", "park"]] | None = None
    cabinet: str | list[str] | None = None


class ReadingTrigger(Select):
    pass


class Schedule(_Model):
    """A daily window in the city's timezone: ``"23:00"``, ``"sunset"``, ``"sunrise+30m"``."""

    from_: Annotated[str, Field(alias="from")]
    to: str
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None
    select: Select = Field(default_factory=Select)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("from_", "to")
    @classmethod
    def _time(cls, value: str) -> str:
        return _event_time(value)


def _event_time(value: str) -> str:
    """``"23:00"``, ``"sunset"``, ``"sunrise+30m"`` (raises ValueError saying so)."""
    match = _TIME.match(value.strip())
    if not match or (match["sun"] and match["sun"] not in SUN_EVENTS):
        raise ValueError(f"{value!r} is not HH:MM or a sun event ({', '.join(SUN_EVENTS)}) "
                         "with an optional offset like sunset+30m")
    if match["off"]:
        parse_duration(match["off"].replace(" ", ""))
    return value.strip()


class Absence(_Model):
    """No reading from a selected device for ``for``."""

    for_: Annotated[Duration, Field(alias="for")]
    select: Select = Field(default_factory=Select)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class When(_Model):
    reading: ReadingTrigger | None = None
    schedule: Schedule | None = None
    absent: Absence | None = None

    @model_validator(mode="after")
    def _one(self) -> When:
        given = [k for k in ("reading", "schedule", "absent") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one trigger: reading, schedule or absent")
        return self


class SetLight(_Model):
    level: Annotated[float, Field(ge=0, le=100)]
    priority: Literal["safety", "sensor", "program", "default"] = "program"
    hold: Duration | None = None
    scope: Literal["self", "neighbours", "district"] = "self"
    radius_m: Annotated[float, Field(gt=0, le=1000)] = 60.0


class Alert(_Model):
    severity: Literal["info", "minor", "major", "critical"] = "minor"
    message: Annotated[str, Field(min_length=1, max_length=500)]
    per: Literal["device", "district"] = "device"


class Publish(_Model):
    topic: Annotated[str, Field(min_length=1)]
    payload: str | dict[str, Any]
    qos: Literal[0, 1] = 1
    retain: bool = False


class Settle(_Model):
    """Bill a meter's unbilled consumption (all of it, or only months that have ended)."""

    periods: Literal["all", "ended"] = "all"


class Action(_Model):
    set_light: SetLight | None = None
    alert: Alert | None = None
    publish: Publish | None = None
    settle: Settle | None = None

    @model_validator(mode="after")
    def _one(self) -> Action:
        given = [k for k in ("set_light", "alert", "publish", "settle")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each action is exactly one of set_light, alert, publish, settle")
        return self


class Rule(_Model):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    description: str | None = None
    when: When
    if_: Annotated[str | None, Field(alias="if", description="condition to become active")] = None
    clear_if: Annotated[str | None, Field(
        description="hysteresis: active until this holds (default: until `if` no longer holds)")
    ] = None
    for_: Annotated[Duration | None, Field(alias="for",
                                           description="how long `if` must hold first")] = None
    then: Annotated[list[Action], Field(min_length=1)]
    enabled: bool = True

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SafetyFloor(_Model):
    level: Annotated[float, Field(ge=0, le=100)] = 0
    when: str = "sun.elevation < -4"


class Cycling(_Model):
    """A lamp switched on (off → on, from its readings) ``switches`` times within ``within``."""

    switches: Annotated[int, Field(ge=2, le=1000)] = 6
    within: Duration = "30m"


class CabinetLoss(_Model):
    """A control cabinet has lost its supply when at least ``min_lights`` and ``share`` of its
    lights are dark at once: silent for ``silent_for`` or drawing ~0 W."""

    min_lights: Annotated[int, Field(ge=1, le=10_000)] = 3
    share: Annotated[float, Field(gt=0, le=1)] = 0.5
    silent_for: Duration = "3m"


class LampMonitor(_Model):
    """The lamp monitor (rules/lampmon.py): each light's readings against its lamp type —
    failure, power for the level, day-burning, cycling, cabinet supply loss — and its burning
    hours. Only a rule file with this block turns it on."""

    failure_for: Duration = "2m"
    failure_share: Annotated[float, Field(gt=0, lt=1, description=(
        "a light on that draws under this share of its expected power has failed"))] = 0.3
    power_for: Duration = "5m"
    day_burning_for: Duration = "15m"
    cycling: Cycling = Field(default_factory=Cycling)
    cabinet: CabinetLoss = Field(default_factory=CabinetLoss)


class Settings(_Model):
    safety_floor: SafetyFloor = Field(default_factory=SafetyFloor)
    default_level: Annotated[float, Field(ge=0, le=100)] = 0
    command_expiry: Duration = "60s"
    ack_timeout: Duration = "30s"
    co2_g_per_kwh: Annotated[float, Field(ge=0)] = 150.0
    lamp_loss: Annotated[float, Field(ge=0, le=1)] = 0.08
    lamp_monitor: LampMonitor | None = None


# --------------------------------------------------------------------------- lighting calendars
# Named programs (levels by clock or sun time) and the calendar saying which program each
# light gets on which day: rules/calendar.py compiles and runs them.

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class ProgramStep(_Model):
    """From ``at`` (clock or sun time, e.g. ``"23:00"``, ``sunset+10m``) the level is ``level``."""

    at: str
    level: Annotated[float, Field(ge=0, le=100)]

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1: 23:00 → 82800
            raise ValueError(f"{value!r}: write clock times in quotes, e.g. \"23:00\"")
        return _event_time(value) if isinstance(value, str) else value


def _in_order(steps: list[ProgramStep]) -> list[ProgramStep]:
    clock = [s.at for s in steps if s.at[:1].isdigit() and not any(c in s.at for c in "+-")]
    night = [(int(t[:2]) - 12) % 24 * 60 + int(t[3:5]) for t in clock]  # minutes from noon
    for i in range(1, len(clock)):
        if night[i] < night[i - 1]:
            raise ValueError(f"steps go in the order they happen in a night (noon to noon): "
                             f"{clock[i]!r} is listed after {clock[i - 1]!r}")
    return steps


Program = Annotated[list[ProgramStep], Field(min_length=1), AfterValidator(_in_order)]


class DateRange(_Model):
    from_: Annotated[date, Field(alias="from")]
    to: date

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _order(self) -> DateRange:
        if self.to < self.from_:
            raise ValueError(f"from {self.from_} is after to {self.to}: no day to match")
        return self


def _holidays(value: str | dict[str, list[str]]) -> str | dict[str, list[str]]:
    countries = [value] if isinstance(value, str) else list(value)
    for country in countries:
        if country not in HOLIDAY_NAMES:
            raise ValueError(f"no holidays known for {country!r}; known: "
                             f"{', '.join(HOLIDAY_NAMES)}")
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError("name one country: {dk: [juledag, juleaftensdag]}")
        for country, names in value.items():
            if not names:
                raise ValueError(f"no holiday named for {country}: nothing to match")
            unknown = [n for n in names if n not in HOLIDAY_NAMES[country]]
            if unknown:
                raise ValueError(f"{', '.join(map(repr, unknown))}: not a holiday of {country}; "
                                 f"known: {', '.join(HOLIDAY_NAMES[country])}")
    return value


Holidays = Annotated[str | dict[str, list[str]], AfterValidator(_holidays), Field(
    description="dk: the official Danish holidays; {dk: [juleaftensdag, …]}: these by name "
                "(customary days too)")]


class CalendarEntry(_Model):
    """Which program the lights it selects get on the days it matches (the first entry that
    matches a day and selects a light wins)."""

    name: Annotated[str, Field(pattern=_NAME)]
    description: str | None = None
    day: Annotated[date | None, Field(alias="date")] = None
    dates: DateRange | None = None
    weekdays: Annotated[list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None,
                        Field(min_length=1)] = None
    holidays: Holidays | None = None
    select: Select = Field(default_factory=Select)
    program: str | Program

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one(self) -> CalendarEntry:
        given = [k for k, v in (("date", self.day), ("dates", self.dates),
                                ("weekdays", self.weekdays), ("holidays", self.holidays))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of date, dates, weekdays, holidays "
                             f"(got {', '.join(given)}); none: every day")
        if self.select.kind == "meter":
            raise ValueError("a calendar sets streetlights: this entry selects meters only")
        return self


class RuleFile(_Model):
    version: Literal[1] = 1
    settings: Settings = Field(default_factory=Settings)
    rules: list[Rule] = Field(default_factory=list)
    programs: dict[Annotated[str, Field(pattern=_NAME)], Program] = Field(default_factory=dict)
    calendar: list[CalendarEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> RuleFile:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        return self
