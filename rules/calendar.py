"""Lighting calendars: named programs (levels by clock or sun time) and the calendar saying
which program each light gets on which day.

A *lighting day* runs from noon to noon: the night of 24 December, into the morning of the
25th, is the 24th's. A program's steps are placed on it: clock times from 12:00 on the day
itself and before 12:00 on the next; evening sun events (sunset, civil_dusk, nautical_dusk)
on the day, morning ones (sunrise, civil_dawn, nautical_dawn) on the next, the offset added
after (``sunrise-15m``: a quarter of an hour before that sunrise). Each step's time is rounded
to the minute; the level in force is that of the latest step at or before the moment, and
before the day's first step that of its last (a program is a daily cycle: typically
``sunrise: 0``). The last step ends the night: a step at or after it is left out (a 05:30
boost after a June sunrise), and a step that comes before the one listed above it takes
effect with it (see :func:`resolve`). A step whose sun event does not happen that day is
left out.

For each streetlight, the first calendar entry that matches the lighting day and selects the
light wins; its program's level is a ``program``-class wish (``calendar@<light>``, reason
``calendar:<entry>/<program>``), so motion, safety and overrides still win over it.

The engine asks :class:`CalendarRunner` only when its next change is due (a step, or noon):
nothing per reading, and a wish only on the lights whose calendar level changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from citygrid import holidays
from citygrid.fleet import FleetDevice
from rules.arbitration import Wish
from rules.context import selects
from rules.model import WEEKDAYS, CalendarEntry, ProgramStep

if TYPE_CHECKING:
    from rules.engine import RuleEngine
    from rules.schedules import CityTime

DAY_STARTS_H = 12  # a lighting day runs noon to noon
_MORNING = ("sunrise", "civil_dawn", "nautical_dawn")
_NEVER = float("inf")
_SUN = re.compile(r"[a-z_]+")


@dataclass(frozen=True)
class Program:
    name: str  # a name from `programs:`, or the entry's own name for an inline program
    steps: tuple[ProgramStep, ...]
    inline: bool = False


@dataclass(frozen=True)
class Entry:
    spec: CalendarEntry
    program: Program
    source: str = ""  # the rule file

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def reason(self) -> str:
        if self.program.inline:
            return f"calendar:{self.name}"
        return f"calendar:{self.name}/{self.program.name}"

    def matches(self, day: date) -> tuple[bool, holidays.Holiday | None]:
        """Does the entry match the lighting day ``day`` (and which holiday made it)?"""
        spec = self.spec
        if spec.day is not None:
            return day == spec.day, None
        if spec.dates is not None:
            return spec.dates.from_ <= day <= spec.dates.to, None
        if spec.weekdays is not None:
            return WEEKDAYS[day.weekday()] in spec.weekdays, None
        if spec.holidays is not None:
            if isinstance(spec.holidays, str):
                holiday = holidays.on(day, spec.holidays)
            else:
                (country, names), = spec.holidays.items()
                holiday = holidays.on(day, country, frozenset(names))
            return holiday is not None, holiday
        return True, None

    def when(self) -> str:
        """What days it matches, in words."""
        spec = self.spec
        if spec.day is not None:
            return f"on {spec.day}"
        if spec.dates is not None:
            return f"from {spec.dates.from_} to {spec.dates.to}"
        if spec.weekdays is not None:
            return "on " + ", ".join(spec.weekdays)
        if spec.holidays is not None:
            if isinstance(spec.holidays, str):
                return f"on public holidays ({spec.holidays})"
            (country, names), = spec.holidays.items()
            return f"on {', '.join(names)} ({country})"
        return "every day"


@dataclass(frozen=True)
class Calendar:
    entries: tuple[Entry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def entry_for(self, device: FleetDevice, day: date
                  ) -> tuple[Entry, holidays.Holiday | None] | None:
        """The first entry matching ``day`` that selects ``device`` (a streetlight), if any."""
        if device.kind != "streetlight":
            return None
        for entry in self.entries:
            if selects(entry.spec.select, device):
                hit, holiday = entry.matches(day)
                if hit:
                    return entry, holiday
        return None

    def winners(self, devices: list[FleetDevice], day: date
                ) -> list[tuple[Entry, holidays.Holiday | None, list[FleetDevice]]]:
        """The entries winning some of ``devices`` on ``day``, in calendar order, with them."""
        matching = []
        for entry in self.entries:
            hit, holiday = entry.matches(day)
            if hit:
                matching.append((entry, holiday, []))
        for device in devices:
            if device.kind != "streetlight":
                continue
            for entry, _, won in matching:
                if selects(entry.spec.select, device):
                    won.append(device)
                    break
        return [m for m in matching if m[2]]

    def matching(self, day: date) -> list[tuple[Entry, holidays.Holiday | None]]:
        """Every entry matching ``day`` (earlier ones take the lights they select first)."""
        out = []
        for entry in self.entries:
            hit, holiday = entry.matches(day)
            if hit:
                out.append((entry, holiday))
        return out


def compile_calendar(entries: list[CalendarEntry], programs: dict[str, list[ProgramStep]],
                     source: str = "") -> Calendar:
    """The calendar of one rule file (every program it names is known: the loader checked)."""
    out = []
    for spec in entries:
        if isinstance(spec.program, str):
            program = Program(spec.program, tuple(programs[spec.program]))
        else:
            program = Program(spec.name, tuple(spec.program), inline=True)
        out.append(Entry(spec, program, source))
    return Calendar(tuple(out))


# --------------------------------------------------------------------------- time


def lighting_day(local: datetime) -> date:
    """The lighting day a local time belongs to (noon to noon)."""
    return (local - timedelta(hours=DAY_STARTS_H)).date()


def day_bounds_ms(city_time: CityTime, day: date) -> tuple[int, int]:
    """When the lighting day begins and ends (noon local time, DST included), in ms."""
    tz = city_time.city.tz
    start = datetime(day.year, day.month, day.day, DAY_STARTS_H, tzinfo=tz)
    nxt = day + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, DAY_STARTS_H, tzinfo=tz)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


@dataclass(frozen=True)
class ResolvedStep:
    at_ms: int
    level: float
    at: str  # as written: "sunset+10m"

    def local(self, city_time: CityTime) -> datetime:
        return city_time.local_time(self.at_ms)


def resolve(program: Program, day: date, city_time: CityTime) -> list[ResolvedStep]:
    """The program's steps on the lighting day ``day``, each to the minute, in the order
    listed: a step at or after the last one (the night's end: a 05:30 boost after a summer
    sunrise) is left out, and one that falls before the step above it takes effect with it
    (a summer sunset+10m after 22:00: the 22:00 level from then on)."""
    steps = []
    for step in program.steps:
        if step.at[:1].isdigit():  # HH:MM
            on = day if int(step.at[:2]) >= DAY_STARTS_H else day + timedelta(days=1)
        else:
            on = day + timedelta(days=1) if _SUN.match(step.at)[0] in _MORNING else day
        when = city_time.event_time(step.at, on)
        if when is not None:
            steps.append(ResolvedStep(round(when.timestamp() / 60) * 60_000, step.level,
                                      step.at))
    if len(steps) > 1:
        end = steps[-1].at_ms
        steps = [s for s in steps[:-1] if s.at_ms < end] + [steps[-1]]
    for i in range(1, len(steps)):
        if steps[i].at_ms < steps[i - 1].at_ms:
            steps[i] = ResolvedStep(steps[i - 1].at_ms, steps[i].level, steps[i].at)
    return steps


def level_at(steps: list[ResolvedStep], now_ms: int) -> tuple[float, int] | None:
    """The level in force at ``now_ms`` and the index of the step it comes from (the last
    step's before the first)."""
    if not steps:
        return None
    index = len(steps) - 1
    for i, step in enumerate(steps):
        if step.at_ms <= now_ms:
            index = i
        else:
            break
    return steps[index].level, index


# --------------------------------------------------------------------------- the engine's part


@dataclass
class _Group:
    """The lights one entry wins on the current lighting day."""

    entry: Entry
    holiday: holidays.Holiday | None
    steps: list[ResolvedStep]
    lights: list[tuple[str, str]] = field(default_factory=list)  # (device id, wish key)
    level: float | None = None


def wish_key(device_id: str) -> str:
    return f"calendar@{device_id}"


class CalendarRunner:
    """The calendar inside a :class:`RuleEngine`: :meth:`run` when ``next_ms`` is due."""

    def __init__(self, engine: RuleEngine):
        self.engine = engine
        self.next_ms: float = _NEVER
        self.log: list[dict[str, Any]] | None = None  # a backtest's record of the steps
        self._day: date | None = None
        self._groups: list[_Group] = []
        self._wished: dict[str, tuple[float, str]] = {}  # device id → (level, reason)

    def reset(self) -> None:
        """The rules, the fleet or the partition changed: every light is placed anew at the
        next event time (wishes stay until then)."""
        self._day = None
        self.next_ms = 0

    def run(self, now_ms: int) -> None:
        engine = self.engine
        city_time = engine.city_time
        day = lighting_day(city_time.local_time(now_ms))
        if day != self._day:
            self._assign(day)  # (also withdraws what a calendar no longer there wished)
        if not engine.ruleset.calendar:
            self.next_ms = _NEVER  # until the rules change
            return
        next_ms = day_bounds_ms(city_time, day)[1]
        for group in self._groups:
            found = level_at(group.steps, now_ms)
            if found is None:
                continue
            level, index = found
            later = next((s.at_ms for s in group.steps if s.at_ms > now_ms), None)
            if later is not None and later < next_ms:
                next_ms = later
            if level == group.level:
                continue
            group.level = level
            reason = group.entry.reason
            changed = 0
            for device_id, key in group.lights:
                if self._wished.get(device_id) != (level, reason):
                    self._wished[device_id] = (level, reason)
                    engine.wish(device_id, Wish(key, "program", level, reason, None, now_ms))
                    changed += 1
            if self.log is not None and changed:
                self.log.append({"ts_ms": now_ms, "entry": group.entry.name,
                                 "program": group.entry.program.name, "level": level,
                                 "lights": changed, "reason": reason})
        self.next_ms = next_ms

    def _assign(self, day: date) -> None:
        """Which entry wins each own streetlight on ``day``; the wishes of lights no entry
        wins any more are withdrawn."""
        engine = self.engine
        self._day = day
        # What stands now (restored state included), so that nothing is wished twice.
        self._wished = {}
        for device_id, state in engine.lights.items():
            w = state.wishes.get(wish_key(device_id))
            if w is not None:
                self._wished[device_id] = (w.level, w.reason)
        lights = [d for d in engine.fleet if d.kind == "streetlight" and engine.owns(d)]
        self._groups = [_Group(entry, holiday, resolve(entry.program, day, engine.city_time),
                               [(d.device_id, wish_key(d.device_id)) for d in won])
                        for entry, holiday, won in engine.ruleset.calendar.winners(lights, day)]
        placed = {d for g in self._groups for d, _ in g.lights}
        for device_id in [d for d in self._wished if d not in placed]:
            del self._wished[device_id]
            if device_id in engine.fleet.by_id:
                engine.withdraw(device_id, wish_key(device_id))


def explain_light(engine: RuleEngine, device_id: str, now_ms: int) -> dict[str, Any] | None:
    """Which entry and program the light gets at ``now_ms``, and the program's steps that
    lighting day with their local times (None: no entry wins it)."""
    device = engine.fleet.by_id.get(device_id)
    calendar = engine.ruleset.calendar
    if device is None or not calendar:
        return None
    city_time = engine.city_time
    day = lighting_day(city_time.local_time(now_ms))
    found = calendar.entry_for(device, day)
    if found is None:
        return {"day": day.isoformat(), "entry": None}
    entry, holiday = found
    steps = resolve(entry.program, day, city_time)
    now = level_at(steps, now_ms)
    return {
        "day": day.isoformat(), "entry": entry.name, "program": entry.program.name,
        "inline": entry.program.inline, "reason": entry.reason,
        "holiday": holiday.title if holiday else None,
        "level": now[0] if now else None,
        "steps": [{"at": s.at, "time": s.local(city_time).strftime("%H:%M"),
                   "at_ms": s.at_ms, "level": s.level, "in_force": now is not None
                   and i == now[1]} for i, s in enumerate(steps)],
    }


def _select_text(entry: Entry) -> str:
    given = {k: v for k, v in entry.spec.select.model_dump().items() if v is not None}
    return "all lights" if not given else ", ".join(
        f"{k} {'/'.join(v) if isinstance(v, list) else v}" for k, v in given.items())


def show(calendar: Calendar, city_time: CityTime, day: date,
         fleet: list[FleetDevice] | None = None) -> list[str]:
    """``citygrid calendar show``: per entry that wins lights on ``day`` (with a fleet: wins
    some; without: matches the day), its program's steps at their local times."""
    lines = []
    start, end = day_bounds_ms(city_time, day)
    fmt = "%a %d %b %H:%M"
    lines.append(f"lighting day {day.isoformat()} ({day.strftime('%A')}): "
                 f"{city_time.local_time(start).strftime(fmt)} → "
                 f"{city_time.local_time(end).strftime(fmt)} {city_time.city.timezone}")
    if not calendar:
        return [*lines, "no calendar in these rules"]
    if fleet is not None:
        lights = [d for d in fleet if d.kind == "streetlight"]
        winners = [(e, h, len(won)) for e, h, won in calendar.winners(lights, day)]
        unplaced = len(lights) - sum(n for _, _, n in winners)
    else:
        winners = []
        for e, h in calendar.matching(day):
            winners.append((e, h, None))
            if _select_text(e) == "all lights":
                break  # it takes every light left: no entry below wins any
        unplaced = None
    if not winners:
        lines.append("no calendar entry matches this day")
    for entry, holiday, count in winners:
        program = "inline program" if entry.program.inline else f"program {entry.program.name}"
        who = (f"{count} light{'s' * (count != 1)}" if count is not None else
               f"{_select_text(entry)} (those no entry above takes)")
        lines.append("")
        lines.append(f"{entry.name}: {program} — {who}")
        lines.append(f"  matches {entry.when()}"
                     + (f": {holiday.title}" if holiday is not None else "")
                     + (f"; selects {_select_text(entry)}" if count is not None else ""))
        for step in resolve(entry.program, day, city_time):
            local = step.local(city_time)
            lines.append(f"  {local.strftime('%a %H:%M')}  {step.level:>5g} %  ({step.at})")
    if unplaced:
        lines.append("")
        lines.append(f"{unplaced} light{'s' * (unplaced != 1)} no entry takes: the rules "
                     "alone set them")
    return lines
