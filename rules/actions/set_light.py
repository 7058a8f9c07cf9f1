"""``set_light``: a wish for a level, at a priority, for the rule's lights (the source light,
its neighbours within ``radius_m``, its district; a schedule's selection) — held for
``hold`` after the rule last held, or for as long as the rule is active.

An engine that owns only some districts (rules/engine.py, partitioned workers) wishes only
on the lights it owns: a neighbour across the border is another engine's."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from citygrid.fleet import GRID_M, Fleet, FleetDevice, distance_m
from rules.actions import ActionType, register
from rules.arbitration import Wish
from rules.context import Context, selects
from rules.expr import parse_duration
from rules.model import SetLight

if TYPE_CHECKING:
    from rules.engine import RuleEngine
    from rules.loader import CompiledRule


class NeighbourIndex:
    """The streetlights within ``radius`` of a streetlight: exactly what
    ``[d for d in fleet.neighbours(id, radius) if d.kind == "streetlight"]`` gives (the same
    distance, the same cells of the fleet's own grid), nearest first — from a grid of cells
    about ``radius`` wide, so a look-up measures a few dozen lights, not hundreds.

    The cells are sized so two lights within ``radius`` always stand in adjacent cells; for
    a fleet where that cannot be made sure cheaply (near a pole, across ±180°) every look-up
    asks the fleet itself."""

    def __init__(self, fleet: Fleet, radius: float):
        self.fleet, self.radius = fleet, radius
        devices = fleet.devices
        lat0 = sum(d.lat for d in devices) / max(1, len(devices))  # as Fleet.neighbours
        self._coslat = math.cos(math.radians(lat0))
        self._rings = int(math.ceil(radius / GRID_M)) + 1
        lights = [d for d in devices if d.kind == "streetlight"]
        self._grid: dict[tuple[int, int], list[tuple[FleetDevice, float, float, int, int]]] = {}
        lats = [abs(d.lat) for d in lights] or [0.0]
        lons = [d.lon for d in lights] or [0.0]
        slack = self._coslat / max(1e-9, math.cos(math.radians(max(lats))))
        self._exact = max(lats) < 80 and max(lons) - min(lons) < 90 and slack < 1.5
        # Metres here (111,320 a degree) overstate the arc (R·Δφ, 111,195 a degree) by 0.11 %;
        # east–west they also vary with cos(lat) across the fleet: `slack` covers both.
        self._bound_y = radius * 1.002 + 0.01
        self._bound_x = radius * 1.002 * slack + 0.01
        self._cell = max(self._bound_x, self._bound_y) + 1.0
        for d in lights:
            y, x = d.lat * 111_320, d.lon * 111_320 * self._coslat
            fy, fx = math.floor(y / GRID_M), math.floor(x / GRID_M)  # the fleet's cell
            self._grid.setdefault((math.floor(y / self._cell), math.floor(x / self._cell)),
                                  []).append((d, y, x, fy, fx))

    def neighbours(self, device: FleetDevice) -> list[FleetDevice]:
        if device.kind != "streetlight":
            return []  # the fleet's neighbours are of the device's own kind
        if not self._exact:
            return [d for d in self.fleet.neighbours(device.device_id, self.radius)
                    if d.kind == "streetlight"]
        y, x = device.lat * 111_320, device.lon * 111_320 * self._coslat
        fy, fx = math.floor(y / GRID_M), math.floor(x / GRID_M)
        cy, cx = math.floor(y / self._cell), math.floor(x / self._cell)
        rings, radius, by, bx = self._rings, self.radius, self._bound_y, self._bound_x
        me = device.device_id
        near = []
        for gy in (cy - 1, cy, cy + 1):
            for gx in (cx - 1, cx, cx + 1):
                for d, dy, dx, dfy, dfx in self._grid.get((gy, gx), ()):
                    if abs(dy - y) > by or abs(dx - x) > bx or d.device_id == me or \
                            abs(dfy - fy) > rings or abs(dfx - fx) > rings:
                        continue
                    dist = distance_m(device, d)
                    if dist <= radius:
                        near.append((dist, d))
        near.sort(key=lambda p: p[0])
        return [d for _, d in near]


@register("set_light")
class SetLightAction(ActionType):
    def __init__(self, engine: RuleEngine):
        super().__init__(engine)
        self._owns = engine.owns
        self._near: dict[tuple[str, float], list[FleetDevice]] = {}  # self and neighbours
        self._indexes: dict[float, NeighbourIndex] = {}
        self._by_district: dict[str, list[FleetDevice]] = defaultdict(list)
        self._holds: dict[int, tuple[SetLight, int | None]] = {}  # id(spec) → spec, hold ms
        for d in engine.fleet.of_kind("streetlight"):
            if self._owns(d):
                self._by_district[d.district].append(d)

    def index(self, radius: float) -> NeighbourIndex:
        index = self._indexes.get(radius)
        if index is None:
            index = self._indexes[radius] = NeighbourIndex(self.engine.fleet, radius)
        return index

    def targets(self, rule: CompiledRule, spec: SetLight, source_device: FleetDevice | None
                ) -> list[FleetDevice]:
        """The lights the wish is for (those this engine owns); the caller only reads it."""
        if source_device is None:  # a schedule: its selection
            select = rule.rule.when.schedule.select
            owns = self._owns
            return [d for d in self.engine.fleet.of_kind("streetlight")
                    if selects(select, d) and owns(d)]
        if source_device.kind != "streetlight" and spec.scope == "self":
            return []
        if spec.scope == "self":
            return [source_device] if self._owns(source_device) else []
        if spec.scope == "district":
            return self._by_district[source_device.district]
        key = (source_device.device_id, spec.radius_m)
        near = self._near.get(key)
        if near is None:
            owns = self._owns
            mine = [source_device] if source_device.kind == "streetlight" else []
            near = self._near[key] = [d for d in mine + self.index(spec.radius_m).neighbours(
                source_device) if owns(d)]
        return near

    def _hold_ms(self, spec: SetLight) -> int | None:
        known = self._holds.get(id(spec))
        if known is None or known[0] is not spec:
            hold = parse_duration(spec.hold) if spec.hold is not None else None
            known = self._holds[id(spec)] = (spec, int(hold * 1000) if hold else None)
        return known[1]

    def activate(self, rule: CompiledRule, source: str, spec: SetLight, ctx: Context) -> None:
        targets = self.targets(rule, spec, ctx.device)
        if not targets:
            return
        hold_ms = self._hold_ms(spec)
        wish = Wish(f"rule:{rule.id}@{source}", spec.priority, spec.level, f"rule:{rule.id}",
                    None if hold_ms is None else ctx.ts_ms + hold_ms, ctx.ts_ms)
        engine_wish = self.engine.wish
        for light in targets:
            engine_wish(light.device_id, wish)

    def refreshes(self, spec: SetLight) -> bool:
        return spec.hold is not None

    def refresh(self, rule: CompiledRule, source: str, spec: SetLight, ctx: Context) -> None:
        """Held again: the hold starts over (motion keeps the light up)."""
        self.activate(rule, source, spec, ctx)

    def deactivates(self, spec: SetLight) -> bool:
        return spec.hold is None  # a held wish runs out on its own

    def deactivate(self, rule: CompiledRule, source: str, spec: SetLight,
                   device: FleetDevice | None, now_ms: int) -> None:
        key = f"rule:{rule.id}@{source}"
        for light in self.targets(rule, spec, device):
            self.engine.withdraw(light.device_id, key)
