"""Work orders: the maintenance store (open or join, cabinets, transitions, recurrence), the rule
runner's alert hook and its poll for lamps replaced. SQLite only; no broker."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest

from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.maintenance import (
    InvalidTransition,
    NoSuchOrder,
    WorkOrderError,
    WorkOrders,
    cabinet_trigger,
    device_trigger,
)
from citygrid.store import Point
from rules.alerts import AlertState
from rules.workorders import MAINTENANCE_MEASUREMENT, ORDERS_MEASUREMENT, AlertOrders
from tests.helpers import light_reading

H = 3_600_000
T0 = 1_790_000_000_000
LIGHTS = [FleetDevice("sl-1", "streetlight", "norrebro", 55.6960, 12.5440, rated_w=50,
                      cabinet="cab-1"),
          FleetDevice("sl-2", "streetlight", "norrebro", 55.6962, 12.5440, rated_w=50,
                      cabinet="cab-1"),
          FleetDevice("sl-3", "streetlight", "valby", 55.6620, 12.5030, rated_w=50)]
FLEET = Fleet(LIGHTS)
SL1, SL2, SL3 = LIGHTS


@pytest.fixture
def orders(tmp_path):
    store = WorkOrders(tmp_path)
    yield store
    store.close()


def test_a_trigger_opens_an_order_and_the_next_one_for_that_light_joins_it(orders):
    first, new = orders.open_or_join(device_trigger(SL1, "lamp_fault", "lamp-fault@sl-1",
                                                    "rules"), T0)
    assert new and first.id == "WO-000001" and first.state == "open"
    assert (first.target_kind, first.target, first.district) == ("device", "sl-1", "norrebro")
    assert (first.lat, first.lon, first.problem) == (SL1.lat, SL1.lon, "lamp_fault")
    again, new = orders.open_or_join(device_trigger(SL1, "day_burning", "day-burning@sl-1",
                                                    "rules"), T0 + H)
    assert not new and again.id == first.id and again.problem == "lamp_fault"
    assert [(h.event, h.ref, h.problem) for h in again.history] == [
        ("opened", "lamp-fault@sl-1", "lamp_fault"), ("joined", "day-burning@sl-1", "day_burning")]
    other, new = orders.open_or_join(device_trigger(SL3, "lamp_fault", "lamp-fault@sl-3",
                                                    "rules"), T0)
    assert new and other.id == "WO-000002"
    assert [o.id for o in orders.list()] == ["WO-000002", "WO-000001"]  # newest first


def test_a_lights_trigger_joins_its_cabinets_open_order(orders):
    cab = cabinet_trigger("cab-1", LIGHTS, "cabinet_supply_loss",
                          "cabinet-supply-loss@cab-1", "rules")
    assert (cab.district, cab.lat, cab.lon) == ("norrebro", SL1.lat, SL1.lon)  # its first light
    order, new = orders.open_or_join(cab, T0)
    assert new and (order.target_kind, order.target) == ("cabinet", "cab-1")
    joined, new = orders.open_or_join(device_trigger(SL2, "lamp_fault", "lamp-fault@sl-2",
                                                     "rules"), T0 + 1)
    assert not new and joined.id == order.id
    assert [o.id for o in orders.list(device="sl-2")] == [order.id]
    assert orders.list(device="sl-3") == []
    # A light of another cabinet (or none) gets its own order.
    _, new = orders.open_or_join(device_trigger(SL3, "lamp_fault", "lamp-fault@sl-3",
                                                "rules"), T0 + 2)
    assert new
    assert cabinet_trigger("cab-nowhere", LIGHTS, "cabinet_supply_loss", "x", "rules") is None


def test_transitions_and_the_ones_refused(orders):
    order, _ = orders.open_or_join(device_trigger(SL1, "lamp_fault", "a@sl-1", "rules"), T0)
    assigned = orders.assign(order.id, "crew-7", "operator", T0 + H)
    assert (assigned.state, assigned.assignee, assigned.assigned_ms) == ("assigned", "crew-7",
                                                                         T0 + H)
    done = orders.done(order.id, "lamp_replaced", "operator", T0 + 3 * H, note="new LED")
    assert (done.state, done.cause, done.note, done.repair_h) == ("done", "lamp_replaced",
                                                                  "new LED", 3.0)
    assert [(h.event, h.who) for h in done.history] == [
        ("opened", "rules"), ("assigned", "operator"), ("done", "operator")]
    with pytest.raises(InvalidTransition, match="WO-000001 is done") as e:
        orders.assign(order.id, "crew-8", "operator", T0 + 4 * H)
    assert e.value.state == "done" and e.value.order_id == order.id
    with pytest.raises(InvalidTransition):
        orders.done(order.id, "cable_fault", "operator", T0 + 4 * H)
    with pytest.raises(WorkOrderError, match="cause must be one of"):
        orders.done(order.id, "magic", "operator", T0)
    with pytest.raises(NoSuchOrder, match="WO-000099"):
        orders.assign("WO-000099", "crew-1", "operator", T0)
    with pytest.raises(NoSuchOrder, match="ids look like WO-000042"):
        orders.done("42", "cable_fault", "operator", T0)
    with pytest.raises(WorkOrderError, match="assignee"):
        orders.assign("WO-000001", " ", "operator", T0)
    # open → done directly
    other, _ = orders.open_or_join(device_trigger(SL3, "lamp_fault", "a@sl-3", "rules"), T0)
    assert orders.done(other.id, "no_fault_found", "op", T0 + H).state == "done"
    assert orders.get(order.id).state == "done"  # the refusals changed nothing


def test_a_trigger_after_the_order_is_done_opens_a_new_one(orders):
    first, _ = orders.open_or_join(device_trigger(SL1, "lamp_fault", "a@sl-1", "rules"), T0)
    orders.done(first.id, "lamp_replaced", "op", T0 + H)
    second, new = orders.open_or_join(device_trigger(SL1, "lamp_fault", "a@sl-1", "rules"),
                                      T0 + 2 * H)
    assert new and second.id != first.id and second.state == "open"
    assert [o.id for o in orders.list(state=["open", "assigned"])] == [second.id]


def test_two_processes_share_the_store(tmp_path):
    a, b = WorkOrders(tmp_path), WorkOrders(tmp_path)
    try:
        order, _ = a.open_or_join(device_trigger(SL1, "lamp_fault", "x", "rules"), T0)
        assert b.open_or_join(device_trigger(SL1, "cycling", "y", "rules"), T0)[0].id == order.id
        b.done(order.id, "driver_replaced", "op", T0 + 2 * H)
        assert a.done_since(0)[0][1].cause == "driver_replaced"
    finally:
        a.close()
        b.close()


def test_counts_and_stats_per_district(orders):
    for i, device in enumerate((SL1, SL3)):
        order, _ = orders.open_or_join(device_trigger(device, "lamp_fault", "x", "r"), T0)
        orders.done(order.id, "lamp_replaced", "op", T0 + (i + 1) * 2 * H)
    orders.open_or_join(device_trigger(SL2, "lamp_fault", "x", "r"), T0)
    order, _ = orders.open_or_join(device_trigger(SL3, "lamp_fault", "x", "r"), T0 + 5 * H)
    orders.assign(order.id, "crew", "op", T0 + 5 * H)
    assert orders.counts(T0 + 5 * H) == {"norrebro": {"open": 1, "assigned": 0, "done_24h": 1},
                                         "valby": {"open": 0, "assigned": 1, "done_24h": 1}}
    assert orders.counts(T0 + 30 * H)["valby"]["done_24h"] == 0
    [norrebro, valby] = orders.stats()
    assert (norrebro.open, norrebro.done, norrebro.median_repair_h) == (1, 1, 2.0)
    assert (valby.assigned, valby.done, valby.mean_repair_h) == (1, 1, 4.0)


# ------------------------------------------------------------------ the runner's side


def _alert(rule_id: str, scope: str, ts: int = T0) -> AlertState:
    return AlertState(f"{rule_id}@{scope}", rule_id, "major", "…", scope, ts)


class FakeEngine:
    def __init__(self) -> None:
        self.replaced: list[tuple[str, int]] = []

    def lamp_replaced(self, device_id: str, ts_ms: int) -> None:
        self.replaced.append((device_id, ts_ms))


def test_alerts_open_and_join_orders_for_lights_and_cabinets(orders):
    written: list[Point] = []
    hook = AlertOrders(orders, lambda: FLEET, written.extend)
    first = hook.alert(_alert("lamp-fault", "sl-1"))
    assert first == "WO-000001"
    assert hook.alert(_alert("day-burning", "sl-1")) == first  # the same light: joined
    assert hook.alert(_alert("no2-high", "norrebro")) is None  # not a crew's alert
    cabinet = hook.alert(_alert("cabinet-supply-loss", "cab-1"))
    assert orders.get(cabinet).target_kind == "cabinet"
    assert hook.alert(_alert("lamp-power", "sl-2")) == cabinet  # its cabinet's order
    assert hook.alert(_alert("cabinet-supply-loss", "cab-unknown")) is None
    assert [o.problem for o in orders.list()] == ["cabinet_supply_loss", "lamp_fault"]


def test_the_poll_tells_the_engine_of_lamps_replaced_and_writes_points(orders):
    written: list[Point] = []
    hook = AlertOrders(orders, lambda: FLEET, written.extend)
    engine = FakeEngine()
    a = hook.alert(_alert("lamp-fault", "sl-1"))
    b = hook.alert(_alert("lamp-fault", "sl-3"))
    hook.tick(engine, T0 + 60_000)
    assert engine.replaced == []
    assert {p.tags["district"]: p.fields for p in written
            if p.measurement == MAINTENANCE_MEASUREMENT} == {
        "norrebro": {"open": 1, "assigned": 0, "done_24h": 0},
        "valby": {"open": 1, "assigned": 0, "done_24h": 0}}
    written.clear()
    orders.done(a, "lamp_replaced", "op", T0 + 2 * H)
    orders.done(b, "cable_fault", "op", T0 + 3 * H)
    hook.tick(engine, T0 + 60_000 + 1)  # the same minute: no new counts
    assert engine.replaced == [("sl-1", T0 + 2 * H)]  # a cable fault replaced no lamp
    assert [(p.measurement, p.tags, p.fields, p.ts_ms) for p in written] == [
        (ORDERS_MEASUREMENT, {"district": "norrebro", "cause": "lamp_replaced",
                              "problem": "lamp_fault"}, {"repair_h": 2.0}, T0 + 2 * H),
        (ORDERS_MEASUREMENT, {"district": "valby", "cause": "cable_fault",
                              "problem": "lamp_fault"}, {"repair_h": 3.0}, T0 + 3 * H)]
    hook.tick(engine, T0 + 60_000 + 2)
    assert len(engine.replaced) == 1  # each replacement once
    # A partitioned runner that owns valby tells its engine nothing of norrebro's lamps.
    c = hook.alert(_alert("lamp-fault", "sl-1", T0 + 4 * H))
    valby_only = AlertOrders(orders, lambda: FLEET, written.extend, owned={"valby"},
                             done_seq=hook.done_seq)
    orders.done(c, "lamp_replaced", "op", T0 + 5 * H)
    other = FakeEngine()
    valby_only.tick(other, None)
    assert other.replaced == [] and valby_only.done_seq == hook.done_seq + 1
    hook.tick(object(), None)  # an engine without lamp_replaced (before the lamp monitor)


NIGHT = int(datetime(2026, 11, 27, 22, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)


def test_the_runner_opens_an_order_from_a_live_alert_and_polls_replacements(tmp_path):
    """missing-ack and lamp-failure (the shipped rules) raised by readings through the runner:
    one order (the lamp failure opens it; the command unanswered for five minutes joins it);
    a restart does not replay replacements taken before it."""
    from citygrid import wire
    from citygrid.contract import Topic
    from citygrid.settings import Settings
    from rules.loader import DEFAULT_RULES
    from rules.runner import RuleRunner, RunnerConfig

    class Clock:
        def now_ms(self) -> int:
            return NIGHT

        def monotonic(self) -> float:
            return 0.0

    settings = Settings(mqtt_url="mqtt://127.0.0.1:1", data_dir=str(tmp_path))
    fleet = Fleet([SL1, SL2])

    def runner() -> RuleRunner:
        return RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(DEFAULT_RULES),
                          make_client=wire.Client, clock=Clock())

    r = runner()
    try:
        topic = str(Topic("norrebro", "streetlight", "sl-1"))
        for i in range(8):  # commanded on, drawing nothing, for 7 minutes
            r.handle(topic, orjson.dumps(light_reading(i + 1, NIGHT + i * 60_000,
                                                       power_w=0.0)))
        assert "lamp-failure@sl-1" in r.engine.alerting.by_key
        store = WorkOrders(tmp_path)
        [order] = store.list()  # the lamp failure's; the missing ack is not a crew's yet
        assert (order.target, order.problem, order.state) == ("sl-1", "lamp_fault", "open")
        r.follow_workorders()  # seven minutes of event time: the missing ack still stands
        assert [h.ref for h in store.get(order.id).history] == ["lamp-failure@sl-1",
                                                                "missing-ack@sl-1"]
        store.done(order.id, "lamp_replaced", "crew", NIGHT + H)
        r.engine.lamp_replaced = lambda device_id, ts: replaced.append((device_id, ts))
        replaced: list[tuple[str, int]] = []
        r.follow_workorders()
        assert replaced == [("sl-1", NIGHT + H)]
    finally:
        r.stop()
    r = runner()
    try:
        r.engine.lamp_replaced = lambda device_id, ts: replaced.append((device_id, ts))
        r.follow_workorders()
        assert replaced == [("sl-1", NIGHT + H)]  # not again after the restart
    finally:
        r.stop()
        store.close()


def test_a_missing_ack_is_a_crews_only_once_it_has_stood_five_minutes(tmp_path):
    """A command unanswered opens no order at once (a cabinet without supply leaves all its
    lights' commands unanswered before its own alarm); one still unanswered five minutes on
    does, one answered (cleared) by then does not."""
    from rules.alerts import AlertState
    from rules.workorders import ACK_ORDER_AFTER_MS, AlertOrders

    store = WorkOrders(tmp_path)
    points: list = []
    hook = AlertOrders(store, lambda: Fleet([SL1, SL2]), points.extend)
    try:
        standing = AlertState("missing-ack@sl-1", "missing-ack", "minor", "no ack", "sl-1",
                              NIGHT)
        answered = AlertState("missing-ack@sl-2", "missing-ack", "minor", "no ack", "sl-2",
                              NIGHT)
        assert hook.alert(standing) is None and hook.alert(answered) is None
        hook.tick(object(), NIGHT + ACK_ORDER_AFTER_MS - 1000)
        assert store.list() == []
        answered.active = False  # its ack came (or its cabinet's alarm cleared it)
        hook.tick(object(), NIGHT + ACK_ORDER_AFTER_MS)
        [order] = store.list()
        assert (order.target, order.problem) == ("sl-1", "missing_ack")
    finally:
        store.close()
