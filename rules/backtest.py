"""`citygrid rules backtest`: stored history through the rules, as if they had been live.

Readings are replayed in time order into a fresh engine (no acknowledgements,
no MQTT); the report says which commands the rules would have issued, and the
lighting energy those levels would have used against every light at 100 % all
night.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from citygrid.city import CityProfile
from citygrid.fleet import Fleet, FleetDevice
from citygrid.store import TelemetryStore
from rules import loader
from rules.alerts import AlertState
from rules.energy import MAX_GAP_MS, STANDBY_W
from rules.engine import RuleEngine


class _Recorder:
    def __init__(self) -> None:
        self.commands: Counter = Counter()
        self.alerts = 0

    def command(self, device: FleetDevice, payload: dict, expiry_s: float) -> None:
        self.commands[payload["reason"]] += 1

    def publish(self, *args: Any) -> None:
        pass

    def alert(self, alert: AlertState, raised: bool) -> None:
        self.alerts += raised

    def points(self, points: list) -> None:
        pass


def _progress(done_ms: int, start_ms: int, end_ms: int, readings: int) -> None:
    share = (done_ms - start_ms) / max(1, end_ms - start_ms)
    bar = "#" * int(share * 30)
    sys.stderr.write(f"\r[{bar:<30}] {share:6.1%}  {readings:,} readings")
    sys.stderr.flush()


def backtest(store: TelemetryStore, rules_path: str | Path, fleet: Fleet, city: CityProfile,
             start_ms: int, end_ms: int, *, progress: bool = False) -> dict[str, Any]:
    ruleset = loader.load(rules_path)
    recorder = _Recorder()
    engine = RuleEngine(ruleset, fleet, city, recorder, track_acks=False)
    engine.calendar.log = []  # the calendar's steps, as they fired
    loss = ruleset.settings.lamp_loss
    last: dict[str, int] = {}
    used_wh = baseline_wh = 0.0
    readings = 0
    streams = [store.points(kind, start_ms=start_ms, end_ms=end_ms)
               for kind in ("streetlight", "meter")]
    for point in heapq.merge(*streams, key=lambda p: p.ts_ms):
        device_id = point.tags.get("device_id")
        device = fleet.by_id.get(device_id or "")
        if device is None:
            continue
        if device.kind == "streetlight":
            prev = last.get(device_id)
            if prev is not None and 0 < point.ts_ms - prev <= MAX_GAP_MS:
                hours = (point.ts_ms - prev) / 3_600_000
                state = engine.lights.get(device_id)
                level = state.level if state and state.level is not None else \
                    point.fields.get("brightness_pct", 0.0)
                rated = device.rated_w or 0.0
                used_wh += (rated * level / 100 * (1 + loss) + STANDBY_W) * hours
                if engine.floor_active(point.ts_ms):
                    baseline_wh += (rated * (1 + loss) + STANDBY_W) * hours
                else:
                    baseline_wh += STANDBY_W * hours
            last[device_id] = point.ts_ms
        engine.on_reading(device_id, point.fields, point.ts_ms)
        readings += 1
        if progress and readings % 5000 == 0:
            _progress(point.ts_ms, start_ms, end_ms, readings)
    engine.advance(end_ms)
    if progress:
        _progress(end_ms, start_ms, end_ms, readings)
        sys.stderr.write("\n")
    saved = max(0.0, baseline_wh - used_wh)
    return {
        "readings": readings, "commands": sum(recorder.commands.values()),
        "commands_by_reason": dict(recorder.commands), "alerts": recorder.alerts,
        "energy_kwh": used_wh / 1000, "baseline_kwh": baseline_wh / 1000,
        "saved_pct": saved / baseline_wh * 100 if baseline_wh else 0.0,
        "co2_avoided_kg": saved / 1000 * ruleset.settings.co2_g_per_kwh / 1000,
        "calendar_steps": engine.calendar.log,
    }
