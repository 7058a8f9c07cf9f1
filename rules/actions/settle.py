"""``settle``: bill a meter's unbilled consumption (all of it, or only months that have
ended); each settlement published on the meter's settlement topic, written as a
citygrid_billing point, and its account's low-balance alert raised or cleared."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from citygrid.fleet import FleetDevice
from rules.actions import ActionType, register
from rules.context import Context
from rules.model import Settle

if TYPE_CHECKING:
    from rules.loader import CompiledRule

BILLING_MEASUREMENT = "citygrid_billing"


@register("settle")
class SettleAction(ActionType):
    def activate(self, rule: CompiledRule, source: str, spec: Settle, ctx: Context) -> None:
        self.settle(ctx.device, spec.periods == "ended", ctx.ts_ms)

    def refresh(self, rule: CompiledRule, source: str, spec: Settle, ctx: Context) -> None:
        """Still active: tried again — settling is idempotent, and a crash may have cut the
        last one short."""
        self.settle(ctx.device, spec.periods == "ended", ctx.ts_ms)

    def settle(self, device: FleetDevice | None, ended_only: bool, now_ms: int) -> None:
        engine = self.engine
        if engine.billing is None or device is None or device.kind != "meter":
            return
        for s in engine.billing.settle(device.device_id, now_ms, ended_periods_only=ended_only):
            topic = f"city/v1/{device.district}/meter/{device.device_id}/settlement"
            engine.outbox.publish(topic, json.dumps({**s.entry, "hash": s.hash}).encode(), 1,
                                  False)
            from citygrid.store import Point

            engine.outbox.points([Point(BILLING_MEASUREMENT, {
                "meter": device.device_id, "account": s.entry["account"],
                "district": device.district, "tariff": s.entry["tariff"]}, {
                "kwh": float(s.entry["kwh"]), "amount_minor": s.entry["amount_minor"],
                "balance_minor": s.entry["balance_after_minor"]}, now_ms)])
            engine.alerting.settled(s, now_ms)
        # Consumption held for want of a spot price, all billed now: its alert clears.
        unpriced = engine.alerting.by_key.get(f"billing-unpriced@{device.device_id}")
        if unpriced is not None and unpriced.active and not (
                engine.billing.unpriced(device.device_id)
                or engine.billing.unpriced(device.device_id, "export")):
            engine.alerting.clear(unpriced.key, None, now_ms)
