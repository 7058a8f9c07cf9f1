"""Simulated streetlights and meters: state, readings, commands and faults.

A device is driven by its ``tick(ts_ms, interval_s)``: it returns the payloads
to publish on its telemetry topic for that reading time (none while offline or
during a gap, two for a duplicate). Everything random comes from the device's
own generator, seeded from the run's ``--seed``, so a run is reproducible.

A streetlight's presence sensor reports like a real luminaire's: a detection publishes a full
reading at once (``motion: true``, ``motion_count`` the passings since the light's last
reading), then the sensor is blind for ``BLIND_MS`` (passings meanwhile are counted, not
reported); the periodic reading says what passed since the last reading. A reading plans the
detections of the interval ahead (``planned``, event time and count); the engine publishes
each at its time through ``motion_event``. Every reading, periodic or not, carries the
power drawn and the energy register integrated to its time, so whoever integrates power
between a light's readings (the rules' lighting energy) stays right.

Faults come two ways: at random (``--fault NAME=RATE``, a chance per reading) and injected
on a named device at a given time (``inject``: ``--inject``, what `citygrid up` uses).

A reading costs a few µs (the load generator's budget, ``bench/simulator.py``): what
depends only on the time is in the world's snapshot (daylight, traffic, weather, air, the
load profiles), noise is a table look-up (``physics.NORMAL``), and the payload is one
``bytes`` template — the contract's fields in the order ``orjson`` would write them, the
values rounded by the format (``%.2f`` is ``round(x, 2)``, digits and all).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson

from citygrid import contract, sun
from citygrid.city import CityProfile
from citygrid.contract import ContractError, Topic
from citygrid.fleet import FleetDevice
from simulators import physics

STREETLIGHT_FAULTS = ("lamp_failure", "stuck_sensor", "offline")
# Injected on a named light (or a cabinet's lights) at a time: ``SimDevice.inject``.
INJECTED_FAULTS = ("lamp_failure", "day_burner", "wrong_power", "cabinet_outage", "offline")
WRONG_POWER = 1.6  # a wrong_power lamp draws this times what its level should
BLIND_MS = 30_000  # a presence sensor's blind time after a detection (re-trigger)
METER_FAULTS = ("offline", "duplicate", "out_of_order", "reset", "spike", "gap")
FAULTS = tuple(dict.fromkeys(STREETLIGHT_FAULTS + METER_FAULTS))
STANDBY_W = 0.5
DRIVER_LOSS = 0.08
PHOTOCELL_ON_LUX, PHOTOCELL_OFF_LUX = 30.0, 60.0
CHARACTERS = ("downtown", "urban", "suburban")
MAX_CLOUD = 0.8  # a reading's cloud cover is uniform in 0 … MAX_CLOUD
LUX_SIGMA = 0.08  # the photocell's own scatter (lognormal)

# brightness_pct and power_w: kept as text while the level stays (see StreetlightSim).
_LIGHT = (b'{"ts":%d,"seq":%d,"brightness_pct":%b,"power_w":%b,"energy_wh":%.3f,"lux":%.2f,'
          b'"motion":%b,"motion_count":%d,"temp_c":%.2f,"no2_ugm3":%.1f,"pm25_ugm3":%.1f}')
_LIGHT_FAILED = _LIGHT[:-1] + b',"fault":"lamp_failure"}'
_METER = b'{"ts":%d,"seq":%d,"energy_kwh":%.4f,"power_w":%.1f,"voltage_v":%.1f}'
_MOTION = (b"false", b"true")
_N, _NBITS, _NMASK = physics.NORMAL, physics.NORMAL_BITS, physics.NORMAL_MASK
_exp = math.exp


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The world at one moment, shared by every device (computed once per 10 s of sim time)."""

    local: datetime
    elevation: float
    traffic: dict[str, float]  # passings a minute, by "character/road" (``traffic_key``)
    temp_c: float
    no2: dict[str, float]
    pm25: dict[str, float]
    season: float
    # Ambient light is linear in the cloud cover: lux0 at a clear sky, + lux_span × u for
    # a cloud cover of u × MAX_CLOUD (``sun.ambient_lux`` at both ends).
    lux0: float = 0.0
    lux_span: float = 0.0
    household_w: float = 0.0  # the load profiles' deterministic part (physics.*_base_w)
    business_w: float = 0.0


def traffic_key(character: str, road: str | None) -> str:
    return f"{character}/{road or physics.DEFAULT_ROAD}"


class World:
    def __init__(self, city: CityProfile):
        self.city = city
        self.tz = city.tz
        # The snapshot of a 10 s bucket (``ts_ms // 10_000``): what a device's reading asks.
        self.bucket = lru_cache(maxsize=4096)(self._snapshot)

    def at(self, ts_ms: int) -> Snapshot:
        return self.bucket(ts_ms // 10_000)

    def _snapshot(self, bucket: int) -> Snapshot:
        local = datetime.fromtimestamp(bucket * 10, self.tz)
        elevation = sun.elevation(self.city.lat, self.city.lon, local)
        season = physics.season(local)
        lux0 = sun.ambient_lux(elevation, 0.0)
        return Snapshot(
            local=local,
            elevation=elevation,
            traffic={traffic_key(c, r): physics.traffic_per_min(local, c, r)
                     for c in CHARACTERS for r in physics.ROADS},
            temp_c=physics.air_temp_c(local, self.city.monthly_temp_c),
            no2={c: physics.no2_ugm3(local, c, 0) for c in CHARACTERS},
            pm25={c: physics.pm25_ugm3(local, c, 0) for c in CHARACTERS},
            season=season,
            lux0=lux0,
            lux_span=sun.ambient_lux(elevation, MAX_CLOUD) - lux0,
            household_w=physics.household_base_w(local, season),
            business_w=physics.business_base_w(local, season),
        )


# Slots: a device is one compact object (the engine visits 10,000 of them in phase order,
# all over memory). A slots dataclass cannot use super() in 3.11: the parents are named.
@dataclass(slots=True)
class SimDevice:
    spec: FleetDevice
    character: str
    rng: random.Random
    faults: dict[str, float]
    topic: Topic = field(init=False)
    seq: int = 0
    offline_for: int = 0  # readings still to skip
    injected: Counter = field(default_factory=Counter)
    planned: list = field(default_factory=list)  # (ts, payload args) of events ahead

    def __post_init__(self) -> None:
        self.topic = Topic(self.spec.district, self.spec.kind, self.spec.device_id)

    def _fault(self, name: str) -> bool:
        rate = self.faults.get(name)
        if rate and self.rng.random() < rate:
            self.injected[name] += 1
            return True
        return False

    # What survives a restart of the simulator (a real device's registers and counters).
    SAVED = ("seq",)

    def saved(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SAVED}

    def restore(self, saved: dict[str, Any]) -> None:
        for name in self.SAVED:
            if isinstance(saved.get(name), int | float):
                setattr(self, name, type(getattr(self, name))(saved[name]))

    def tick(self, ts_ms: int, interval_s: float, world: World) -> list[bytes]:
        """Payloads to publish for the reading due at ``ts_ms``."""
        if self.offline_for > 0:
            self.offline_for -= 1
            return []
        if self.faults and self._fault("offline"):
            self.offline_for = self.rng.randint(5, 30) - 1
            return []
        return self._reading(ts_ms, interval_s, world)

    @property
    def went_offline(self) -> bool:
        return self.offline_for > 0

    def inject(self, name: str, readings: int = 0) -> None:
        """An injected fault, now: ``offline`` (and, on a light, ``cabinet_outage``) for
        ``readings`` readings."""
        if name not in ("offline", "cabinet_outage"):
            raise ValueError(f"{self.spec.device_id} ({self.spec.kind}) has no fault {name!r}")
        self.offline_for = max(self.offline_for, readings)
        self.planned.clear()
        self.injected[name] += 1

    def motion_event(self, world: World) -> list[bytes]:
        """The payloads of the first planned event (which is due)."""
        return []

    def _reading(self, ts_ms: int, interval_s: float, world: World) -> list[bytes]:
        raise NotImplementedError


@dataclass(slots=True)
class StreetlightSim(SimDevice):
    level: float = 0.0
    commanded: float | None = None
    hold_until_ms: int | None = None
    energy_wh: float = 0.0
    lamp_failed: bool = False
    stuck: dict[str, Any] | None = None
    commands: int = 0
    rejected_commands: int = 0
    stuck_on: bool = False  # day_burner: a relay stuck on (held at 100 %, commands ignored)
    power_factor: float = 1.0  # wrong_power: what it draws against what its level should
    last_ms: int | None = None  # its last reading's time: the register integrates from it
    unreported: int = 0  # passings since its last reading, for the next periodic one
    blind_until: int = 0  # the presence sensor's blind time after its last detection
    traffic_key: str = field(init=False, default="")
    # While the level (and the lamp) stay: the power drawn, and the level and the power as
    # the payload writes them (the level in orjson's form, the power as ``%.2f``).
    _level_json: bytes | None = field(init=False, default=None, repr=False)
    _power: float = field(init=False, default=0.0, repr=False)
    _power_text: bytes = field(init=False, default=b"", repr=False)
    rated_w: float = field(init=False, default=0.0)  # the spec's, at hand
    SAVED = ("seq", "energy_wh", "level")

    def __post_init__(self) -> None:
        SimDevice.__post_init__(self)
        self.energy_wh = round(self.rng.uniform(50_000, 400_000), 1)
        self.rated_w = self.spec.rated_w or 0.0
        self.traffic_key = traffic_key(self.character, self.spec.road)

    def _program_level(self, lux: float) -> float:
        """The controller's own photocell, with hysteresis, when no command holds."""
        if lux < PHOTOCELL_ON_LUX:
            return 100.0
        if lux > PHOTOCELL_OFF_LUX:
            return 0.0
        return 100.0 if self.level > 0 else 0.0

    def restore(self, saved: dict[str, Any]) -> None:
        SimDevice.restore(self, saved)
        self._level_json = None  # the level's and the power's texts are made again

    def _set_power(self) -> None:
        if self.lamp_failed:
            self._power = STANDBY_W
        else:
            self._power = (self.rated_w * self.level / 100 * (1 + DRIVER_LOSS) * self.power_factor
                           + STANDBY_W)
        self._power_text = b"%.2f" % self._power

    def inject(self, name: str, readings: int = 0) -> None:
        if name == "lamp_failure":
            self.lamp_failed = True
        elif name == "day_burner":
            self.stuck_on = True
            self.commanded, self.hold_until_ms = 100.0, None
        elif name == "wrong_power":
            self.power_factor = WRONG_POWER
        elif name == "cabinet_outage":  # silent, then back as after a power cut: a fresh start
            SimDevice.inject(self, name, readings)
            self.level, self.last_ms, self.unreported, self.blind_until = 0.0, None, 0, 0
            if not self.stuck_on:
                self.commanded = self.hold_until_ms = None
            self._level_json = None
            return
        else:
            SimDevice.inject(self, name, readings)
            return
        self.injected[name] += 1
        self._level_json = None  # the power changes

    def motion_event(self, world: World) -> list[bytes]:
        if not self.planned:
            return []
        ts_ms, count = self.planned.pop(0)
        if self.offline_for > 0:
            return []
        return self._reading(ts_ms, 0.0, world, count)

    def _reading(self, ts_ms: int, interval_s: float, world: World,
                 passing: int | None = None) -> list[bytes]:
        """The periodic reading at ``ts_ms`` (it plans the interval ahead), or with
        ``passing`` given an event's: the level now, the power, the register up to now."""
        snap = world.bucket(ts_ms // 10_000)
        rng = self.rng
        if passing is None:
            if self.faults:
                if not self.lamp_failed and self._fault("lamp_failure"):
                    self.lamp_failed = True
                    self._level_json = None  # the power changes
                if self.stuck is None and self._fault("stuck_sensor"):
                    self.stuck = {}
            passing = self.unreported
            periodic = True
        else:
            periodic = False
        bits = rng.getrandbits(4 * _NBITS)  # four normal draws: the photocell, temp, air
        lux = (snap.lux0 + snap.lux_span * rng.random()) * _exp(LUX_SIGMA * _N[bits & _NMASK])
        if self.stuck is not None:
            self.stuck.setdefault("lux", lux)
            self.stuck.setdefault("passing", passing)
            lux, passing = self.stuck["lux"], self.stuck["passing"]
        if self.hold_until_ms is not None and ts_ms >= self.hold_until_ms:
            self.commanded = self.hold_until_ms = None  # the hold ran out: back to the program
        if self.commanded is not None:
            level = self.commanded
        elif lux < PHOTOCELL_ON_LUX:  # the photocell (_program_level), inline: the hot path
            level = 100.0
        elif lux > PHOTOCELL_OFF_LUX:
            level = 0.0
        else:
            level = 100.0 if self.level > 0 else 0.0
        # The register counts the power since the last reading at the power now (as the rules
        # integrate a light's readings: a command between two readings is applied at once).
        last = self.last_ms
        elapsed = ts_ms - last if last is not None else 0
        self.last_ms = ts_ms
        if level != self.level or self._level_json is None:
            self._level_json = orjson.dumps(level)
            self.level = level
            self._set_power()
        power = self._power
        self.energy_wh += power * elapsed / 3_600_000
        self.seq += 1
        character = self.character
        no2 = snap.no2[character] + 2 * _N[(bits >> (2 * _NBITS)) & _NMASK]
        pm25 = snap.pm25[character] + _N[bits >> (3 * _NBITS)]
        payload = (_LIGHT_FAILED if self.lamp_failed else _LIGHT) % (
            ts_ms, self.seq, self._level_json, self._power_text, self.energy_wh, lux,
            _MOTION[passing > 0],
            passing, snap.temp_c + 0.3 * _N[(bits >> _NBITS) & _NMASK],
            no2 if no2 > 0.0 else 0.0, pm25 if pm25 > 0.0 else 0.0)
        if not periodic:
            return [payload]
        # The passings of the interval ahead (one draw, the table's: what the next periodic
        # reading counts), and, while the lamp is lit, the detections among them (events).
        # An unlit lamp's sensor does not report (a light that is off has no use for it).
        mean = snap.traffic[self.traffic_key] * interval_s / 60
        if mean <= 0 or self.stuck is not None:
            self.unreported = 0
            return [payload]
        if mean <= physics.POISSON_TABLE_MAX:
            n = bisect_right(physics.poisson_cdf(mean), rng.random())
        else:
            n = physics.poisson(rng, mean)
        if n and self.level > 0.0:
            self._plan(ts_ms, int(interval_s * 1000), n)
        else:
            self.unreported = n
        return [payload]

    def _plan(self, start: int, interval_ms: int, n: int) -> None:
        """``n`` passings in (start, start + interval): a Poisson process's, given their number,
        fall uniformly. Each that comes outside the blind time is a detection (an event, with
        the passings counted since the last reading); the rest go into the next count."""
        random_ = self.rng.random
        span = interval_ms - 1
        blind, count = self.blind_until, 0
        planned = self.planned
        for x in sorted(start + 1 + int(random_() * span) for _ in range(n)):
            count += 1
            if x >= blind:
                planned.append((x, count))
                count = 0
                blind = x + BLIND_MS
        self.blind_until = blind
        self.unreported = count

    def command(self, payload: bytes, now_ms: int) -> dict[str, Any]:
        """Apply a command like a real controller; returns the ack to publish.

        A malformed or out-of-range command changes nothing and is acknowledged with
        ``ok: false`` and the reason.
        """
        try:
            cmd = contract.validate_command(payload)
        except ContractError as e:
            self.rejected_commands += 1
            try:
                cid = orjson.loads(payload).get("id")
            except (orjson.JSONDecodeError, AttributeError):
                cid = None
            return {"id": cid if isinstance(cid, str) and cid else "?", "ts": now_ms,
                    "brightness_pct": self.level, "ok": False,
                    "error": f"{e.reason}: {e.detail}"[:256]}
        self.commands += 1
        if self.stuck_on:  # the controller takes it; the stuck relay keeps the lamp at 100 %
            return {"id": cmd.id, "ts": now_ms, "brightness_pct": cmd.brightness_pct, "ok": True}
        self.commanded = cmd.brightness_pct
        self.hold_until_ms = now_ms + int(cmd.hold_s * 1000) if cmd.hold_s else None
        self.level = cmd.brightness_pct  # applied now; the next reading shows it
        self._level_json = None
        return {"id": cmd.id, "ts": now_ms, "brightness_pct": self.level, "ok": True}


@dataclass(slots=True)
class MeterSim(SimDevice):
    register_kwh: float = 0.0
    held: bytes | None = None  # a reading kept back to arrive out of order
    business: bool = field(init=False, default=False)  # its load profile: a shop or a home
    SAVED = ("seq", "register_kwh")

    def __post_init__(self) -> None:
        SimDevice.__post_init__(self)
        self.register_kwh = round(self.rng.uniform(1_000, 40_000), 3)
        self.business = self.spec.profile == "business"

    def _reading(self, ts_ms: int, interval_s: float, world: World) -> list[bytes]:
        snap = world.bucket(ts_ms // 10_000)
        rng = self.rng
        bits = rng.getrandbits(2 * _NBITS)  # two normal draws: the load's, the voltage's
        if self.business:
            watts = snap.business_w * _exp(physics.BUSINESS_SIGMA * _N[bits & _NMASK])
            if watts < physics.BUSINESS_MIN_W:
                watts = physics.BUSINESS_MIN_W
        else:
            w = snap.household_w
            if rng.random() < physics.APPLIANCE_CHANCE:
                w += rng.choice(physics.APPLIANCES_W)
            watts = w * _exp(physics.HOUSEHOLD_SIGMA * _N[bits & _NMASK])
            if watts < physics.HOUSEHOLD_MIN_W:
                watts = physics.HOUSEHOLD_MIN_W
        self.register_kwh += watts * interval_s / 3_600_000
        faults = self.faults
        if faults and self._fault("reset"):  # a meter swap: the new meter starts near zero
            self.register_kwh = round(min(rng.uniform(0, 2), self.register_kwh / 2), 3)
        self.seq += 1
        if faults and self._fault("gap"):
            return []  # lost on the way: the next seq shows the gap, the register keeps counting
        register = self.register_kwh
        if faults and self._fault("spike"):
            register += rng.uniform(5_000, 20_000)  # one implausible reading
        payload = _METER % (ts_ms, self.seq, register, watts,
                            230 + 1.5 * _N[bits >> _NBITS])
        if not faults:
            return [payload]
        out = [payload]
        if self._fault("duplicate"):
            out.append(payload)
        if self.held is not None:
            out.append(self.held)  # the one kept back arrives after its successor
            self.held = None
        elif self._fault("out_of_order"):
            self.held = out.pop(0)
        return out


def make_device(spec: FleetDevice, character: str, rng: random.Random,
                faults: dict[str, float]) -> SimDevice:
    cls = StreetlightSim if spec.kind == "streetlight" else MeterSim
    allowed = STREETLIGHT_FAULTS if spec.kind == "streetlight" else METER_FAULTS
    return cls(spec, character, rng, {k: v for k, v in faults.items() if k in allowed})
