"""The rule engine: readings and event time in, light wishes, commands and alerts out.

It reads no clock and opens no socket: time is the readings' timestamps (a
watermark, DESIGN.md §5) handed to :meth:`RuleEngine.advance`, and everything
it does to the world goes through the ``outbox`` it is given. The same engine
therefore runs live, in ``rules test`` with a fake outbox, and in a backtest.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any, Protocol

from billing import period_of, price_now
from citygrid import sun
from citygrid.city import CityProfile
from citygrid.fleet import Fleet, FleetDevice
from rules.arbitration import LightState, Wish
from rules.expr import EvalError, parse_duration
from rules.loader import CompiledRule, RuleSet
from rules.model import SUN_EVENTS, Select

log = logging.getLogger("citygrid.rules")
STANDBY_W = 0.5
LIGHTING_MEASUREMENT = "citygrid_lighting"
RULES_MEASUREMENT = "citygrid_rules"
BILLING_MEASUREMENT = "citygrid_billing"
TARIFF_MEASUREMENT = "citygrid_tariff"
ACK_RULE = "missing-ack"
_TEMPLATE = re.compile(r"\{(reading|device|light|sun|local|meter)\.([A-Za-z_][A-Za-z0-9_]*)\}")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Outbox(Protocol):
    def command(self, device: FleetDevice, payload: dict[str, Any], expiry_s: float) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    def alert(self, alert: AlertState, raised: bool) -> None: ...

    def points(self, points: list) -> None: ...


@dataclass
class AlertState:
    key: str  # "rule-id@device" or "rule-id@district"
    rule_id: str
    severity: str
    message: str
    scope: str
    since_ms: int
    sources: set[str] = field(default_factory=set)
    active: bool = True
    cleared_ms: int | None = None


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


class _Ctx:
    """What an expression sees; attribute lookups go through here."""

    __slots__ = ("reading", "device", "light", "engine", "ts_ms")

    def __init__(self, engine: RuleEngine, ts_ms: int, device: FleetDevice | None = None,
                 reading: dict | None = None):
        self.engine, self.ts_ms, self.device, self.reading = engine, ts_ms, device, reading
        self.light = engine.lights.get(device.device_id) if device else None

    def lookup(self, root: str, attr: str) -> Any:
        if root == "reading":
            if self.reading is None:
                raise EvalError("no reading here")
            return self.reading.get(attr)
        if root == "device":
            if self.device is None:
                raise EvalError("no device here")
            if attr == "id":
                return self.device.device_id
            if not hasattr(self.device, attr):
                raise EvalError(f"devices have no {attr!r}")
            return getattr(self.device, attr)
        if root == "light":
            if attr != "level":
                raise EvalError("light has only .level")
            if self.light is not None and self.light.level is not None:
                return self.light.level
            return (self.reading or {}).get("brightness_pct")
        if root == "sun":
            if attr != "elevation":
                raise EvalError("sun has only .elevation")
            return self.engine.sun_elevation(self.ts_ms)
        if root == "meter":
            return self.engine.meter_value(self.device, attr, self.ts_ms)
        local = self.engine.local_time(self.ts_ms)
        if attr == "hour":
            return local.hour + local.minute / 60
        if attr in ("minute", "weekday"):
            return local.minute if attr == "minute" else local.weekday()
        raise EvalError(f"local has hour, minute, weekday — not {attr!r}")

    def window(self, kind: str, field: str, seconds: float) -> float | None:
        if self.device is None:
            raise EvalError("windows need a device")
        values = [v for t, v in self.engine.windows[self.device.device_id].get(field, ())
                  if t > self.ts_ms - seconds * 1000]
        if kind == "count":
            return len(values)
        if not values:
            return None
        return {"avg": lambda: sum(values) / len(values), "min": lambda: min(values),
                "max": lambda: max(values)}[kind]()


def selects(select: Select, device: FleetDevice) -> bool:
    if select.kind and device.kind != select.kind:
        return False
    if select.district:
        districts = [select.district] if isinstance(select.district, str) else select.district
        if not any(fnmatchcase(device.district, d) for d in districts):
            return False
    return not select.devices or any(fnmatchcase(device.device_id, p) for p in select.devices)


def render(template: str, ctx: _Ctx) -> str:
    def value(match: re.Match) -> str:
        try:
            v = ctx.lookup(match[1], match[2])
        except EvalError:
            return match[0]
        return f"{v:g}" if isinstance(v, float) else str(v)

    return _TEMPLATE.sub(value, template)


class RuleEngine:
    def __init__(self, ruleset: RuleSet, fleet: Fleet, city: CityProfile, outbox: Outbox,
                 *, track_acks: bool = True, billing: Any = None):
        self.fleet, self.city, self.outbox = fleet, city, outbox
        self.billing = billing  # billing.ledger.BillingStore, for meters and `settle`
        self.track_acks = track_acks
        self.lights: dict[str, LightState] = {}
        self.instances: dict[tuple[str, str], Instance] = {}
        self.alerts: dict[str, AlertState] = {}
        self.health: dict[str, RuleHealth] = defaultdict(RuleHealth)
        self.windows: dict[str, dict[str, deque]] = defaultdict(dict)
        self.last_reading: dict[str, dict] = {}
        self.last_seen: dict[str, int] = {}
        self.pending_acks: dict[str, tuple[str, int]] = {}
        self.watermark: int | None = None
        self.started_ms: int | None = None
        self.commands_sent = 0
        self._expiries: list[tuple[int, str]] = []
        self._neighbours: dict[tuple[str, float], list[FleetDevice]] = {}
        self._lights_by_district: dict[str, list[FleetDevice]] = defaultdict(list)
        for d in fleet.of_kind("streetlight"):
            self._lights_by_district[d.district].append(d)
        self._floor_on: bool | None = None
        self._last_report_minute: int | None = None
        self._cmd_seq = 0
        self._last_tick = None
        self._energy: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._last_energy_ts: dict[str, int] = {}
        # What changed since the state was last saved (rules/state.py writes just that).
        self.dirty_lights: set[str] = set()
        self.dirty_instances: set[tuple[str, str]] = set()
        self.dirty_alerts: set[str] = set()
        self._touched: set[str] = set()  # lights whose wishes changed during this event
        self._pending: set[tuple[str, str]] = set()  # instances waiting out a `for:`
        self._ack_deadlines: list[tuple[int, str, str]] = []
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
        self.reading_rules = [r for r in ruleset.rules
                              if r.rule.enabled and r.rule.when.reading is not None]
        self.schedule_rules = [r for r in ruleset.rules
                               if r.rule.enabled and r.rule.when.schedule is not None]
        self.absence_rules = [r for r in ruleset.rules
                              if r.rule.enabled and r.rule.when.absent is not None]
        spans: dict[str, float] = {}
        for r in ruleset.rules:
            for expr in (r.condition, r.clear):
                for f, s in expr.windows if expr else ():
                    spans[f] = max(spans.get(f, 0), s)
        self.window_spans = spans
        self._rules_for: dict[tuple[str, str], list[CompiledRule]] = {}
        self._floor_on = None

    def _drop_instance(self, key: tuple[str, str]) -> None:
        rule_id, source = key
        self.instances.pop(key, None)
        self.dirty_instances.add(key)
        wish_key = f"rule:{rule_id}@{source}"
        for light in self.lights.values():
            if light.wishes.pop(wish_key, None) is not None:
                self._touched.add(light.device_id)
        for akey in [k for k, a in self.alerts.items() if a.rule_id == rule_id]:
            self._clear_alert(akey, source=None, now_ms=self.watermark or 0)

    def rules_for(self, device: FleetDevice) -> list[CompiledRule]:
        key = (device.kind, device.device_id)
        rules = self._rules_for.get(key)
        if rules is None:
            rules = self._rules_for[key] = [r for r in self.reading_rules
                                            if selects(r.rule.when.reading, device)]
        return rules

    # ------------------------------------------------------------------ time

    @lru_cache(maxsize=8192)  # noqa: B019 - one engine per process; 10 s buckets
    def _elevation_bucket(self, bucket: int) -> float:
        return sun.elevation(self.city.lat, self.city.lon,
                             datetime.fromtimestamp(bucket * 10, self.city.tz))

    def sun_elevation(self, ts_ms: int) -> float:
        return self._elevation_bucket(ts_ms // 10_000)

    def local_time(self, ts_ms: int) -> datetime:
        return datetime.fromtimestamp(ts_ms / 1000, self.city.tz)

    def floor_active(self, ts_ms: int) -> bool:
        try:
            return bool(self.ruleset.floor_when(_Ctx(self, ts_ms)))
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
            self._account_energy(device, reading, ts_ms)
        elif self.billing is not None and isinstance(reading.get("energy_kwh"), int | float):
            for kind, detail in self.billing.on_reading(device_id, ts_ms, reading["energy_kwh"]):
                self._billing_alert(kind, device, detail, ts_ms)
        for rule in self.absence_rules:
            if (rule.id, device_id) in self.instances and selects(rule.rule.when.absent.select,
                                                                  device):
                self._deactivate(rule, device_id, device, None, ts_ms)
        ctx = _Ctx(self, ts_ms, device, reading)
        for rule in self.rules_for(device):
            self._evaluate(rule, device_id, ctx)
        self._settle(ts_ms)

    def _settle(self, now_ms: int) -> None:
        """Recompute the lights this event touched, once each: one command per change."""
        while self._touched:
            device_id = self._touched.pop()
            self._recompute(self.fleet.by_id[device_id], now_ms)

    def _evaluate(self, rule: CompiledRule, source: str, ctx: _Ctx) -> None:
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
            self.dirty_instances.add(key)
        if inst.active:
            if holds:
                self._refresh(rule, source, ctx)
            else:
                self._deactivate(rule, source, ctx.device, ctx, ctx.ts_ms)
            return
        if not holds:
            self.instances.pop(key, None)
            self.dirty_instances.add(key)
            return
        if rule.for_s and inst.pending_since is None:
            inst.pending_since = ctx.ts_ms
            self._pending.add(key)
            self.dirty_instances.add(key)
        if not rule.for_s or ctx.ts_ms - inst.pending_since >= rule.for_s * 1000:
            self._activate(rule, source, ctx)

    # ------------------------------------------------------------------ rule lifecycle

    def _targets(self, rule: CompiledRule, action, source_device: FleetDevice | None
                 ) -> list[FleetDevice]:
        if source_device is None:  # a schedule: its selection
            select = rule.rule.when.schedule.select
            return [d for d in self.fleet.of_kind("streetlight") if selects(select, d)]
        if source_device.kind != "streetlight" and action.scope == "self":
            return []
        if action.scope == "self":
            return [source_device]
        if action.scope == "district":
            return self._lights_by_district[source_device.district]
        key = (source_device.device_id, action.radius_m)
        near = self._neighbours.get(key)
        if near is None:
            near = self._neighbours[key] = [
                d for d in self.fleet.neighbours(source_device.device_id, action.radius_m)
                if d.kind == "streetlight"]
        return ([source_device] if source_device.kind == "streetlight" else []) + near

    def _activate(self, rule: CompiledRule, source: str, ctx: _Ctx) -> None:
        inst = self.instances[(rule.id, source)]
        inst.active, inst.pending_since = True, None
        self.dirty_instances.add((rule.id, source))
        health = self.health[rule.id]
        health.fired += 1
        health.last_fired_ms = ctx.ts_ms
        for action in rule.rule.then:
            if action.set_light:
                self._wish(rule, source, action.set_light, ctx)
            elif action.alert:
                self._raise_alert(rule, source, action.alert, ctx)
            elif action.settle:
                self._settle_meter(ctx.device, action.settle.periods == "ended", ctx.ts_ms)
            elif action.publish:
                p = action.publish
                body = p.payload if isinstance(p.payload, str) else _json(p.payload)
                self.outbox.publish(render(p.topic, ctx), render(body, ctx).encode(), p.qos,
                                    p.retain)

    def _refresh(self, rule: CompiledRule, source: str, ctx: _Ctx) -> None:
        """Still active: a held wish starts its hold again (motion keeps the light up), and a
        settlement is tried again — it is idempotent, and a crash may have cut the last one."""
        for action in rule.rule.then:
            if action.set_light and action.set_light.hold is not None:
                self._wish(rule, source, action.set_light, ctx)
            elif action.settle:
                self._settle_meter(ctx.device, action.settle.periods == "ended", ctx.ts_ms)

    def _deactivate(self, rule: CompiledRule, source: str, device: FleetDevice | None,
                    ctx: _Ctx | None, now_ms: int) -> None:
        self.instances.pop((rule.id, source), None)
        self.dirty_instances.add((rule.id, source))
        for action in rule.rule.then:
            if action.set_light and action.set_light.hold is None:
                wish_key = f"rule:{rule.id}@{source}"
                for light in self._targets(rule, action.set_light, device):
                    state = self.lights.get(light.device_id)
                    if state is not None and state.wishes.pop(wish_key, None) is not None:
                        self._touched.add(light.device_id)
            elif action.alert:
                scope = device.district if (device and action.alert.per == "district") else source
                self._clear_alert(f"{rule.id}@{scope}", source, now_ms)

    def _wish(self, rule: CompiledRule, source: str, action, ctx: _Ctx) -> None:
        hold = parse_duration(action.hold) if action.hold is not None else None
        expires = ctx.ts_ms + int(hold * 1000) if hold else None
        wish = Wish(f"rule:{rule.id}@{source}", action.priority, action.level,
                    f"rule:{rule.id}", expires, ctx.ts_ms)
        for light in self._targets(rule, action, ctx.device):
            state = self.lights.setdefault(light.device_id, LightState(light.device_id))
            state.wishes[wish.key] = wish
            if expires is not None:
                heapq.heappush(self._expiries, (expires, light.device_id))
            self._touched.add(light.device_id)

    # ------------------------------------------------------------------ lights

    def _recompute(self, light: FleetDevice, now_ms: int) -> None:
        state = self.lights.setdefault(light.device_id, LightState(light.device_id))
        self.dirty_lights.add(light.device_id)
        floor = self.floor_level if self._floor(now_ms) else None
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
            deadline = now_ms + int(self.ruleset.ack_timeout_s * 1000)
            self.pending_acks[light.device_id] = (payload["id"], deadline)
            heapq.heappush(self._ack_deadlines, (deadline, light.device_id, payload["id"]))
        self.outbox.command(light, payload, self.ruleset.command_expiry_s)

    def _floor(self, now_ms: int) -> bool:
        return self.floor_active(now_ms)

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

    # ------------------------------------------------------------------ billing

    def meter_value(self, device: FleetDevice | None, attr: str, ts_ms: int) -> Any:
        if self.billing is None or device is None or device.kind != "meter":
            raise EvalError("meter.* is known for meters, with billing configured")
        info = self.billing.unbilled(device.device_id)
        if attr == "unbilled_kwh":
            return info["kwh"]
        if attr == "unbilled_amount":
            return info["amount"]
        if attr == "period_ended":
            return info["oldest_period"] is not None and info["oldest_period"] < period_of(
                ts_ms, self.city.tz)
        raise EvalError(f"meter has unbilled_kwh, unbilled_amount, period_ended — not {attr!r}")

    def _settle_meter(self, device: FleetDevice | None, ended_only: bool, now_ms: int) -> None:
        if self.billing is None or device is None or device.kind != "meter":
            return
        for s in self.billing.settle(device.device_id, now_ms, ended_periods_only=ended_only):
            topic = f"city/v1/{device.district}/meter/{device.device_id}/settlement"
            self.outbox.publish(topic, _json({**s.entry, "hash": s.hash}).encode(), 1, False)
            from citygrid.store import Point

            self.outbox.points([Point(BILLING_MEASUREMENT, {
                "meter": device.device_id, "account": s.entry["account"],
                "district": device.district, "tariff": s.entry["tariff"]}, {
                "kwh": float(s.entry["kwh"]), "amount_minor": s.entry["amount_minor"],
                "balance_minor": s.entry["balance_after_minor"]}, now_ms)])
            key = f"low-balance@{s.entry['account']}"
            if s.low_balance:
                self._raise_alert_direct(key, "low-balance", "major",
                                         f"Account {s.entry['account']} balance "
                                         f"{s.entry['balance_after_minor'] / 100:.2f} "
                                         f"{s.entry['currency']} is low", s.entry["account"],
                                         now_ms)
            else:
                self._clear_alert(key, None, now_ms)

    def _billing_alert(self, kind: str, device: FleetDevice, detail: str, now_ms: int) -> None:
        key = f"billing-{kind}@{device.device_id}"
        if kind == "spike_dropped":
            self._clear_alert(f"billing-spike@{device.device_id}", None, now_ms)
            return
        severity = "major" if kind in ("spike", "held") else "minor"
        self._raise_alert_direct(key, f"billing-{kind}", severity,
                                 f"Meter {device.device_id}: {detail}", device.device_id, now_ms)

    def _raise_alert_direct(self, key: str, rule_id: str, severity: str, message: str,
                            scope: str, now_ms: int) -> None:
        alert = self.alerts.get(key)
        if alert is not None and alert.active:
            return
        self.alerts[key] = AlertState(key, rule_id, severity, message, scope, now_ms, {scope})
        self.dirty_alerts.add(key)
        self.outbox.alert(self.alerts[key], True)

    # ------------------------------------------------------------------ alerts

    def _raise_alert(self, rule: CompiledRule, source: str, action, ctx: _Ctx) -> None:
        scope = ctx.device.district if (ctx.device and action.per == "district") else source
        key = f"{rule.id}@{scope}"
        alert = self.alerts.get(key)
        if alert is not None and alert.active:
            alert.sources.add(source)
            self.dirty_alerts.add(key)
            return
        alert = self.alerts[key] = AlertState(key, rule.id, action.severity,
                                              render(action.message, ctx), scope, ctx.ts_ms,
                                              {source})
        self.dirty_alerts.add(key)
        self.outbox.alert(alert, True)

    def _clear_alert(self, key: str, source: str | None, now_ms: int) -> None:
        alert = self.alerts.get(key)
        if alert is None or not alert.active:
            return
        if source is not None:
            alert.sources.discard(source)
            if alert.sources:
                self.dirty_alerts.add(key)
                return
        alert.active, alert.cleared_ms = False, now_ms
        self.dirty_alerts.add(key)
        self.outbox.alert(alert, False)

    def on_ack(self, device_id: str, ack: dict[str, Any], now_ms: int | None = None) -> None:
        pending = self.pending_acks.get(device_id)
        if pending and pending[0] == ack.get("id"):
            del self.pending_acks[device_id]
            self._clear_alert(f"{ACK_RULE}@{device_id}", None, now_ms or self.watermark or 0)

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
        floor = self._floor(now_ms)
        if floor != self._floor_on and self._floor_on is not None:
            for device_id in list(self.lights):
                self._recompute(self.fleet.by_id[device_id], now_ms)
        self._floor_on = floor
        self._pending_timers(now_ms)
        self._schedules(now_ms)
        self._absences(now_ms)
        self._ack_timeouts(now_ms)
        self._flush_energy(now_ms)
        self._report(now_ms)
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
                self._activate(rule, source, _Ctx(self, now_ms, device,
                                                  self.last_reading.get(source)))

    def _schedules(self, now_ms: int) -> None:
        for rule in self.schedule_rules:
            inside = self._in_window(rule.rule.when.schedule, now_ms)
            try:
                holds = inside and (rule.condition is None or bool(rule.condition(
                    _Ctx(self, now_ms))))
            except EvalError as e:
                self.health[rule.id].errors += 1
                self.health[rule.id].last_error = str(e)
                continue
            key = (rule.id, "schedule")
            active = key in self.instances and self.instances[key].active
            if holds and not active:
                self.instances[key] = Instance(fingerprint=rule.fingerprint)
                self.dirty_instances.add(key)
                self._activate(rule, "schedule", _Ctx(self, now_ms))
            elif active and not holds:
                self._deactivate(rule, "schedule", None, None, now_ms)

    def _event_time(self, spec: str, day) -> datetime | None:
        match = re.match(r"^(?:(\d\d):(\d\d)|([a-z_]+))(?:\s*([+-])\s*(.+))?$", spec)
        offset = timedelta(seconds=parse_duration(match[5].replace(" ", ""))) if match[5] else \
            timedelta()
        if match[4] == "-":
            offset = -offset
        if match[3]:
            assert match[3] in SUN_EVENTS
            when = sun.event(match[3], self.city.lat, self.city.lon, day)
            return None if when is None else when.astimezone(self.city.tz) + offset
        return datetime(day.year, day.month, day.day, int(match[1]), int(match[2]),
                        tzinfo=self.city.tz) + offset

    def _in_window(self, schedule, now_ms: int) -> bool:
        now = self.local_time(now_ms)
        for back in (1, 0):
            day = (now - timedelta(days=back)).date()
            if schedule.days and _DAYS[day.weekday()] not in schedule.days:
                continue
            start = self._event_time(schedule.from_, day)
            end = self._event_time(schedule.to, day)
            if start is None or end is None:
                continue
            if end <= start:
                end = self._event_time(schedule.to, day + timedelta(days=1))
                if end is None:
                    continue
            if start <= now < end:
                return True
        return False

    def _absences(self, now_ms: int) -> None:
        for rule in self.absence_rules:
            spec = rule.rule.when.absent
            limit = parse_duration(spec.for_) * 1000
            for device in self.fleet:
                if not selects(spec.select, device):
                    continue
                seen = self.last_seen.get(device.device_id, self.started_ms or now_ms)
                key = (rule.id, device.device_id)
                if now_ms - seen >= limit and key not in self.instances:
                    self.instances[key] = Instance(fingerprint=rule.fingerprint)
                    self.dirty_instances.add(key)
                    self._activate(rule, device.device_id, _Ctx(self, now_ms, device))

    def _ack_timeouts(self, now_ms: int) -> None:
        while self._ack_deadlines and self._ack_deadlines[0][0] <= now_ms:
            _, device_id, cmd_id = heapq.heappop(self._ack_deadlines)
            if self.pending_acks.get(device_id, (None,))[0] != cmd_id:
                continue  # acknowledged, or superseded by a newer command
            del self.pending_acks[device_id]
            key = f"{ACK_RULE}@{device_id}"
            if key in self.alerts and self.alerts[key].active:
                continue
            self.alerts[key] = AlertState(key, ACK_RULE, "minor",
                                          f"No acknowledgement from {device_id} for command "
                                          f"{cmd_id}", device_id, now_ms, {device_id})
            self.dirty_alerts.add(key)
            self.outbox.alert(self.alerts[key], True)

    # ------------------------------------------------------------------ energy

    def _account_energy(self, device: FleetDevice, reading: dict, ts_ms: int) -> None:
        last = self._last_energy_ts.get(device.device_id)
        self._last_energy_ts[device.device_id] = ts_ms
        power = reading.get("power_w")
        if last is None or not isinstance(power, int | float) or not 0 < ts_ms - last <= 900_000:
            return
        hours = (ts_ms - last) / 3_600_000
        bucket = self._energy[(ts_ms // 60_000, device.district)]
        bucket[0] += power * hours
        if self._floor(ts_ms):  # night: the baseline burns at full power
            rated = device.rated_w or 0.0
            bucket[1] += (rated * (1 + self.ruleset.settings.lamp_loss) + STANDBY_W) * hours
        else:
            bucket[1] += power * hours

    def _flush_energy(self, now_ms: int) -> None:
        from citygrid.store import Point

        current = now_ms // 60_000
        done = [k for k in self._energy if k[0] < current]
        if not done:
            return
        g_per_kwh = self.ruleset.settings.co2_g_per_kwh
        points = []
        for minute, district in sorted(done):
            used, baseline = self._energy.pop((minute, district))
            saved = max(0.0, baseline - used)
            points.append(Point(LIGHTING_MEASUREMENT, {"district": district}, {
                "energy_wh": used, "baseline_wh": baseline, "saved_wh": saved,
                "saved_pct": (saved / baseline * 100) if baseline > 0 else 0.0,
                "co2_avoided_g": saved / 1000 * g_per_kwh}, minute * 60_000))
        self.outbox.points(points)

    def _report(self, now_ms: int) -> None:
        """Once a minute of event time: the engine's own figures, measurement citygrid_rules
        (per rule: evaluations, fired, errors; and lights on/dimmed/off, commands, alerts)."""
        from citygrid.store import Point

        minute = now_ms // 60_000
        if minute == self._last_report_minute:
            return
        self._last_report_minute = minute
        ts = minute * 60_000
        levels = [s.level for s in self.lights.values() if s.level is not None]
        points = [Point(RULES_MEASUREMENT, {"rule": rule_id}, {
            "evaluations": h.evaluations, "fired": h.fired, "errors": h.errors}, ts)
            for rule_id, h in sorted(self.health.items())]
        points.append(Point(RULES_MEASUREMENT, {}, {
            "lights_on": sum(1 for v in levels if v >= 100),
            "lights_dimmed": sum(1 for v in levels if 0 < v < 100),
            "lights_off": sum(1 for v in levels if v == 0),
            "commands_total": self.commands_sent,
            "acks_pending": len(self.pending_acks),
            "alerts_active": sum(1 for a in self.alerts.values() if a.active)}, ts))
        if self.billing is not None:  # the price bands, for the energy dashboard
            config = self.billing.config
            points += [Point(TARIFF_MEASUREMENT, {"tariff": name}, {
                "price": float(price_now(config, name, self.city.tz, ts)),
                "currency": config.currency}, ts) for name in sorted(config.tariffs)]
        self.outbox.points(points)

    # ------------------------------------------------------------------ explain

    def explain(self, device_id: str, now_ms: int | None = None) -> dict[str, Any]:
        """The light's level, the wish that won and every other wish with rule and expiry."""
        now = now_ms if now_ms is not None else (self.watermark or 0)
        state = self.lights.get(device_id, LightState(device_id))
        floor = self._floor(now)
        decision = state.decide(now, self.default_level, self.floor_level if floor else None)
        wishes = sorted((w for w in state.wishes.values() if w.alive(now)),
                        key=lambda w: (-_rank(w.cls), -w.level))
        return {
            "device_id": device_id, "at_ms": now, "level": decision.level,
            "commanded": state.level, "reason": decision.reason,
            "safety_floor": {"active": floor, "level": self.floor_level,
                             "applied": decision.floored},
            "winner": _wish_dict(decision.winner, now) if decision.winner else None,
            "wishes": [_wish_dict(w, now) for w in wishes],
        }


def _rank(cls: str) -> int:
    from rules.arbitration import RANK

    return RANK[cls]


def _wish_dict(w: Wish, now: int) -> dict[str, Any]:
    return {"class": w.cls, "level": w.level, "reason": w.reason, "key": w.key,
            "since_ms": w.since_ms, "expires_ms": w.expires_ms,
            "expires_in_s": None if w.expires_ms is None else (w.expires_ms - now) / 1000}


def _json(payload: dict) -> str:
    import json

    return json.dumps(payload)
