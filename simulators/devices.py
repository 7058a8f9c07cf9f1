"""Simulated streetlights and meters: state, readings, commands and faults.

A device is driven by its ``tick(ts_ms, interval_s)``: it returns the payloads
to publish on its telemetry topic for that reading time (none while offline or
during a gap, two for a duplicate). Everything random comes from the device's
own generator, seeded from the run's ``--seed``, so a run is reproducible.
"""

from __future__ import annotations

import random
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
METER_FAULTS = ("offline", "duplicate", "out_of_order", "reset", "spike", "gap")
FAULTS = tuple(dict.fromkeys(STREETLIGHT_FAULTS + METER_FAULTS))
STANDBY_W = 0.5
DRIVER_LOSS = 0.08
PHOTOCELL_ON_LUX, PHOTOCELL_OFF_LUX = 30.0, 60.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The world at one moment, shared by every device (computed once per 10 s of sim time)."""

    local: datetime
    elevation: float
    traffic: dict[str, float]
    temp_c: float
    no2: dict[str, float]
    pm25: dict[str, float]
    season: float


class World:
    def __init__(self, city: CityProfile):
        self.city = city
        self.tz = city.tz
        self._at = lru_cache(maxsize=4096)(self._snapshot)

    def at(self, ts_ms: int) -> Snapshot:
        return self._at(ts_ms // 10_000)

    def _snapshot(self, bucket: int) -> Snapshot:
        local = datetime.fromtimestamp(bucket * 10, self.tz)
        characters = ("downtown", "urban", "suburban")
        return Snapshot(
            local=local,
            elevation=sun.elevation(self.city.lat, self.city.lon, local),
            traffic={c: physics.traffic_per_min(local, c) for c in characters},
            temp_c=physics.air_temp_c(local, self.city.monthly_temp_c),
            no2={c: physics.no2_ugm3(local, c, 0) for c in characters},
            pm25={c: physics.pm25_ugm3(local, c, 0) for c in characters},
            season=physics.season(local),
        )


@dataclass
class SimDevice:
    spec: FleetDevice
    character: str
    rng: random.Random
    faults: dict[str, float]
    topic: Topic = field(init=False)
    seq: int = 0
    offline_for: int = 0  # readings still to skip
    injected: Counter = field(default_factory=Counter)

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
        if self._fault("offline"):
            self.offline_for = self.rng.randint(5, 30) - 1
            return []
        return self._reading(ts_ms, interval_s, world)

    @property
    def went_offline(self) -> bool:
        return self.offline_for > 0

    def _reading(self, ts_ms: int, interval_s: float, world: World) -> list[bytes]:
        raise NotImplementedError


@dataclass
class StreetlightSim(SimDevice):
    level: float = 0.0
    commanded: float | None = None
    hold_until_ms: int | None = None
    energy_wh: float = 0.0
    lamp_failed: bool = False
    stuck: dict[str, Any] | None = None
    commands: int = 0
    rejected_commands: int = 0
    SAVED = ("seq", "energy_wh", "level")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.energy_wh = round(self.rng.uniform(50_000, 400_000), 1)

    def _program_level(self, lux: float) -> float:
        """The controller's own photocell, with hysteresis, when no command holds."""
        if lux < PHOTOCELL_ON_LUX:
            return 100.0
        if lux > PHOTOCELL_OFF_LUX:
            return 0.0
        return 100.0 if self.level > 0 else 0.0

    def _reading(self, ts_ms: int, interval_s: float, world: World) -> list[bytes]:
        snap = world.at(ts_ms)
        if not self.lamp_failed and self._fault("lamp_failure"):
            self.lamp_failed = True
        if self.stuck is None and self._fault("stuck_sensor"):
            self.stuck = {}
        lux = sun.ambient_lux(snap.elevation, self.rng.random() * 0.8) * self.rng.lognormvariate(
            0, 0.08)
        passing = physics.poisson(self.rng, snap.traffic[self.character] * interval_s / 60)
        if self.stuck is not None:
            self.stuck.setdefault("lux", lux)
            self.stuck.setdefault("passing", passing)
            lux, passing = self.stuck["lux"], self.stuck["passing"]
        if self.hold_until_ms is not None and ts_ms >= self.hold_until_ms:
            self.commanded = self.hold_until_ms = None  # the hold ran out: back to the program
        self.level = self.commanded if self.commanded is not None else self._program_level(lux)
        if self.lamp_failed:
            power = STANDBY_W
        else:
            power = self.spec.rated_w * self.level / 100 * (1 + DRIVER_LOSS) + STANDBY_W
        self.energy_wh += power * interval_s / 3600
        self.seq += 1
        reading = {
            "ts": ts_ms, "seq": self.seq, "brightness_pct": self.level,
            "power_w": round(power, 2), "energy_wh": round(self.energy_wh, 3),
            "lux": round(lux, 2), "motion": passing > 0, "motion_count": passing,
            "temp_c": round(snap.temp_c + self.rng.gauss(0, 0.3), 2),
            "no2_ugm3": round(max(0.0, snap.no2[self.character] + self.rng.gauss(0, 2)), 1),
            "pm25_ugm3": round(max(0.0, snap.pm25[self.character] + self.rng.gauss(0, 1)), 1),
        }
        if self.lamp_failed:
            reading["fault"] = "lamp_failure"
        return [orjson.dumps(reading)]

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
        self.commanded = cmd.brightness_pct
        self.hold_until_ms = now_ms + int(cmd.hold_s * 1000) if cmd.hold_s else None
        self.level = cmd.brightness_pct  # applied now; the next reading shows it
        return {"id": cmd.id, "ts": now_ms, "brightness_pct": self.level, "ok": True}


@dataclass
class MeterSim(SimDevice):
    register_kwh: float = 0.0
    held: bytes | None = None  # a reading kept back to arrive out of order
    SAVED = ("seq", "register_kwh")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.register_kwh = round(self.rng.uniform(1_000, 40_000), 3)

    def _reading(self, ts_ms: int, interval_s: float, world: World) -> list[bytes]:
        snap = world.at(ts_ms)
        if self.spec.profile == "business":
            watts = physics.business_w(snap.local, snap.season, self.rng)
        else:
            watts = physics.household_w(snap.local, snap.season, self.rng)
        self.register_kwh += watts * interval_s / 3_600_000
        if self._fault("reset"):  # a meter swap: the new meter starts near zero
            self.register_kwh = round(min(self.rng.uniform(0, 2), self.register_kwh / 2), 3)
        self.seq += 1
        if self._fault("gap"):
            return []  # lost on the way: the next seq shows the gap, the register keeps counting
        register = self.register_kwh
        if self._fault("spike"):
            register += self.rng.uniform(5_000, 20_000)  # one implausible reading
        payload = orjson.dumps({"ts": ts_ms, "seq": self.seq, "energy_kwh": round(register, 4),
                                "power_w": round(watts, 1),
                                "voltage_v": round(self.rng.gauss(230, 1.5), 1)})
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
