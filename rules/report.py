"""The engine's own figures, once a minute of event time (measurement citygrid_rules): per rule
its evaluations, firings and errors; lights on, dimmed and off, commands, acks pending,
alerts active, the accounts overdue and what they owe past due (the leading worker); and,
with billing, the tariffs' current prices (citygrid_tariff)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rules.engine import RuleEngine

RULES_MEASUREMENT = "citygrid_rules"
TARIFF_MEASUREMENT = "citygrid_tariff"


class SelfReport:
    def __init__(self, engine: RuleEngine):
        self.engine = engine
        self._last_minute: int | None = None

    def report(self, now_ms: int) -> None:
        """Write the figures if a new minute began."""
        from citygrid.store import Point

        minute = now_ms // 60_000
        if minute == self._last_minute:
            return
        self._last_minute = minute
        engine = self.engine
        ts = minute * 60_000
        levels = [s.level for s in engine.lights.values() if s.level is not None]
        points = [Point(RULES_MEASUREMENT, {"rule": rule_id}, {
            "evaluations": h.evaluations, "fired": h.fired, "errors": h.errors}, ts)
            for rule_id, h in sorted(engine.health.items())]
        points.append(Point(RULES_MEASUREMENT, {}, {
            "lights_on": sum(1 for v in levels if v >= 100),
            "lights_dimmed": sum(1 for v in levels if 0 < v < 100),
            "lights_off": sum(1 for v in levels if v == 0),
            "commands_total": engine.commands_sent,
            "acks_pending": len(engine.pending_acks),
            "alerts_active": engine.alerting.active_count(),
            **({"mqtt_node": engine.mqtt_node, "mqtt_failovers_total": engine.mqtt_failovers}
               if engine.mqtt_node else {}),
            **({"overdue_accounts": engine.overdue[0], "overdue_minor": engine.overdue[1]}
               if engine.overdue is not None else {})}, ts))
        if engine.billing is not None:  # the price bands, for the energy dashboard
            config = engine.billing.config
            for name in sorted(config.tariffs):
                now = engine.billing.price_now(name, ts)
                if now is not None:  # at spot, a moment the price file does not cover
                    points.append(Point(TARIFF_MEASUREMENT, {"tariff": name}, {
                        "price": float(now), "currency": config.currency}, ts))
        engine.outbox.points(points)
