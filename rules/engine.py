"""The rule engine's core: readings and event time in, rules evaluated, their instances
through ``for:`` and hysteresis, light wishes arbitrated into commands.

It reads no clock and opens no socket: time is the readings' timestamps (a
watermark, DESIGN.md §5) handed to :meth:`RuleEngine.advance`, and everything
it does to the world goes through the ``outbox`` it is given (and the ``billing``
store, for meters). The same engine therefore runs live, in ``rules test`` with a
fake outbox, and in a backtest.

Beside it: what a firing rule does (rules/actions/, one module per action), alerts
(rules/alerts.py), acknowledgements (rules/acks.py), schedules and absences
(rules/schedules.py), lighting energy (rules/energy.py), the engine's own figures
(rules/report.py), its state as plain data (rules/snapshot.py), and why a light is at its
level (rules/explain.py).
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Protocol

from billing import BillingConfig, Settlement
from citygrid.city import CityProfile
from citygrid.fleet import Fleet, FleetDevice
from rules import schedules
from rules.acks import Acks
from rules.actions import ACTIONS, ActionType, Plan, plan
from rules.alerts import ACK_RULE, Alerts, AlertState
from rules.arbitration import LightState, Wish
from rules.context import Context, selects
from rules.energy import LightingEnergy
from rules.explain import explain
from rules.expr import EvalError
from rules.loader import CompiledRule, RuleSet
from rules.report import SelfReport
from rules.snapshot import (
    SavedInstance,
    Snapshot,
    alert_state,
    saved_alert,
    saved_light,
    wish,
)

log = logging.getLogger("citygrid.rules")
__all__ = ["ACK_RULE", "AlertState", "Billing", "Instance", "Outbox", "RuleEngine",
           "RuleHealth"]


class Outbox(Protocol):
    def command(self, device: FleetDevice, payload: dict[str, Any], expiry_s: float) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    def alert(self, alert: AlertState, raised: bool) -> None: ...

    def points(self, points: list) -> None: ...


class Billing(Protocol):
    """What the engine asks of its billing store (``billing.BillingStore`` when live): meter
    readings in (events worth an alert out), a meter's unbilled consumption for ``meter.*``,
    settlements for ``settle``, and the config's tariffs for the price report."""

    config: BillingConfig

    def on_reading(self, meter_id: str, ts_ms: int, energy_kwh: float
                   ) -> list[tuple[str, str]]: ...

    def unbilled(self, meter_id: str) -> dict[str, Any]: ...

    def settle(self, meter_id: str, now_ms: int, *, ended_periods_only: bool = False
               ) -> list[Settlement]: ...


@dataclass
class Instance:
    """A rule's state for one source (a device, or the rule's schedule)."""

    active: bool = False
    pending_since: int | None = None
    fingerprint: str = ""


@dataclass
class RuleHealth:
    evaluations: int = 0
    fired: int = 0
    last_fired_ms: int | None = None
    errors: int = 0
    last_error: str | None = None


class RuleEngine:
    def __init__(self, ruleset: RuleSet, fleet: Fleet, city: CityProfile, outbox: Outbox,
                 *, track_acks: bool = True, billing: Billing | None = None):
        self.fleet, self.city, self.outbox = fleet, city, outbox
        self.billing = billing  # for meters and `settle`
        self.track_acks = track_acks
        self.city_time = schedules.CityTime(city)
        self.alerting = Alerts(outbox)
        self.alerts: dict[str, AlertState] = self.alerting.by_key  # the same dict
        self.acks = Acks()
        self.pending_acks: dict[str, tuple[str, int]] = self.acks.pending  # the same dict
        self.energy = LightingEnergy(self)
        self.reporter = SelfReport(self)
        self.lights: dict[str, LightState] = {}
        self.instances: dict[tuple[str, str], Instance] = {}
        self.health: dict[str, RuleHealth] = defaultdict(RuleHealth)
        self.windows: dict[str, dict[str, deque]] = defaultdict(dict)
        self.last_reading: dict[str, dict] = {}
        self.last_seen: dict[str, int] = {}
        self.watermark: int | None = None
        self.started_ms: int | None = None
        self.commands_sent = 0
        self._expiries: list[tuple[int, str]] = []
        self._floor_on: bool | None = None
        self._cmd_seq = 0
        self._last_tick = None
        # What changed since the last snapshot (and self.alerting.dirty): rules/state.py saves
        # just that.
        self._dirty_lights: set[str] = set()
        self._dirty_instances: set[tuple[str, str]] = set()
        self._touched: set[str] = set()  # lights whose wishes changed during this event
        self._pending: set[tuple[str, str]] = set()  # instances waiting out a `for:`
        self.actions: dict[str, ActionType] = {name: cls(self) for name, cls in ACTIONS.items()}
        self.set_rules(ruleset)

    # ------------------------------------------------------------------ rules

    def set_rules(self, ruleset: RuleSet) -> None:
        """Use new rules; rules whose text did not change keep their state."""
        self.ruleset = ruleset
        self.default_level = ruleset.settings.default_level
        self.floor_level = ruleset.settings.safety_floor.level
        keep = {r.id: r.fingerprint for r in ruleset.rules}
        for key in [k for k, inst in self.instances.items()
                    if keep.get(k[0]) != inst.fingerprint]:
            self._drop_instance(key)
        enabled = [r for r in ruleset.rules if r.rule.enabled]
        self.reading_rules = [r for r in enabled if r.rule.when.reading is not None]
        self.schedule_rules = [r for r in enabled if r.rule.when.schedule is not None]
        self.absence_rules = [r for r in enabled if r.rule.when.absent is not None]
        spans: dict[str, float] = {}
        for r in ruleset.rules:
            for expr in (r.condition, r.clear):
                for f, s in expr.windows if expr else ():
                    spans[f] = max(spans.get(f, 0), s)
        self.window_spans = spans
        self._plans: dict[str, Plan] = {r.id: plan(r, self.actions) for r in ruleset.rules}
        self._rules_for: dict[tuple[str, str], list[CompiledRule]] = {}
        self._floor_on = None

    def set_fleet(self, fleet: Fleet) -> None:
        """Use a new inventory (the registry changed): devices added are taken from their
        next reading, moved ones are selected (district rules, neighbours) where they stand
        now, and a device no longer there (revoked) loses its state and gets no command."""
        gone = set(self.fleet.by_id) - set(fleet.by_id)
        self.fleet = fleet
        if self.billing is not None:
            self.billing.fleet = fleet
        for device_id in gone:
            self.lights.pop(device_id, None)
            self._dirty_lights.add(device_id)
            self._touched.discard(device_id)
            self.acks.pending.pop(device_id, None)
            self.last_reading.pop(device_id, None)
            self.windows.pop(device_id, None)
        for key in [k for k in self.instances if k[1] in gone]:
            # Its wishes on the lights that remain (a neighbour's boost) go with it.
            self._drop_instance(key, clear_alerts=False)
        # What was derived from where devices stand: selections, districts, neighbours.
        self.actions = {name: cls(self) for name, cls in ACTIONS.items()}
        self._plans = {r.id: plan(r, self.actions) for r in self.ruleset.rules}
        self._rules_for = {}

    def _drop_instance(self, key: tuple[str, str], *, clear_alerts: bool = True) -> None:
        rule_id, source = key
        self.instances.pop(key, None)
        self._dirty_instances.add(key)
        wish_key = f"rule:{rule_id}@{source}"
        for light in self.lights.values():
            if light.wishes.pop(wish_key, None) is not None:
                self._touched.add(light.device_id)
        if clear_alerts:
            self.alerting.clear_rule(rule_id, self.watermark or 0)

    def rules_for(self, device: FleetDevice) -> list[CompiledRule]:
        key = (device.kind, device.device_id)
        rules = self._rules_for.get(key)
        if rules is None:
            rules = self._rules_for[key] = [r for r in self.reading_rules
                                            if selects(r.rule.when.reading, device)]
        return rules

    def floor_active(self, ts_ms: int) -> bool:
        try:
            return bool(self.ruleset.floor_when(Context(self, ts_ms)))
        except EvalError:
            return False

    # ------------------------------------------------------------------ readings

    def on_reading(self, device_id: str, reading: dict[str, Any], ts_ms: int) -> None:
        """One reading (its fields, without ts) from a device the fleet knows."""
        device = self.fleet.by_id.get(device_id)
        if device is None:
            return
        self.advance(ts_ms)
        self.last_seen[device_id] = ts_ms
        self.last_reading[device_id] = reading
        if self.window_spans:
            windows = self.windows[device_id]
            for f, span in self.window_spans.items():
                value = reading.get(f)
                if isinstance(value, int | float):
                    q = windows.setdefault(f, deque())
                    q.append((ts_ms, float(value)))
                    while q and q[0][0] <= ts_ms - span * 1000:
                        q.popleft()
        if device.kind == "streetlight":
            self.energy.account(device, reading, ts_ms)
        elif self.billing is not None and isinstance(reading.get("energy_kwh"), int | float):
            for kind, detail in self.billing.on_reading(device_id, ts_ms, reading["energy_kwh"]):
                self.alerting.billing(kind, device, detail, ts_ms)
        for rule in self.absence_rules:  # a reading ends an absence
            if (rule.id, device_id) in self.instances and selects(rule.rule.when.absent.select,
                                                                  device):
                self.deactivate(rule, device_id, device, ts_ms)
        ctx = Context(self, ts_ms, device, reading)
        for rule in self.rules_for(device):
            self._evaluate(rule, device_id, ctx)
        self._settle(ts_ms)

    def _settle(self, now_ms: int) -> None:
        """Recompute the lights this event touched, once each: one command per change."""
        while self._touched:
            device_id = self._touched.pop()
            self._recompute(self.fleet.by_id[device_id], now_ms)

    def _evaluate(self, rule: CompiledRule, source: str, ctx: Context) -> None:
        key = (rule.id, source)
        inst = self.instances.get(key)
        health = self.health[rule.id]
        health.evaluations += 1
        try:
            if inst is not None and inst.active and rule.clear is not None:
                holds = not rule.clear(ctx)
            else:
                holds = bool(rule.condition(ctx)) if rule.condition else True
        except EvalError as e:
            health.errors += 1
            health.last_error = str(e)
            return
        if inst is None:
            if not holds:
                return
            inst = self.instances[key] = Instance(fingerprint=rule.fingerprint)
            self._dirty_instances.add(key)
        if inst.active:
            if holds:  # still active: a held wish starts its hold again, a settlement retries
                for run, spec in self._plans[rule.id].refresh:
                    run(rule, source, spec, ctx)
            else:
                self.deactivate(rule, source, ctx.device, ctx.ts_ms)
            return
        if not holds:
            self.instances.pop(key, None)
            self._dirty_instances.add(key)
            return
        if rule.for_s and inst.pending_since is None:
            inst.pending_since = ctx.ts_ms
            self._pending.add(key)
            self._dirty_instances.add(key)
        if not rule.for_s or ctx.ts_ms - inst.pending_since >= rule.for_s * 1000:
            self.activate(rule, source, ctx)

    # ------------------------------------------------------------------ rule lifecycle

    def new_instance(self, rule: CompiledRule, source: str) -> None:
        """A fresh, inactive instance of ``rule`` for ``source`` (schedules, absences)."""
        self.instances[(rule.id, source)] = Instance(fingerprint=rule.fingerprint)
        self._dirty_instances.add((rule.id, source))

    def activate(self, rule: CompiledRule, source: str, ctx: Context) -> None:
        """The rule fires for ``source``: its instance becomes active, its actions run."""
        inst = self.instances[(rule.id, source)]
        inst.active, inst.pending_since = True, None
        self._dirty_instances.add((rule.id, source))
        health = self.health[rule.id]
        health.fired += 1
        health.last_fired_ms = ctx.ts_ms
        for run, spec in self._plans[rule.id].activate:
            run(rule, source, spec, ctx)

    def deactivate(self, rule: CompiledRule, source: str, device: FleetDevice | None,
                   now_ms: int) -> None:
        """The rule clears for ``source``: its instance goes, its actions are undone."""
        self.instances.pop((rule.id, source), None)
        self._dirty_instances.add((rule.id, source))
        for run, spec in self._plans[rule.id].deactivate:
            run(rule, source, spec, device, now_ms)

    # ------------------------------------------------------------------ lights

    def wish(self, device_id: str, wish: Wish) -> None:
        """A rule wants this light at a level; arbitrated when the event is done."""
        state = self.lights.setdefault(device_id, LightState(device_id))
        state.wishes[wish.key] = wish
        if wish.expires_ms is not None:
            heapq.heappush(self._expiries, (wish.expires_ms, device_id))
        self._touched.add(device_id)

    def withdraw(self, device_id: str, key: str) -> None:
        """The wish ``key`` no longer stands for this light."""
        state = self.lights.get(device_id)
        if state is not None and state.wishes.pop(key, None) is not None:
            self._touched.add(device_id)

    def _recompute(self, light: FleetDevice, now_ms: int) -> None:
        state = self.lights.setdefault(light.device_id, LightState(light.device_id))
        self._dirty_lights.add(light.device_id)
        floor = self.floor_level if self.floor_active(now_ms) else None
        decision = state.decide(now_ms, self.default_level, floor)
        if decision.level == state.level:
            return
        state.level, state.reason = decision.level, decision.reason
        self._cmd_seq += 1
        payload = {"id": f"{light.device_id}-{now_ms}-{self._cmd_seq}", "ts": now_ms,
                   "brightness_pct": decision.level, "reason": decision.reason}
        winner = decision.winner
        if winner is not None and winner.expires_ms is not None and not decision.floored:
            payload["hold_s"] = max(0.0, (winner.expires_ms - now_ms) / 1000)
        self.commands_sent += 1
        if self.track_acks:
            self.acks.expect(light.device_id, payload["id"],
                             now_ms + int(self.ruleset.ack_timeout_s * 1000))
        self.outbox.command(light, payload, self.ruleset.command_expiry_s)

    def set_override(self, device_id: str, level: float, now_ms: int,
                     until_ms: int | None = None, who: str = "operator") -> None:
        light = self.fleet.by_id[device_id]
        state = self.lights.setdefault(device_id, LightState(device_id))
        state.wishes[f"override:{who}"] = Wish(f"override:{who}", "override", level,
                                               f"override:{who}", until_ms, now_ms)
        if until_ms is not None:
            heapq.heappush(self._expiries, (until_ms, device_id))
        self._recompute(light, now_ms)

    def clear_override(self, device_id: str, now_ms: int, who: str = "operator") -> None:
        state = self.lights.get(device_id)
        if state is not None and state.wishes.pop(f"override:{who}", None) is not None:
            self._recompute(self.fleet.by_id[device_id], now_ms)

    def on_ack(self, device_id: str, ack: dict[str, Any], now_ms: int | None = None) -> None:
        if self.acks.acknowledged(device_id, ack.get("id")):
            self.alerting.acknowledged(device_id, now_ms or self.watermark or 0)

    # ------------------------------------------------------------------ event time

    def advance(self, now_ms: int) -> None:
        """Move the watermark; run what came due: holds, `for:`, schedules, absence, acks."""
        if self.watermark is not None and now_ms <= self.watermark:
            return
        if self.started_ms is None:
            self.started_ms = now_ms
        self.watermark = now_ms
        while self._expiries and self._expiries[0][0] <= now_ms:
            expires, device_id = heapq.heappop(self._expiries)
            state = self.lights.get(device_id)
            if state is not None and state.expire(now_ms):
                self._recompute(self.fleet.by_id[device_id], now_ms)
        second = now_ms // 1000
        if second == self._last_tick:
            return
        self._last_tick = second
        floor = self.floor_active(now_ms)
        if floor != self._floor_on and self._floor_on is not None:
            for device_id in list(self.lights):
                self._recompute(self.fleet.by_id[device_id], now_ms)
        self._floor_on = floor
        self._pending_timers(now_ms)
        schedules.run_schedules(self, now_ms)
        schedules.run_absences(self, now_ms)
        for device_id, cmd_id in self.acks.overdue(now_ms):
            self.alerting.missing_ack(device_id, cmd_id, now_ms)
        points = self.energy.flush(now_ms)
        if points:
            self.outbox.points(points)
        self.reporter.report(now_ms)
        self._settle(now_ms)

    def _pending_timers(self, now_ms: int) -> None:
        for key in list(self._pending):
            inst = self.instances.get(key)
            if inst is None or inst.active or inst.pending_since is None:
                self._pending.discard(key)
                continue
            rule_id, source = key
            try:
                rule = self.ruleset.by_id(rule_id)
            except KeyError:
                continue
            if now_ms - inst.pending_since >= rule.for_s * 1000:
                device = self.fleet.by_id.get(source)
                self.activate(rule, source, Context(self, now_ms, device,
                                                    self.last_reading.get(source)))

    # ------------------------------------------------------------------ state

    def snapshot(self) -> Snapshot:
        """What changed since the last snapshot, as plain data (and it counts as saved)."""
        lights, instances = self.lights, self.instances
        snap = Snapshot(
            {d: None if (s := lights.get(d)) is None else saved_light(s)
             for d in self._dirty_lights},
            {k: None if (i := instances.get(k)) is None else
             SavedInstance(i.fingerprint, i.active, i.pending_since)
             for k in self._dirty_instances},
            {k: saved_alert(a) for k in self.alerting.dirty
             if (a := self.alerts.get(k)) is not None},
            self.watermark)
        self._dirty_lights.clear()
        self._dirty_instances.clear()
        self.alerting.dirty.clear()
        return snap

    def restore(self, saved: Snapshot) -> None:
        """Put saved state into a fresh engine: lights of devices the fleet no longer has,
        wishes of rules no longer there and instances of rules whose text changed are
        dropped; holds expire and `for:` timers run on as if the engine had not stopped."""
        fingerprints = {r.id: r.fingerprint for r in self.ruleset.rules}
        for device_id, light in saved.lights.items():
            if light is None or device_id not in self.fleet.by_id:
                continue
            state = LightState(device_id, level=light.level, reason=light.reason)
            for w in light.wishes:
                rule_id = w["key"].removeprefix("rule:").split("@")[0]
                if w["key"].startswith("rule:") and rule_id not in fingerprints:
                    continue
                state.wishes[w["key"]] = wish(w)
                if w["expires_ms"] is not None:
                    heapq.heappush(self._expiries, (w["expires_ms"], device_id))
            self.lights[device_id] = state
        for key, inst in saved.instances.items():
            if inst is not None and fingerprints.get(key[0]) == inst.fingerprint:
                self.instances[key] = Instance(inst.active, inst.pending_since, inst.fingerprint)
                if inst.pending_since is not None and not inst.active:
                    self._pending.add(key)
        for key, a in saved.alerts.items():
            self.alerts[key] = alert_state(key, a)
        if saved.watermark is not None:
            self.watermark = self.started_ms = saved.watermark

    # ------------------------------------------------------------------ explain

    def explain(self, device_id: str, now_ms: int | None = None) -> dict[str, Any]:
        """The light's level, the wish that won and every other wish with rule and expiry."""
        return explain(self, device_id, now_ms)
