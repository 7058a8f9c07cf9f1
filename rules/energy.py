"""Lighting energy: per minute of event time and district, what the streetlights used, against
a baseline of every light at full power all night (whenever the safety floor is on) — the
saving adaptive lighting makes, and the CO2 it avoids (measurement citygrid_lighting)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from citygrid.fleet import FleetDevice

if TYPE_CHECKING:
    from rules.engine import RuleEngine

STANDBY_W = 0.5
LIGHTING_MEASUREMENT = "citygrid_lighting"
MAX_GAP_MS = 900_000  # a light silent longer than this: its energy is not guessed
_NUMBER = (int, float)


class LightingEnergy:
    def __init__(self, engine: RuleEngine):
        self.engine = engine  # for the rules' settings and whether it is night
        self._minutes: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._last_ts: dict[str, int] = {}

    def account(self, device: FleetDevice, reading: dict, ts_ms: int) -> None:
        """A streetlight's reading: its power since its last reading, used and baseline."""
        last = self._last_ts.get(device.device_id)
        self._last_ts[device.device_id] = ts_ms
        power = reading.get("power_w")
        if last is None or not isinstance(power, _NUMBER) or \
                not 0 < ts_ms - last <= MAX_GAP_MS:
            return
        hours = (ts_ms - last) / 3_600_000
        bucket = self._minutes[(ts_ms // 60_000, device.district)]
        bucket[0] += power * hours
        if self.engine.floor_active(ts_ms):  # night: the baseline burns at full power
            rated = device.rated_w or 0.0
            loss = self.engine.ruleset.settings.lamp_loss
            bucket[1] += (rated * (1 + loss) + STANDBY_W) * hours
        else:
            bucket[1] += power * hours

    def forget(self, device_id: str) -> None:
        """The light is no longer this engine's to account."""
        self._last_ts.pop(device_id, None)

    def flush(self, now_ms: int) -> list:
        """The points of the minutes that are over (and forgets them)."""
        from citygrid.store import Point

        current = now_ms // 60_000
        done = [k for k in self._minutes if k[0] < current]
        if not done:
            return []
        g_per_kwh = self.engine.ruleset.settings.co2_g_per_kwh
        points = []
        for minute, district in sorted(done):
            used, baseline = self._minutes.pop((minute, district))
            saved = max(0.0, baseline - used)
            points.append(Point(LIGHTING_MEASUREMENT, {"district": district}, {
                "energy_wh": used, "baseline_wh": baseline, "saved_wh": saved,
                "saved_pct": (saved / baseline * 100) if baseline > 0 else 0.0,
                "co2_avoided_g": saved / 1000 * g_per_kwh}, minute * 60_000))
        return points
