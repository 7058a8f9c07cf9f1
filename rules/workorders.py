"""Work orders from the rule engine's alerts, and the engine told of lamps replaced.

The runner (rules/runner.py) hands every alert raised to :meth:`AlertOrders.alert`: a lamp or
cabinet alert opens a work order for its light or cabinet in the maintenance store
(citygrid/maintenance.py), or joins the one not yet done. Between socket reads it calls
:meth:`AlertOrders.tick`: the orders done since the last look (one indexed read) tell the
engine which lamps were replaced and become ``citygrid_work_orders`` points; once a minute of
event time the counts per district become ``citygrid_maintenance`` points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from citygrid.fleet import Fleet
from citygrid.maintenance import WorkOrders, cabinet_trigger, device_trigger
from citygrid.store import Point
from rules.alerts import AlertState

log = logging.getLogger("citygrid.rules.workorders")

# The alerts a crew must go out for, and the problem each names.
PROBLEM_OF_RULE = {"lamp-fault": "lamp_fault", "lamp-failure": "lamp_fault",
                   "lamp-power": "lamp_power", "day-burning": "day_burning",
                   "lamp-cycling": "cycling", "cabinet-supply-loss": "cabinet_supply_loss",
                   "missing-ack": "missing_ack"}
# A command never acknowledged is a crew's only once it has stood this long (event time): a
# cabinet that lost its supply leaves every light's command unanswered before its own alarm
# (the lamp monitor's silent_for) — that alarm clears them, and its one order covers them.
ACK_ORDER_AFTER_MS = 5 * 60_000
MAINTENANCE_MEASUREMENT = "citygrid_maintenance"
ORDERS_MEASUREMENT = "citygrid_work_orders"
WHO = "rules"


class AlertOrders:
    """``fleet()`` is the runner's current inventory; ``points(list)`` its outbox's writer;
    ``owned`` the districts this runner owns (None: all)."""

    def __init__(self, store: WorkOrders, fleet: Callable[[], Fleet],
                 points: Callable[[list[Point]], None], *,
                 owned: Collection[str] | None = None, done_seq: int | None = None):
        self.store, self.fleet, self.points, self.owned = store, fleet, points, owned
        # The last order done this runner took; None: from now on (a first start does not
        # replay years of replacements).
        self.done_seq = store.last_done_seq() if done_seq is None else done_seq
        self._minute: int | None = None
        self._unacknowledged: list[AlertState] = []  # missing-ack alerts not yet a crew's

    def _mine(self, district: str) -> bool:
        return self.owned is None or district in self.owned

    def alert(self, alert: AlertState) -> str | None:
        """An alert raised: the id of the order it opened or joined (None: not a crew's)."""
        problem = PROBLEM_OF_RULE.get(alert.rule_id)
        if problem is None:
            return None
        if alert.rule_id == "missing-ack":
            self._unacknowledged.append(alert)  # a crew's if it stands (tick)
            return None
        return self._open_or_join(alert, problem)

    def _open_or_join(self, alert: AlertState, problem: str) -> str | None:
        fleet = self.fleet()
        device = fleet.by_id.get(alert.scope)
        if device is not None:
            if device.kind != "streetlight":
                return None
            trigger = device_trigger(device, problem, alert.key, WHO)
        else:
            trigger = cabinet_trigger(alert.scope, fleet.of_kind("streetlight"), problem,
                                      alert.key, WHO)
            if trigger is None:
                log.warning("alert %s: no light or cabinet %r for a work order", alert.key,
                            alert.scope)
                return None
        order, new = self.store.open_or_join(trigger, alert.since_ms)
        log.info("%s %s for %s (%s)", "opened" if new else "joined", order.id,
                 order.target, alert.key)
        return order.id

    def tick(self, engine: object, now_ms: int | None) -> None:
        """Orders done since the last look; the minute's counts. ``engine`` is told of every
        lamp replaced (``lamp_replaced(device_id, done_ms)``, when it has it)."""
        if self._unacknowledged and now_ms is not None:
            waiting = []
            for alert in self._unacknowledged:
                if now_ms - alert.since_ms < ACK_ORDER_AFTER_MS:
                    waiting.append(alert)
                elif alert.active:  # still unanswered (an ack or its cabinet cleared it)
                    self._open_or_join(alert, PROBLEM_OF_RULE[alert.rule_id])
            self._unacknowledged = waiting
        done = self.store.done_since(self.done_seq)
        fleet = self.fleet() if done else None
        points = []
        for seq, order in done:
            self.done_seq = seq
            if not self._mine(order.district):
                continue
            points.append(Point(ORDERS_MEASUREMENT, {
                "district": order.district, "cause": order.cause or "", "problem": order.problem},
                {"repair_h": order.repair_h or 0.0}, order.done_ms))  # type: ignore[arg-type]
            if (order.cause == "lamp_replaced" and order.target_kind == "device"
                    and fleet is not None and order.target in fleet.by_id
                    and hasattr(engine, "lamp_replaced")):
                engine.lamp_replaced(order.target, order.done_ms)
        if now_ms is not None and now_ms // 60_000 != self._minute:
            self._minute = now_ms // 60_000
            ts = self._minute * 60_000
            points += [Point(MAINTENANCE_MEASUREMENT, {"district": district}, counts, ts)
                       for district, counts in sorted(self.store.counts(ts).items())
                       if self._mine(district)]
        if points:
            self.points(points)
