"""``set_light``: a wish for a level, at a priority, for the rule's lights (the source light,
its neighbours within ``radius_m``, its district; a schedule's selection) — held for
``hold`` after the rule last held, or for as long as the rule is active."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from citygrid.fleet import FleetDevice
from rules.actions import ActionType, register
from rules.arbitration import Wish
from rules.context import Context, selects
from rules.expr import parse_duration
from rules.model import SetLight

if TYPE_CHECKING:
    from rules.engine import RuleEngine
    from rules.loader import CompiledRule


@register("set_light")
class SetLightAction(ActionType):
    def __init__(self, engine: RuleEngine):
        super().__init__(engine)
        self._neighbours: dict[tuple[str, float], list[FleetDevice]] = {}
        self._by_district: dict[str, list[FleetDevice]] = defaultdict(list)
        for d in engine.fleet.of_kind("streetlight"):
            self._by_district[d.district].append(d)

    def targets(self, rule: CompiledRule, spec: SetLight, source_device: FleetDevice | None
                ) -> list[FleetDevice]:
        if source_device is None:  # a schedule: its selection
            select = rule.rule.when.schedule.select
            return [d for d in self.engine.fleet.of_kind("streetlight") if selects(select, d)]
        if source_device.kind != "streetlight" and spec.scope == "self":
            return []
        if spec.scope == "self":
            return [source_device]
        if spec.scope == "district":
            return self._by_district[source_device.district]
        key = (source_device.device_id, spec.radius_m)
        near = self._neighbours.get(key)
        if near is None:
            near = self._neighbours[key] = [
                d for d in self.engine.fleet.neighbours(source_device.device_id, spec.radius_m)
                if d.kind == "streetlight"]
        return ([source_device] if source_device.kind == "streetlight" else []) + near

    def activate(self, rule: CompiledRule, source: str, spec: SetLight, ctx: Context) -> None:
        hold = parse_duration(spec.hold) if spec.hold is not None else None
        expires = ctx.ts_ms + int(hold * 1000) if hold else None
        wish = Wish(f"rule:{rule.id}@{source}", spec.priority, spec.level, f"rule:{rule.id}",
                    expires, ctx.ts_ms)
        engine = self.engine
        for light in self.targets(rule, spec, ctx.device):
            engine.wish(light.device_id, wish)

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
