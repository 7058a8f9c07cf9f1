"""The rule engine's core: readings and event time in, rules evaluated, their instances
through ``for:`` and hysteresis, light wishes arbitrated into commands.

It reads no clock and opens no socket: time is the readings' timestamps (a
watermark, DESIGN.md §5) handed to :meth:`RuleEngine.advance`, and everything
it does to the world goes through the ``outbox`` it is given (and the ``billing``
store, for meters). The same engine therefore runs live, in ``rules test`` with a
fake outbox, and in a backtest.

Readings come one at a time (:meth:`RuleEngine.on_reading`) or as a batch, every reading
of one socket read (:meth:`RuleEngine.on_readings`): the same results, with the per-reading
work of the loop (look-ups, the watermark, each device's rules ready to run) done once.

An engine may own only some districts (``owned_districts``, partitioned workers): it keeps
the whole fleet, acts on its own devices and listens to the foreign ones whose readings
reach its lights across a border (:func:`foreign_inputs`) — see :meth:`RuleEngine.set_partition`.

Beside it: what a firing rule does (rules/actions/, one module per action), alerts
(rules/alerts.py), acknowledgements (rules/acks.py), schedules and absences
(rules/schedules.py), lighting energy (rules/energy.py), the lamp monitor
(rules/lampmon.py: lamp failure, power, day-burning, cycling, cabinets, burning hours, opt-in
per rule file), the engine's own figures
(rules/report.py), its state as plain data (rules/snapshot.py), and why a light is at its
level (rules/explain.py).
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict, deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from billing import BillingConfig, Settlement
from citygrid.city import CityProfile
from citygrid.fleet import Fleet, FleetDevice
from citygrid.lamps import LampTypes
from citygrid.lamps import load as load_lamp_types
from rules import schedules
from rules.acks import Acks
from rules.actions import ACTIONS, ActionType, Plan, Step, plan
from rules.actions.set_light import NeighbourIndex
from rules.alerts import ACK_RULE, Alerts, AlertState
from rules.arbitration import LightState, Wish
from rules.calendar import CalendarRunner
from rules.context import Context, selects
from rules.energy import LightingEnergy
from rules.explain import explain
from rules.expr import EvalError
from rules.lampmon import LampMonitor
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
           "RuleHealth", "crossing_rules", "foreign_inputs", "partition_caveats"]
Reading = tuple[str, dict[str, Any], int]  # (device id, fields without ts, ts in ms)
_NUMBER = (int, float)  # isinstance(x, int | float) without building the union each time


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

    def on_reading(self, meter_id: str, ts_ms: int, energy_kwh: float,
                   export_kwh: float | None = None) -> list[tuple[str, str]]: ...

    def price_now(self, tariff: str, ts_ms: int) -> Decimal | None: ...

    def unpriced(self, meter_id: str, kind: str = "energy") -> int: ...

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


# --------------------------------------------------------------------------- partitions
# What crosses a district border: only ``set_light`` with ``scope: neighbours`` — a light's
# (or an absent light's) rule wishing on the lights within ``radius_m``, which may stand in
# another district. A rule's other actions (alerts, publish, settle), ``scope: self`` and
# ``scope: district`` act on the source device and its own district only.


def _crossing_specs(rule: CompiledRule) -> list[Any]:
    return [a.set_light for a in rule.rule.then
            if a.set_light is not None and a.set_light.scope == "neighbours"]


def crossing_rules(ruleset: RuleSet) -> list[CompiledRule]:
    """The enabled rules whose effects can cross a district border: triggered by a reading or
    an absence, with a ``set_light`` on the neighbours."""
    return [r for r in ruleset.rules if r.rule.enabled and r.rule.when.schedule is None
            and _crossing_specs(r)]


def _trigger(rule: CompiledRule) -> Any:
    when = rule.rule.when
    return when.reading if when.reading is not None else when.absent.select


def _reaches(rule: CompiledRule, device: FleetDevice, near: Any) -> bool:
    """Does ``rule``, fired for ``device``, wish on a light ``near(device, radius)`` gives?"""
    return selects(_trigger(rule), device) and any(
        near(device, spec.radius_m) for spec in _crossing_specs(rule))


def foreign_inputs(ruleset: RuleSet, fleet: Fleet, owned_districts: Collection[str]
                   ) -> frozenset[str]:
    """The devices outside ``owned_districts`` whose readings an engine owning them must also
    receive: each is selected by a crossing rule (:func:`crossing_rules`) and has one of the
    engine's own lights within that rule's radius. (The same answer as
    :meth:`RuleEngine.foreign_inputs`; ask again after the rules or the fleet changed.)"""
    owned = frozenset(owned_districts)
    rules = crossing_rules(ruleset)
    if not rules:
        return frozenset()
    indexes: dict[float, NeighbourIndex] = {}

    def near(device: FleetDevice, radius: float) -> bool:
        index = indexes.get(radius)
        if index is None:
            index = indexes[radius] = NeighbourIndex(fleet, radius)
        return any(d.district in owned for d in index.neighbours(device))

    return frozenset(d.device_id for d in fleet if d.district not in owned
                     and any(_reaches(r, d, near) for r in rules))


def partition_caveats(ruleset: RuleSet, fleet: Fleet | None = None) -> list[str]:
    """Why N engines owning districts would not act exactly as one over the same readings,
    beyond event time (each engine must see the same watermarks, rules/engine.py's
    set_partition); empty when they would."""
    caveats = []
    for r in crossing_rules(ruleset):
        for name, expr in (("if", r.condition), ("clear_if", r.clear)):
            if expr is not None and any(n.startswith("light.") for n in expr.names):
                caveats.append(f"rule {r.id}: its {name} reads light.level, which an engine "
                               "knows only for its own lights, and the rule reaches across "
                               "district borders (set_light on neighbours)")
    if fleet is not None:
        districts: dict[str, set[str]] = defaultdict(set)
        for d in fleet:
            if d.kind == "meter" and d.account_id:
                districts[d.account_id].add(d.district)
        shared = sorted(a for a, ds in districts.items() if len(ds) > 1)
        if shared:
            caveats.append(f"accounts with meters in several districts ({', '.join(shared[:5])}"
                           f"{' …' if len(shared) > 5 else ''}): their balance and "
                           "low-balance alert are shared by engines")
    return caveats


class _Run:
    """A reading rule ready for the loop: its compiled conditions and what refreshes it."""

    __slots__ = ("rule", "id", "condition", "clear", "refresh", "health")

    def __init__(self, rule: CompiledRule, refresh: tuple[Step, ...]):
        self.rule, self.id = rule, rule.id
        self.health: RuleHealth | None = None  # the engine's, from the first evaluation on
        self.condition = rule.condition.evaluate if rule.condition is not None else None
        self.clear = rule.clear.evaluate if rule.clear is not None else None
        self.refresh = refresh


class _Program:
    """One device's share of the rules: what a reading from it does."""

    __slots__ = ("device", "owned", "inert", "light", "bills", "runs", "absent")

    def __init__(self, device: FleetDevice, owned: bool, runs: tuple, absent: tuple):
        self.device, self.owned = device, owned
        self.inert = not owned and not runs and not absent  # foreign: its time only
        self.light = owned and device.kind == "streetlight"
        self.bills = owned and device.kind != "streetlight"
        self.runs, self.absent = runs, absent


class RuleEngine:
    def __init__(self, ruleset: RuleSet, fleet: Fleet, city: CityProfile, outbox: Outbox,
                 *, track_acks: bool = True, billing: Billing | None = None,
                 owned_districts: Collection[str] | None = None,
                 lamp_types: LampTypes | None = None):
        """``lamp_types``: what the lamp monitor compares readings with (default: the
        embedded ones, citygrid/lamptypes.yaml)."""
        self.fleet, self.city, self.outbox = fleet, city, outbox
        self.billing = billing  # for meters and `settle`
        self.track_acks = track_acks
        self.city_time = schedules.CityTime(city)
        self.alerting = Alerts(outbox)
        self.alerts: dict[str, AlertState] = self.alerting.by_key  # the same dict
        self.acks = Acks()
        self.pending_acks: dict[str, tuple[str, int]] = self.acks.pending  # the same dict
        self.energy = LightingEnergy(self)
        self.lamps = LampMonitor(self, lamp_types if lamp_types is not None else
                                 load_lamp_types())
        # The broker node the runner is connected to and its failovers (the self-report).
        self.mqtt_node, self.mqtt_failovers = "", 0
        # Set by the leading runner's look for overdue invoices: (accounts, minor units owed
        # past due); None elsewhere, and then not in the self-report.
        self.overdue: tuple[int, int] | None = None
        self._lamp_reading = None  # the monitor's on_reading while a rule file turns it on
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
        self._floor_memo: tuple[int | None, bool] = (None, False)  # (second, floor on)
        self._cmd_seq = 0
        self._last_tick = None
        # What changed since the last snapshot (and self.alerting.dirty): rules/state.py saves
        # just that.
        self._dirty_lights: set[str] = set()
        self._dirty_instances: set[tuple[str, str]] = set()
        self._touched: set[str] = set()  # lights whose wishes changed during this event
        # Instances waiting out a `for:`, by when it is over: (due ms, rule id, source); an
        # entry whose instance fired, went or started over since is skipped when it comes up.
        self._pending: list[tuple[float, str, str]] = []
        # The districts this engine owns (None: all), and whether it also runs the effects
        # that belong to no district (a schedule rule's alerts and publishes).
        self.owned_districts: frozenset[str] | None = (
            None if owned_districts is None else frozenset(owned_districts))
        self._primary = True
        self._programs: dict[str, _Program] = {}
        self._absent_devices: dict[str, list[FleetDevice]] = {}
        self.actions: dict[str, ActionType] = {name: cls(self) for name, cls in ACTIONS.items()}
        self.calendar = CalendarRunner(self)  # lighting calendars (rules/calendar.py)
        self.set_rules(ruleset)
        if self.owned_districts is not None:
            self.set_partition(self.owned_districts)

    # ------------------------------------------------------------------ rules

    def set_rules(self, ruleset: RuleSet) -> None:
        """Use new rules; rules whose text did not change keep their state."""
        self.ruleset = ruleset
        self.default_level = ruleset.settings.default_level
        self.floor_level = ruleset.settings.safety_floor.level
        keep = {r.id: r.fingerprint for r in ruleset.rules}
        self._drop_instances([k for k, inst in self.instances.items()
                              if keep.get(k[0]) != inst.fingerprint])
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
        self._rule_by_id: dict[str, CompiledRule] = {}
        for r in ruleset.rules:
            self._rule_by_id.setdefault(r.id, r)
        self._crossing = {r.id for r in crossing_rules(ruleset)}
        self._floor_on = None
        self._floor_memo = (None, False)
        self._ack_timeout_ms = int(ruleset.ack_timeout_s * 1000)  # parsed once, not a command
        self._command_expiry_s = ruleset.command_expiry_s
        self.lamps.configure(ruleset.settings.lamp_monitor)
        self._lamp_reading = self.lamps.on_reading if self.lamps.enabled else None
        self._derived()

    def _derived(self) -> None:
        """What follows from the rules, the fleet and the partition: action plans, each
        device's rules (built on its first reading)."""
        self._plans: dict[str, Plan] = {r.id: plan(r, self.actions) for r in self.ruleset.rules}
        self._light_plans: dict[str, Plan] = {r.id: plan(r, self.actions, ("set_light",))
                                              for r in self.ruleset.rules}
        self._runs = {r.id: _Run(r, self._plans[r.id].refresh) for r in self.reading_rules}
        self._foreign_runs = {r.id: _Run(r, self._light_plans[r.id].refresh)
                              for r in self.reading_rules if r.id in self._crossing}
        self._rules_for: dict[tuple[str, str], list[CompiledRule]] = {}
        self._programs = {}
        self._absent_devices = {}
        self.calendar.reset()

    def set_fleet(self, fleet: Fleet) -> None:
        """Use a new inventory (the registry changed): devices added are taken from their
        next reading, moved ones are selected (district rules, neighbours) where they stand
        now, and a device no longer there (revoked) loses its state and gets no command."""
        gone = set(self.fleet.by_id) - set(fleet.by_id)
        self.fleet = fleet
        if self.billing is not None:
            self.billing.fleet = fleet
        for device_id in gone:
            self._forget(device_id)
        # Its wishes on the lights that remain (a neighbour's boost) go with it.
        self._drop_instances([k for k in self.instances if k[1] in gone], clear_alerts=False)
        # What was derived from where devices stand: selections, districts, neighbours.
        self.actions = {name: cls(self) for name, cls in ACTIONS.items()}
        self._partition_changed()

    def _forget(self, device_id: str) -> None:
        """A device's state goes (revoked, or no longer this engine's), without a command."""
        self._forget_light(device_id)
        self.last_reading.pop(device_id, None)
        self.windows.pop(device_id, None)

    def _forget_light(self, device_id: str) -> None:
        if self.lights.pop(device_id, None) is not None or device_id not in self.fleet.by_id:
            self._dirty_lights.add(device_id)  # (a revoked device's row goes in any case)
        self._touched.discard(device_id)
        self.acks.pending.pop(device_id, None)
        self.lamps.forget(device_id)

    def _drop_instance(self, key: tuple[str, str], *, clear_alerts: bool = True) -> None:
        self._drop_instances([key], clear_alerts=clear_alerts)

    def _drop_instances(self, keys: Iterable[tuple[str, str]], *,
                        clear_alerts: bool = True) -> None:
        """Instances go, with their wishes on every light (one pass over the lights for all
        of them) and, if asked, their rules' alerts."""
        wish_keys: set[str] = set()
        cleared: set[str] = set()
        for key in keys:
            rule_id, source = key
            self.instances.pop(key, None)
            self._dirty_instances.add(key)
            wish_keys.add(f"rule:{rule_id}@{source}")
            if clear_alerts and rule_id not in cleared:
                cleared.add(rule_id)  # once a rule: its alerts are cleared then
                self.alerting.clear_rule(rule_id, self.watermark or 0)
        if not wish_keys:
            return
        for light in self.lights.values():
            wishes = light.wishes
            for k in [k for k in wishes if k in wish_keys]:
                del wishes[k]
                self._touched.add(light.device_id)

    def rules_for(self, device: FleetDevice) -> list[CompiledRule]:
        key = (device.kind, device.device_id)
        rules = self._rules_for.get(key)
        if rules is None:
            rules = self._rules_for[key] = [r for r in self.reading_rules
                                            if selects(r.rule.when.reading, device)]
        return rules

    def floor_active(self, ts_ms: int) -> bool:
        # The floor's condition sees no device and no reading: it is a function of event time
        # alone (the sun in 10 s steps, local time in minutes), so one evaluation a second.
        second = ts_ms // 1000
        memo = self._floor_memo
        if memo[0] == second:
            return memo[1]
        try:
            on = bool(self.ruleset.floor_when(Context(self, ts_ms)))
        except EvalError:
            on = False
        self._floor_memo = (second, on)
        return on

    # ------------------------------------------------------------------ partitions

    def set_partition(self, owned_districts: Collection[str] | None) -> None:
        """Own only the devices of these districts (None: all). The engine keeps the whole
        fleet; it commands, alerts, bills, counts energy and health for its own devices only,
        and a reading of a foreign device (:meth:`foreign_inputs`) acts only on its own lights
        (a neighbour's motion across the border). Any other foreign reading only moves event
        time. State of devices it no longer owns goes, without a command.

        N engines owning disjoint districts and fed their own and foreign-input readings give
        together exactly one engine's commands, alerts, settlements and energy points when
        every engine sees the same event time: timers (holds running out, `for:`, schedules,
        absences, missing acks, the safety floor switching) act at an engine's watermark, so
        each must also be handed the other readings' timestamps (:meth:`advance`, or the
        readings themselves) — or every district reports at each instant. Without that, each
        light still gets the same commands in the same order, a timer's at most one own
        reading later. Also needed: no crossing rule reads ``light.level`` (an engine knows
        only its own lights' levels), no account with meters in two engines' districts (its
        balance and low-balance alert), a schedule rule's alerts and publishes come from the
        engine owning the fleet's first district (by name). Command ids (``device-ts-n``, n
        counting the engine's commands) and the engine's own figures (citygrid_rules points,
        health) are each engine's: their sums are the one engine's. See
        :func:`partition_caveats`."""
        self.owned_districts = None if owned_districts is None else frozenset(owned_districts)
        self.actions = {name: cls(self) for name, cls in ACTIONS.items()}
        self._partition_changed()

    def owns(self, device: FleetDevice) -> bool:
        return self.owned_districts is None or device.district in self.owned_districts

    def foreign_inputs(self) -> frozenset[str]:
        """The foreign devices whose readings this engine needs (see :func:`foreign_inputs`):
        subscribe to their telemetry as well as to the own districts'."""
        if self.owned_districts is None:
            return frozenset()
        return frozenset(d.device_id for d in self.fleet
                         if not self.owns(d) and not self._program_of(d).inert)

    def _partition_changed(self) -> None:
        self._derived()
        owned = self.owned_districts
        districts = {d.district for d in self.fleet}
        self._primary = owned is None or not districts or min(districts) in owned
        if owned is None:
            return
        by_id = self.fleet.by_id
        foreign = [d for d in self.fleet if d.district not in owned]
        for d in foreign:
            if not self._program_of(d).inert:
                continue  # a border device: its readings (and windows) are still needed
            self._forget(d.device_id)
            self.last_seen.pop(d.device_id, None)
        for d in foreign:  # lights that are another engine's now: no light state here
            self._forget_light(d.device_id)
            self.energy.forget(d.device_id)
        self._drop_instances([k for k in self.instances if not self._keeps(k, by_id)],
                             clear_alerts=False)

    def _keeps(self, key: tuple[str, str], by_id: dict[str, FleetDevice]) -> bool:
        """Is an instance this engine's: of an own device, a schedule's, or of a crossing
        rule for a foreign device whose readings reach an own light?"""
        rule_id, source = key
        device = by_id.get(source)
        rule = self._rule_by_id.get(rule_id)
        if device is None or rule is None or self.owns(device):
            return True
        program = self._program_of(device)
        return any(run.id == rule_id for run, _ in program.runs) or any(
            r.id == rule_id for r, _ in program.absent)

    def _owned_source(self, rule: CompiledRule, source: str) -> bool:
        """Does this engine run all of ``rule``'s actions for ``source`` (else: only its
        ``set_light``, on its own lights)?"""
        if self.owned_districts is None:
            return True
        if rule.rule.when.schedule is not None:
            return self._primary
        device = self.fleet.by_id.get(source)
        return device is None or device.district in self.owned_districts

    def _program_of(self, device: FleetDevice) -> _Program:
        program = self._programs.get(device.device_id)
        if program is None or program.device is not device:
            program = self._programs[device.device_id] = self._build_program(device)
        return program

    def _build_program(self, device: FleetDevice) -> _Program:
        device_id = device.device_id
        if self.owns(device):
            runs = tuple((self._runs[r.id], (r.id, device_id)) for r in self.rules_for(device))
            absent = tuple((r, (r.id, device_id)) for r in self.absence_rules
                           if selects(r.rule.when.absent.select, device))
            return _Program(device, True, runs, absent)
        # A foreign device: only the crossing rules that would wish on an own light.
        action = self.actions["set_light"]

        def near(d: FleetDevice, radius: float) -> bool:
            return any(self.owns(x) for x in action.index(radius).neighbours(d))

        runs = tuple((self._foreign_runs[r.id], (r.id, device_id)) for r in self.reading_rules
                     if r.id in self._crossing and _reaches(r, device, near))
        absent = tuple((r, (r.id, device_id)) for r in self.absence_rules
                       if r.id in self._crossing and _reaches(r, device, near))
        return _Program(device, False, runs, absent)

    def absence_devices(self, rule: CompiledRule) -> list[FleetDevice]:
        """The devices an absence rule watches here, in fleet order (a foreign one only if
        its absence would reach an own light)."""
        devices = self._absent_devices.get(rule.id)
        if devices is None:
            select = rule.rule.when.absent.select
            devices = self._absent_devices[rule.id] = [
                d for d in self.fleet if selects(select, d) and (
                    self.owns(d) or any(r is rule for r, _ in self._program_of(d).absent))]
        return devices

    # ------------------------------------------------------------------ readings

    def on_reading(self, device_id: str, reading: dict[str, Any], ts_ms: int) -> None:
        """One reading (its fields, without ts) from a device the fleet knows."""
        self._take(((device_id, reading, ts_ms),), False)

    def on_readings(self, readings: Iterable[Reading]) -> None:
        """Readings in the order they came, e.g. all of one socket read: each ``(device id,
        fields without ts, ts)`` has just the effect :meth:`on_reading` would have. One that
        fails (a bug, not a bad value: a condition that cannot be evaluated counts as a rule
        error) is logged and the others go on."""
        self._take(readings, True)

    def _take(self, readings: Iterable[Reading], isolate: bool) -> None:  # noqa: C901
        by_id = self.fleet.by_id
        programs = self._programs
        instances = self.instances
        get_instance = instances.get
        last_seen, last_reading = self.last_seen, self.last_reading
        health = self.health
        touched = self._touched
        expiries = self._expiries
        account = self.energy.account
        lamp_reading = self._lamp_reading
        for device_id, reading, ts in readings:
            try:
                program = programs.get(device_id)
                if program is None:
                    device = by_id.get(device_id)
                    if device is None:
                        continue
                    program = self._program_of(device)
                    programs = self._programs
                device = program.device
                watermark = self.watermark
                if watermark is None or ts > watermark:
                    if self.started_ms is None or ts // 1000 != self._last_tick or (
                            expiries and expiries[0][0] <= ts):
                        self.advance(ts)
                    else:
                        self.watermark = ts  # nothing comes due: advance() would do just this
                if program.inert:
                    continue
                last_seen[device_id] = ts
                last_reading[device_id] = reading
                if self.window_spans:
                    self._window(device_id, reading, ts)
                if program.light:
                    account(device, reading, ts)
                    if lamp_reading is not None:
                        lamp_reading(device, reading, ts)
                elif program.bills and self.billing is not None and isinstance(
                        reading.get("energy_kwh"), _NUMBER):
                    export = reading.get("energy_export_kwh")
                    for kind, detail in self.billing.on_reading(
                            device_id, ts, reading["energy_kwh"],
                            export if isinstance(export, _NUMBER) else None):
                        self.alerting.billing(kind, device, detail, ts)
                for rule, key in program.absent:  # a reading ends an absence
                    if key in instances:
                        self.deactivate(rule, device_id, device, ts)
                ctx = Context(self, ts, device, reading)
                owned = program.owned
                for run, key in program.runs:
                    inst = get_instance(key)
                    if owned:
                        h = run.health
                        if h is None:
                            h = run.health = health[run.id]
                        h.evaluations += 1
                    try:
                        if inst is not None and inst.active and run.clear is not None:
                            holds = not run.clear(ctx)
                        elif run.condition is not None:
                            holds = run.condition(ctx)
                        else:
                            holds = True
                    except EvalError as e:
                        if owned:
                            h.errors += 1
                            h.last_error = str(e)
                        continue
                    if inst is None:
                        if holds:
                            self._begin(run.rule, key, device_id, ctx)
                    elif inst.active:
                        if holds:  # still active: a held wish starts its hold again, a
                            for step, spec in run.refresh:  # settlement retries
                                step(run.rule, device_id, spec, ctx)
                        else:
                            self.deactivate(run.rule, device_id, device, ts)
                    elif holds:
                        self._wait(run.rule, key, inst, device_id, ctx)
                    else:
                        instances.pop(key, None)
                        self._dirty_instances.add(key)
                if touched:
                    self._settle(ts)
            except Exception:
                if not isolate:
                    raise
                log.exception("rule evaluation failed for a reading of %s", device_id)

    def _window(self, device_id: str, reading: dict[str, Any], ts_ms: int) -> None:
        windows = self.windows[device_id]
        for f, span in self.window_spans.items():
            value = reading.get(f)
            if isinstance(value, _NUMBER):
                q = windows.setdefault(f, deque())
                q.append((ts_ms, float(value)))
                while q and q[0][0] <= ts_ms - span * 1000:
                    q.popleft()

    def _settle(self, now_ms: int) -> None:
        """Recompute the lights this event touched, once each: one command per change."""
        while self._touched:
            device_id = self._touched.pop()
            self._recompute(self.fleet.by_id[device_id], now_ms)

    def _begin(self, rule: CompiledRule, key: tuple[str, str], source: str,
               ctx: Context) -> None:
        """The rule holds for a source it had no instance for: one, waiting or firing."""
        inst = self.instances[key] = Instance(fingerprint=rule.fingerprint)
        self._dirty_instances.add(key)
        self._wait(rule, key, inst, source, ctx)

    def _wait(self, rule: CompiledRule, key: tuple[str, str], inst: Instance, source: str,
              ctx: Context) -> None:
        """The rule holds for an inactive instance: its `for:` starts or runs on, or it fires."""
        if rule.for_s and inst.pending_since is None:
            inst.pending_since = ctx.ts_ms
            heapq.heappush(self._pending, (ctx.ts_ms + rule.for_s * 1000, *key))
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
        if self._owned_source(rule, source):
            health = self.health[rule.id]
            health.fired += 1
            health.last_fired_ms = ctx.ts_ms
            steps = self._plans[rule.id].activate
        else:
            steps = self._light_plans[rule.id].activate
        for run, spec in steps:
            run(rule, source, spec, ctx)

    def deactivate(self, rule: CompiledRule, source: str, device: FleetDevice | None,
                   now_ms: int) -> None:
        """The rule clears for ``source``: its instance goes, its actions are undone."""
        self.instances.pop((rule.id, source), None)
        self._dirty_instances.add((rule.id, source))
        plans = self._plans if self._owned_source(rule, source) else self._light_plans
        for run, spec in plans[rule.id].deactivate:
            run(rule, source, spec, device, now_ms)

    # ------------------------------------------------------------------ lights

    def wish(self, device_id: str, wish: Wish) -> None:
        """A rule wants this light at a level; arbitrated when the event is done."""
        state = self.lights.get(device_id)
        if state is None:
            state = self.lights[device_id] = LightState(device_id)
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
        state = self.lights.get(light.device_id)
        if state is None:
            state = self.lights[light.device_id] = LightState(light.device_id)
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
            self.acks.expect(light.device_id, payload["id"], now_ms + self._ack_timeout_ms)
        self.outbox.command(light, payload, self._command_expiry_s)

    def set_override(self, device_id: str, level: float, now_ms: int,
                     until_ms: int | None = None, who: str = "operator") -> None:
        light = self.fleet.by_id[device_id]
        if not self.owns(light):
            return  # another engine's light
        state = self.lights.get(device_id)
        if state is None:
            state = self.lights[device_id] = LightState(device_id)
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
        if self._lamp_reading is not None:
            self.lamps.tick(now_ms)  # (its cabinets: once per 10 s)
        schedules.run_schedules(self, now_ms)
        schedules.run_absences(self, now_ms)
        if now_ms >= self.calendar.next_ms:  # a step or noon: nothing otherwise
            self.calendar.run(now_ms)
        for device_id, cmd_id in self.acks.overdue(now_ms):
            if not self.lamps.cabinet_down(device_id):  # (else: the cabinet's alarm says it)
                self.alerting.missing_ack(device_id, cmd_id, now_ms)
        points = self.energy.flush(now_ms)
        if points:
            self.outbox.points(points)
        self.reporter.report(now_ms)
        self._settle(now_ms)

    def _pending_timers(self, now_ms: int) -> None:
        """Fire the instances whose `for:` is over, in the order it ended (then by key)."""
        pending = self._pending
        later = []
        while pending and pending[0][0] <= now_ms + 1:  # (+1: the exact test is below)
            entry = heapq.heappop(pending)
            _, rule_id, source = entry
            key = (rule_id, source)
            inst = self.instances.get(key)
            rule = self._rule_by_id.get(rule_id)
            if inst is None or inst.active or inst.pending_since is None or rule is None or \
                    entry[0] != inst.pending_since + rule.for_s * 1000:
                continue  # fired, gone, or waiting anew (under its own entry)
            if now_ms - inst.pending_since >= rule.for_s * 1000:
                device = self.fleet.by_id.get(source)
                self.activate(rule, source, Context(self, now_ms, device,
                                                    self.last_reading.get(source)))
            else:
                later.append(entry)
        for entry in later:
            heapq.heappush(pending, entry)

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
            self.watermark, self.lamps.snapshot())
        self._dirty_lights.clear()
        self._dirty_instances.clear()
        self.alerting.dirty.clear()
        return snap

    def restore(self, saved: Snapshot) -> None:
        """Put saved state into a fresh engine: lights of devices the fleet no longer has,
        wishes of rules no longer there and instances of rules whose text changed are
        dropped; holds expire and `for:` timers run on as if the engine had not stopped."""
        fingerprints = {r.id: r.fingerprint for r in self.ruleset.rules}
        by_id = self.fleet.by_id
        for device_id, light in saved.lights.items():
            if light is None or device_id not in by_id or not self.owns(by_id[device_id]):
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
            if inst is not None and fingerprints.get(key[0]) == inst.fingerprint and (
                    self.owned_districts is None or self._keeps(key, by_id)):
                self.instances[key] = Instance(inst.active, inst.pending_since, inst.fingerprint)
                rule = self._rule_by_id.get(key[0])
                if inst.pending_since is not None and not inst.active and rule is not None:
                    heapq.heappush(self._pending,
                                   (inst.pending_since + rule.for_s * 1000, *key))
        for key, a in saved.alerts.items():
            self.alerts[key] = alert_state(key, a)
        if saved.watermark is not None:
            self.watermark = self.started_ms = saved.watermark
        self.lamps.restore(saved.lamps)

    def lamp_replaced(self, device_id: str, ts_ms: int) -> bool:
        """The light got a new lamp (a work order closed with cause "lamp replaced"): its
        burning hours and switch-ons start again from 0, its lamp-fault and lamp-power
        alerts clear, its warm-up begins. False if it is no streetlight of this engine's."""
        device = self.fleet.by_id.get(device_id)
        if device is None or device.kind != "streetlight" or not self.owns(device):
            return False
        self.lamps.replaced(device, ts_ms)
        return True

    # ------------------------------------------------------------------ explain

    def explain(self, device_id: str, now_ms: int | None = None) -> dict[str, Any]:
        """The light's level, the wish that won and every other wish with rule and expiry."""
        return explain(self, device_id, now_ms)
