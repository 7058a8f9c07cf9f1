"""The lamp monitor (in the manner of TALQ's): each streetlight's readings against its lamp type
(citygrid/lamps.py) — the lamp failed, draws too little or too much for its level, burns by
day, switches on and off too often, or its control cabinet lost its supply — and its burning
hours, switch-ons and the life that remains.

Opt-in per rule file (``settings.lamp_monitor``, rules/model.py): without it the engine hands
it no reading and it raises nothing. It is owned by the engine (``engine.lamps``) and raises
its alerts through the engine's :class:`rules.alerts.Alerts`, keyed ``lamp-fault@sl-00012``,
``cabinet-supply-loss@cab-norrebro-03``, so they reach the state, the status page and
Alertmanager as rule alerts do.

A reading costs a few dict look-ups and comparisons (the expected power and its band are
worked out once per level change); the cabinets are looked at once per 10 s of event time.
A check's ``for`` is counted from readings: an alert is raised by the first reading at least
``for`` after the condition began, and cleared by the first reading without it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from citygrid.fleet import FleetDevice
from citygrid.lamps import LampType, LampTypes
from rules.alerts import ACK_RULE
from rules.energy import MAX_GAP_MS
from rules.expr import parse_duration
from rules.snapshot import SavedLamp

if TYPE_CHECKING:
    from rules.engine import RuleEngine
    from rules.model import LampMonitor as Config

LAMP_FAULT, LAMP_POWER, DAY_BURNING, CYCLING, CABINET = (
    "lamp-fault", "lamp-power", "day-burning", "lamp-cycling", "cabinet-supply-loss")
ALERTS = (LAMP_FAULT, LAMP_POWER, DAY_BURNING, CYCLING, CABINET)
_SEVERITY = {LAMP_FAULT: "major", LAMP_POWER: "minor", DAY_BURNING: "minor", CYCLING: "minor",
             CABINET: "critical"}
_BIT = {LAMP_FAULT: 1, LAMP_POWER: 2, DAY_BURNING: 4, CYCLING: 8}
CABINET_EVERY_MS = 10_000
DARK_W = 0.1  # "drawing ~0 W": no supply (a lamp type with a lower standby: half of that)
_NUMBER = (int, float)
DEFAULT_SHARE = 0.3  # rules/model.py's failure_share
# Burning time is saved each 5 minutes burnt (10,000 lights: 33 rows a second, not 167), and
# all of it when the engine stops (settle); a crash loses less than that.
SAVE_BURNT_MS = 300_000


class _Lamp:
    """One light's lamp: its type, what its last reading said, its counters and checks."""

    __slots__ = ("device", "type", "level", "warm_ms", "expected", "fail_below", "lo", "hi",
                 "standby_hi", "dark_below", "power", "lit", "last_ts", "burning_ms", "saved_ms",
                 "switch_ons", "replaced_ms", "switches", "fault_since", "power_since",
                 "day_since", "raised", "suppressed")

    def __init__(self, device: FleetDevice, lamp_type: LampType):
        self.device = device
        self.level: float | None = None
        self.warm_ms = 0  # when the warm-up after the last level change is over
        self.expected = self.fail_below = self.lo = self.hi = 0.0
        self.retype(lamp_type, DEFAULT_SHARE)
        self.power: float | None = None
        self.lit = False
        self.last_ts: int | None = None
        self.burning_ms = 0
        self.saved_ms = 0  # the burning time as last saved
        self.switch_ons = 0
        self.replaced_ms: int | None = None
        self.switches: deque[int] | None = None  # switch-on times within the cycling window
        self.fault_since: int | None = None
        self.power_since: int | None = None
        self.day_since: int | None = None
        self.raised = 0  # the bits (_BIT) of its alerts that stand
        self.suppressed = False  # its cabinet lost its supply: no lamp alarms

    def retype(self, lamp_type: LampType, failure_share: float) -> None:
        self.type = lamp_type
        self.standby_hi = lamp_type.standby_w * (1 + lamp_type.tolerance_pct / 100)
        self.dark_below = min(DARK_W, lamp_type.standby_w / 2)
        if self.level is not None:
            self.at_level(self.level, failure_share)

    def at_level(self, level: float, failure_share: float) -> None:
        """What the lamp should draw at ``level``, once per level change."""
        t = self.type
        self.level = level
        expected = self.expected = t.expected_w(level)
        tolerance = expected * t.tolerance_pct / 100
        self.lo, self.hi = expected - tolerance, expected + tolerance
        # Under a share of the expected power, or near standby where that is well below the
        # band (a deeply dimmed lamp's share can be under its standby).
        self.fail_below = max(failure_share * expected,
                              self.standby_hi if self.standby_hi < self.lo else 0.0)

    def saved(self) -> SavedLamp:
        return SavedLamp(self.type.name, self.type.rated_life_h, self.burning_ms,
                         self.switch_ons, self.replaced_ms)


@dataclass(frozen=True)
class _Limits:
    """The rule file's ``settings.lamp_monitor``, its durations in ms."""

    failure_ms: int
    failure_share: float
    power_ms: int
    day_ms: int
    switches: int
    within_ms: int
    min_lights: int
    share: float
    silent_ms: int

    @classmethod
    def of(cls, c: Config) -> _Limits:
        ms = lambda d: int(parse_duration(d) * 1000)  # noqa: E731
        return cls(ms(c.failure_for), c.failure_share, ms(c.power_for), ms(c.day_burning_for),
                   c.cycling.switches, ms(c.cycling.within), c.cabinet.min_lights,
                   c.cabinet.share, ms(c.cabinet.silent_for))


class LampMonitor:
    def __init__(self, engine: RuleEngine, lamp_types: LampTypes):
        self.engine = engine
        self.types = lamp_types
        self.lamps: dict[str, _Lamp] = {}
        self.dirty: set[str] = set()  # lamps whose counters changed since the last snapshot
        self.limits: _Limits | None = None
        self.down: set[str] = set()  # cabinets whose supply-loss alarm stands
        self.sun_up = False  # the sun above the horizon at the last check (every 10 s)
        self._cabinets: dict[str, list[str]] = {}
        self._cabinets_of: tuple[Any, Any] | None = None  # (fleet, owned) they were built for
        self._next_check_ms = 0
        # The event time of the first cabinet check since the engine (re)started or the
        # monitor was turned on: a light not heard since counts as silent from then, not from
        # a watermark saved before a restart.
        self._first_check_ms: int | None = None

    @property
    def enabled(self) -> bool:
        return self.limits is not None

    def configure(self, config: Config | None) -> None:
        """The rule file's ``settings.lamp_monitor`` (None: off — its alerts clear)."""
        if self.limits is None:
            self._first_check_ms = None
        self.limits = None if config is None else _Limits.of(config)
        if config is None:
            self.clear_all(self.engine.watermark or 0)
        else:
            for lamp in self.lamps.values():
                if lamp.level is not None:
                    lamp.at_level(lamp.level, config.failure_share)

    def clear_all(self, now_ms: int) -> None:
        """Every alert of the monitor's clears (it was turned off)."""
        alerting = self.engine.alerting
        for key in [k for k, a in alerting.by_key.items() if a.active and a.rule_id in ALERTS]:
            alerting.clear(key, None, now_ms)
        for lamp in self.lamps.values():
            lamp.raised, lamp.suppressed = 0, False
            lamp.fault_since = lamp.power_since = lamp.day_since = None
        self.down.clear()

    # ------------------------------------------------------------------ lamps

    def _lamp(self, device: FleetDevice) -> _Lamp:
        """The light's lamp, made on its first reading (re-typed after a registry edit)."""
        lamp = self.lamps.get(device.device_id)
        if lamp is None:
            lamp = self.lamps[device.device_id] = _Lamp(device, self.types.for_device(device))
            self.dirty.add(device.device_id)
        elif lamp.device is not device:
            lamp.device = device
            lamp_type = self.types.for_device(device)
            if lamp_type is not lamp.type:
                share = self.limits.failure_share if self.limits else DEFAULT_SHARE
                lamp.retype(lamp_type, share)
                self.dirty.add(device.device_id)
        return lamp

    def forget(self, device_id: str) -> None:
        """The light is gone or another engine's: its lamp goes from memory (its row stays)."""
        self.lamps.pop(device_id, None)
        self.dirty.discard(device_id)

    def on_reading(self, device: FleetDevice, reading: dict[str, Any], ts: int) -> None:
        """An owned streetlight's reading (the engine calls this only while enabled)."""
        power, level = reading.get("power_w"), reading.get("brightness_pct")
        if not isinstance(power, _NUMBER) or not isinstance(level, _NUMBER):
            return  # power or level unmeasured, a motion event: nothing to check
        lamp = self.lamps.get(device.device_id)
        if lamp is None or lamp.device is not device:
            lamp = self._lamp(device)
        last = lamp.last_ts
        if last is not None:
            if ts <= last:
                return  # a duplicate or late reading: counted once, in order
            if lamp.lit and ts - last <= MAX_GAP_MS:  # lit since the last reading
                lamp.burning_ms += ts - last
                if lamp.burning_ms - lamp.saved_ms >= SAVE_BURNT_MS:
                    self.dirty.add(device.device_id)
        on = level > 0
        if level != lamp.level:
            if on and lamp.level is not None and lamp.level <= 0:
                self._switched_on(lamp, ts)
            lamp.at_level(level, self.limits.failure_share)
            lamp.warm_ms = ts + int(lamp.type.warmup_s * 1000)
        lamp.last_ts, lamp.power = ts, power
        # Failure and power are known only for a lamp on and past its warm-up (or one that
        # says it failed): otherwise their alerts stand and their `for` runs on.
        flagged = "fault" in reading and reading["fault"] == "lamp_failure"
        known = on and ts >= lamp.warm_ms
        if known and not flagged and lamp.lo <= power <= lamp.hi and \
                power >= lamp.fail_below and lamp.fault_since is None and \
                lamp.power_since is None and not lamp.raised & 3:
            lamp.lit = True  # burning as it should, nothing pending: the common case
        else:
            self._judge(lamp, power, ts, known, flagged)
        if lamp.day_since is not None or lamp.raised & 4 or (
                self.sun_up and (on or power > lamp.standby_hi)):
            day = (on or power > lamp.standby_hi) and self.sun_up and \
                self._unasked(device.device_id)
            lamp.day_since = self._check(lamp, DAY_BURNING, day, lamp.day_since, ts,
                                         self.limits.day_ms)
        if lamp.raised & 8:
            self._cycling(lamp, ts)

    def _judge(self, lamp: _Lamp, power: float, ts: int, known: bool, flagged: bool) -> None:
        """Failure and power for the level, when the common case (burning as it should,
        nothing pending) does not hold."""
        failed = flagged or (known and power < lamp.fail_below)
        lamp.lit = lamp.level > 0 and not failed
        if not (known or flagged) or lamp.suppressed:  # (no supply: the cabinet's alarm)
            return
        limits = self.limits
        if failed or lamp.fault_since is not None or lamp.raised & 1:
            lamp.fault_since = self._check(lamp, LAMP_FAULT, failed, lamp.fault_since, ts,
                                           limits.failure_ms)
        bad_power = known and not failed and not lamp.lo <= power <= lamp.hi
        if bad_power or lamp.power_since is not None or lamp.raised & 2:
            lamp.power_since = self._check(lamp, LAMP_POWER, bad_power, lamp.power_since, ts,
                                           limits.power_ms)

    def _unasked(self, device_id: str) -> bool:
        """Nothing asked for light: the engine's level for it is 0 (none yet: the default)."""
        state = self.engine.lights.get(device_id)
        level = state.level if state is not None and state.level is not None else \
            self.engine.default_level
        return level <= 0

    def _check(self, lamp: _Lamp, rule: str, holds: bool, since: int | None, ts: int,
               for_ms: int) -> int | None:
        """A check's ``for``: it begins, runs on, raises the alert; or the alert clears."""
        bit = _BIT[rule]
        if not holds:
            if lamp.raised & bit:
                self._clear(lamp, rule, ts)
            return None
        if since is None:
            since = ts
        if not lamp.raised & bit and ts - since >= for_ms:
            lamp.raised |= bit
            self.engine.alerting.raise_(f"{rule}@{lamp.device.device_id}", rule,
                                        _SEVERITY[rule], self._message(rule, lamp, ts),
                                        lamp.device.device_id, ts)
        return since

    def _clear(self, lamp: _Lamp, rule: str, ts: int) -> None:
        lamp.raised &= ~_BIT[rule]
        self.engine.alerting.clear(f"{rule}@{lamp.device.device_id}", None, ts)

    def _switched_on(self, lamp: _Lamp, ts: int) -> None:
        lamp.switch_ons += 1
        self.dirty.add(lamp.device.device_id)
        if lamp.switches is None:
            lamp.switches = deque()
        lamp.switches.append(ts)
        if len(lamp.switches) >= self.limits.switches:
            self._cycling(lamp, ts)

    def _cycling(self, lamp: _Lamp, ts: int) -> None:
        """Switch-ons within the window: the cycling alert raised at ``switches``, cleared
        below."""
        q, limits = lamp.switches, self.limits
        while q and q[0] <= ts - limits.within_ms:
            q.popleft()
        if q and len(q) >= limits.switches:
            if not lamp.raised & 8:
                lamp.raised |= 8
                self.engine.alerting.raise_(f"{CYCLING}@{lamp.device.device_id}", CYCLING,
                                            _SEVERITY[CYCLING], self._message(CYCLING, lamp, ts),
                                            lamp.device.device_id, ts)
        elif lamp.raised & 8:
            self._clear(lamp, CYCLING, ts)

    def _message(self, rule: str, lamp: _Lamp, ts: int) -> str:
        d, t = lamp.device.device_id, lamp.type
        drawn = f"{d} draws {lamp.power:.1f} W at {lamp.level:g} %"
        should = f"its {t.name} should draw {lamp.expected:.1f} W ± {t.tolerance_pct:g} %"
        if rule == LAMP_FAULT:
            if not lamp.level or lamp.level <= 0:  # off: only its controller can tell
                return (f"{d} reports a lamp failure (fault: lamp_failure) while off; its "
                        f"{t.name} should draw {t.expected_w(100):.1f} W at 100 %")
            return f"{drawn}; {should}: the lamp has failed"
        if rule == LAMP_POWER:
            how = "too little" if lamp.power < lamp.lo else "too much"
            return f"{drawn}, {how}; {should} ({lamp.lo:.1f}–{lamp.hi:.1f} W)"
        if rule == DAY_BURNING:
            elevation = self.engine.city_time.sun_elevation(ts)
            return (f"{drawn} by day (sun {elevation:.0f}° up) though nothing asked for light "
                    f"(level 0 %); off it should draw {t.standby_w:.1f} W")
        limits = self.limits
        span = (ts - lamp.switches[0]) / 60_000
        return (f"{d} switched on {len(lamp.switches)} times in {span:.0f} min; at most "
                f"{limits.switches - 1} expected within {limits.within_ms / 60_000:g} min")

    # ------------------------------------------------------------------ cabinets

    def tick(self, now_ms: int) -> None:
        """Once per 10 s of event time: whether the sun is up, which cabinets have lost their
        supply."""
        if now_ms < self._next_check_ms or self.limits is None:
            return
        self._next_check_ms = now_ms - now_ms % CABINET_EVERY_MS + CABINET_EVERY_MS
        limits, engine = self.limits, self.engine
        self.sun_up = engine.city_time.sun_elevation(now_ms) > 0
        last_seen, lamps = engine.last_seen, self.lamps
        if self._first_check_ms is None:
            self._first_check_ms = now_ms
        start = self._first_check_ms
        for cabinet, ids in self.cabinets().items():
            silent = zero = 0
            for device_id in ids:
                seen = last_seen.get(device_id)
                if seen is None:
                    if device_id not in lamps:
                        continue  # never heard (a city with no devices yet): not known dark
                    seen = start  # heard before a restart, not since: silent from the start
                if now_ms - seen >= limits.silent_ms:
                    silent += 1
                else:
                    lamp = lamps.get(device_id)
                    if lamp is not None and lamp.power is not None and \
                            lamp.power < lamp.dark_below:
                        zero += 1
            dark = silent + zero
            down = dark >= limits.min_lights and dark >= limits.share * len(ids)
            if down and cabinet not in self.down:
                self._cabinet_down(cabinet, ids, silent, zero, now_ms)
            elif not down and cabinet in self.down:
                self._cabinet_back(cabinet, ids, now_ms)

    def cabinets(self) -> dict[str, list[str]]:
        """The engine's own streetlights by the cabinet that feeds them."""
        engine = self.engine
        key = (engine.fleet, engine.owned_districts)
        if self._cabinets_of is None or self._cabinets_of[0] is not key[0] or \
                self._cabinets_of[1] != key[1]:
            cabinets: dict[str, list[str]] = {}
            for d in engine.fleet:
                if d.kind == "streetlight" and d.cabinet and engine.owns(d):
                    cabinets.setdefault(d.cabinet, []).append(d.device_id)
            self._cabinets, self._cabinets_of = cabinets, key
            for cabinet in [c for c in self.down if c not in cabinets]:
                self.engine.alerting.clear(f"{CABINET}@{cabinet}", None, engine.watermark or 0)
                self.down.discard(cabinet)
        return self._cabinets

    def _cabinet_down(self, cabinet: str, ids: list[str], silent: int, zero: int,
                      now_ms: int) -> None:
        """One alarm for the cabinet; its lights' lamp alarms go while it stands."""
        self.down.add(cabinet)
        dark = " and ".join(p for p in (f"{silent} silent" if silent else "",
                                        f"{zero} drawing ~0 W" if zero else "") if p)
        limits = self.limits
        self.engine.alerting.raise_(
            f"{CABINET}@{cabinet}", CABINET, _SEVERITY[CABINET],
            f"Cabinet {cabinet} has lost its supply: {silent + zero} of its {len(ids)} lights "
            f"are dark ({dark}); at most {limits.min_lights - 1} or under "
            f"{limits.share * 100:g} % should be", cabinet, now_ms)
        for device_id in ids:
            # Commands its dark lights never answered are the cabinet's alarm, not theirs.
            self.engine.alerting.clear(f"{ACK_RULE}@{device_id}", None, now_ms)
            lamp = self.lamps.get(device_id)
            if lamp is None:
                continue
            lamp.suppressed = True
            lamp.fault_since = lamp.power_since = None
            for rule in (LAMP_FAULT, LAMP_POWER):
                if lamp.raised & _BIT[rule]:
                    self._clear(lamp, rule, now_ms)

    def cabinet_down(self, device_id: str) -> bool:
        """Is this light's cabinet without supply (its alarm standing)?"""
        if not self.down:
            return False
        device = self.engine.fleet.by_id.get(device_id)
        return device is not None and device.cabinet in self.down

    def _cabinet_back(self, cabinet: str, ids: list[str], now_ms: int) -> None:
        self.down.discard(cabinet)
        self.engine.alerting.clear(f"{CABINET}@{cabinet}", None, now_ms)
        for device_id in ids:
            lamp = self.lamps.get(device_id)
            if lamp is not None:
                lamp.suppressed = False

    # ------------------------------------------------------------------ replacement, state

    def replaced(self, device: FleetDevice, ts_ms: int) -> None:
        """A new lamp: its counters start again, its lamp alarms clear, its warm-up begins."""
        lamp = self._lamp(device)
        lamp.burning_ms, lamp.switch_ons, lamp.replaced_ms = 0, 0, ts_ms
        lamp.switches = None
        lamp.fault_since = lamp.power_since = None
        lamp.warm_ms = ts_ms + int(lamp.type.warmup_s * 1000)
        for rule in (LAMP_FAULT, LAMP_POWER):
            lamp.raised &= ~_BIT[rule]
            self.engine.alerting.clear(f"{rule}@{device.device_id}", None, ts_ms)
        self.dirty.add(device.device_id)

    def snapshot(self) -> dict[str, SavedLamp]:
        """The lamps whose counters changed since the last snapshot."""
        saved = {}
        for device_id in self.dirty:
            lamp = self.lamps.get(device_id)
            if lamp is not None:
                saved[device_id] = lamp.saved()
                lamp.saved_ms = lamp.burning_ms
        self.dirty.clear()
        return saved

    def settle(self) -> None:
        """The next snapshot has all the burning time so far (the engine stops)."""
        self.dirty.update(d for d, lamp in self.lamps.items() if lamp.burning_ms != lamp.saved_ms)

    def restore(self, saved: dict[str, SavedLamp]) -> None:
        """Counters saved before a restart, for the engine's own lights; and which of the
        monitor's restored alerts stand (off: they clear)."""
        engine = self.engine
        by_id = engine.fleet.by_id
        for device_id, s in saved.items():
            device = by_id.get(device_id)
            if device is None or device.kind != "streetlight" or not engine.owns(device):
                continue
            lamp = self._lamp(device)
            lamp.burning_ms, lamp.switch_ons, lamp.replaced_ms = (s.burning_ms, s.switch_ons,
                                                                  s.replaced_ms)
            lamp.saved_ms = s.burning_ms
            self.dirty.discard(device_id)
        if not self.enabled:
            self.clear_all(engine.watermark or 0)
            return
        for a in engine.alerting.by_key.values():
            if not a.active or a.rule_id not in ALERTS:
                continue
            if a.rule_id == CABINET:
                self.down.add(a.scope)
            elif (device := by_id.get(a.scope)) is not None and device.kind == "streetlight":
                lamp = self._lamp(device)
                lamp.raised |= _BIT[a.rule_id]
                self.dirty.discard(a.scope)
        for cabinet in self.down:
            for device_id in self.cabinets().get(cabinet, ()):
                if (device := by_id.get(device_id)) is not None:
                    self._lamp(device).suppressed = True
