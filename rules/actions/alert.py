"""``alert``: raised when the rule fires (per device, or one per district that every firing
device keeps up), cleared when it clears."""

from __future__ import annotations

from typing import TYPE_CHECKING

from citygrid.fleet import FleetDevice
from rules.actions import ActionType, register
from rules.context import Context, render
from rules.model import Alert

if TYPE_CHECKING:
    from rules.loader import CompiledRule


def _scope(spec: Alert, source: str, device: FleetDevice | None) -> str:
    return device.district if (device and spec.per == "district") else source


@register("alert")
class AlertAction(ActionType):
    def activate(self, rule: CompiledRule, source: str, spec: Alert, ctx: Context) -> None:
        scope = _scope(spec, source, ctx.device)
        key = f"{rule.id}@{scope}"
        alerts = self.engine.alerting
        if not alerts.join(key, source):  # the message is the first firing's
            alerts.raise_(key, rule.id, spec.severity, render(spec.message, ctx), scope,
                          ctx.ts_ms, source)

    def deactivate(self, rule: CompiledRule, source: str, spec: Alert,
                   device: FleetDevice | None, now_ms: int) -> None:
        self.engine.alerting.clear(f"{rule.id}@{_scope(spec, source, device)}", source, now_ms)
