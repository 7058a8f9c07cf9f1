"""Rules driven by event time rather than by a reading: daily windows by the clock or the
sun (``from: sunset+30m, to: "23:00"``) and absences (no reading for ``for``); and the
city's sun and local time they are reckoned in."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

from citygrid import sun
from citygrid.city import CityProfile
from rules.context import Context
from rules.expr import EvalError, parse_duration
from rules.model import SUN_EVENTS, Schedule

if TYPE_CHECKING:
    from rules.engine import RuleEngine

SCHEDULE = "schedule"  # the source of a schedule rule's one instance
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_EVENT = re.compile(r"^(?:(\d\d):(\d\d)|([a-z_]+))(?:\s*([+-])\s*(.+))?$")


class CityTime:
    """The sun's elevation (in 10 s steps, cached) and local time in the city, and whether a
    daily window is open at an event time."""

    def __init__(self, city: CityProfile):
        self.city = city
        self._elevation = lru_cache(maxsize=8192)(self._elevation_bucket)
        self._last = (None, 0.0)  # (bucket, elevation): the one most readings ask for

    def _elevation_bucket(self, bucket: int) -> float:
        return sun.elevation(self.city.lat, self.city.lon,
                             datetime.fromtimestamp(bucket * 10, self.city.tz))

    def sun_elevation(self, ts_ms: int) -> float:
        bucket = ts_ms // 10_000
        last = self._last
        if last[0] == bucket:
            return last[1]
        value = self._elevation(bucket)
        self._last = (bucket, value)
        return value

    def local_time(self, ts_ms: int) -> datetime:
        return datetime.fromtimestamp(ts_ms / 1000, self.city.tz)

    def event_time(self, spec: str, day: date) -> datetime | None:
        """``"23:00"``, ``"sunset"``, ``"sunrise+30m"`` on ``day``; None if the sun does not
        rise or set that day."""
        match = _EVENT.match(spec)
        offset = timedelta(seconds=parse_duration(match[5].replace(" ", ""))) if match[5] else \
            timedelta()
        if match[4] == "-":
            offset = -offset
        if match[3]:
            assert match[3] in SUN_EVENTS
            when = sun.event(match[3], self.city.lat, self.city.lon, day)
            return None if when is None else when.astimezone(self.city.tz) + offset
        return datetime(day.year, day.month, day.day, int(match[1]), int(match[2]),
                        tzinfo=self.city.tz) + offset

    def in_window(self, schedule: Schedule, now_ms: int) -> bool:
        now = self.local_time(now_ms)
        for back in (1, 0):
            day = (now - timedelta(days=back)).date()
            if schedule.days and _DAYS[day.weekday()] not in schedule.days:
                continue
            start = self.event_time(schedule.from_, day)
            end = self.event_time(schedule.to, day)
            if start is None or end is None:
                continue
            if end <= start:
                end = self.event_time(schedule.to, day + timedelta(days=1))
                if end is None:
                    continue
            if start <= now < end:
                return True
        return False


def run_schedules(engine: RuleEngine, now_ms: int) -> None:
    """Each schedule rule fires when its window opens (and its ``if`` holds), and clears when
    it closes."""
    for rule in engine.schedule_rules:
        inside = engine.city_time.in_window(rule.rule.when.schedule, now_ms)
        try:
            holds = inside and (rule.condition is None or bool(rule.condition(
                Context(engine, now_ms))))
        except EvalError as e:
            if engine._owned_source(rule, SCHEDULE):  # one engine of several counts it
                engine.health[rule.id].errors += 1
                engine.health[rule.id].last_error = str(e)
            continue
        key = (rule.id, SCHEDULE)
        active = key in engine.instances and engine.instances[key].active
        if holds and not active:
            engine.new_instance(rule, SCHEDULE)
            engine.activate(rule, SCHEDULE, Context(engine, now_ms))
        elif active and not holds:
            engine.deactivate(rule, SCHEDULE, None, now_ms)


def run_absences(engine: RuleEngine, now_ms: int) -> None:
    """Each absence rule fires for a selected device silent for its ``for`` (counted from the
    engine's start for a device never heard); the device's next reading clears it."""
    for rule in engine.absence_rules:
        spec = rule.rule.when.absent
        limit = parse_duration(spec.for_) * 1000
        for device in engine.absence_devices(rule):  # those it selects, in fleet order
            seen = engine.last_seen.get(device.device_id, engine.started_ms or now_ms)
            key = (rule.id, device.device_id)
            if now_ms - seen >= limit and key not in engine.instances:
                engine.new_instance(rule, device.device_id)
                engine.activate(rule, device.device_id, Context(engine, now_ms, device))
