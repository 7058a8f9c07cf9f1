"""AdapterService without a broker: a fake MQTT client the test drives (it holds each PUBACK
until the test lets it go), a registry in a temporary directory, a clock that stands still.
What is asserted is what a broker would see: what was published, and which native message was
acknowledged when."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from adapters import load_profiles, read_dead_letter_counts, read_dead_letters
from adapters.deadletter import FILENAME
from adapters.profile import Decoded, DecodeError
from adapters.service import AdapterConfig, AdapterService
from citygrid import wire
from citygrid.fleet import FleetDevice
from citygrid.registry import Registry
from citygrid.settings import Settings
from tests.helpers import REPO, wait_until

T0 = 1_790_000_000_000
SENSOR = (REPO / "tests/data/vendors/tasmota/tele-SENSOR-energy.json").read_bytes()
PROFILES = load_profiles()


class Clock:
    def now_ms(self) -> int:
        return T0

    def monotonic(self) -> float:
        import time

        return time.monotonic()


class FakeClient:
    """A broker session as citygrid.wire.Client presents it, run by the service's own
    ``loop()`` calls: it connects on the first one (and again on the next after ``drop()``),
    and each later call takes what the test has queued, one "read" at a time — the PUBLISHes
    that arrived together as one list, the PUBACKs likewise. Every event is logged in order in
    ``log``: ("publish", mid, topic), ("puback", mid), ("ack", inbound mid),
    ("subscribe", filters), ("unsubscribe", filters).

    ``refuse_publish`` (topic suffix → reason code) makes the broker refuse a publish, reported
    as ``on_published(mids, refused)`` or, with ``refusal_by_attribute``, as citygrid.wire
    does: the ids in ``on_published`` and the reasons in ``refused_publishes``.
    ``refuse_subscription`` (filter → reason code) makes its SUBACK refuse a filter."""

    v5 = True

    def __init__(self, url=None, client_id="", *, clean_start=True, session_expiry_s=0,
                 receive_maximum=None, subscriptions=(), on_messages=None, on_connect=None,
                 on_published=None, on_disconnect=None, **options):
        self.on_messages, self.on_connect = on_messages, on_connect
        self.on_published, self.on_disconnect = on_published, on_disconnect
        self.connected_with = {"clean_start": clean_start, "receive_maximum": receive_maximum,
                               "session_expiry_s": session_expiry_s}
        self.subscriptions: list[tuple[str, int]] = list(subscriptions)
        self.subscribed = threading.Event()
        self.connected = threading.Event()
        self.refused: list[tuple[str, int]] = []
        self.epoch = 0
        self.auto_puback = True
        self.refuse_publish: dict[str, int] = {}
        self.refusal_by_attribute = False
        self.refused_publishes: dict[int, int] = {}
        self.refuse_subscription: dict[str, int] = {}
        self.log: list[tuple] = []
        self.published: dict[int, tuple[str, bytes, bool]] = {}
        self.held: list[int] = []
        self.session_present = False
        self.stopped = False
        self._events: queue.Queue = queue.Queue()
        self._mid = 0
        self._lock = threading.Lock()

    # --- what the service calls (citygrid.wire.Client's shape)
    def loop(self, timeout_s=1.0) -> bool:
        if not self.connected.is_set():
            self.epoch += 1
            self.connected.set()
            if self.subscriptions:  # as the real client does: its list again, every time
                self._subscribe(self.subscriptions)
            else:
                self.subscribed.set()
            self.on_connect(self.session_present)
            return True
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            return True
        kind = event[0]
        if kind in ("message", "puback"):  # one read: whatever else of the kind is there
            batch = [event[1]]
            while True:
                try:
                    more = self._events.get_nowait()
                except queue.Empty:
                    break
                if more[0] != kind:
                    self._events.queue.appendleft(more)
                    break
                batch.append(more[1])
            if kind == "message":
                self.on_messages([wire.Message(m.topic, m.payload, m.mid if m.qos else 0,
                                               m.qos, False, self.epoch) for m in batch])
            else:
                self._pubacks(batch)
        elif kind == "suback":
            asked = event[1]
            self.refused = [r for r in self.refused if r[0] not in asked] + [
                (f, self.refuse_subscription[f]) for f in asked
                if f in self.refuse_subscription]
            self.subscribed.set()
        elif kind == "drop":
            self.connected.clear()
            self.subscribed.clear()
            self.on_disconnect("lost")
            return False
        return True

    def _pubacks(self, mids: list[int]) -> None:
        refused = {}
        for mid in mids:
            self.log.append(("puback", mid))
            topic = self.published[mid][0]
            for suffix, code in self.refuse_publish.items():
                if topic.endswith(suffix):
                    refused[mid] = code
        if not refused:
            self.refused_publishes = {}
            self.on_published(mids)
        elif self.refusal_by_attribute:  # as citygrid.wire reports it
            self.refused_publishes = refused
            self.on_published(mids)
        else:
            self.on_published(mids, refused)

    def _next(self) -> int:
        with self._lock:
            self._mid += 1
            return self._mid

    def _subscribe(self, filters) -> None:
        topics = tuple(t for t, _ in filters)
        self.log.append(("subscribe", topics))
        self._events.put(("suback", topics))

    def subscribe(self, filters) -> None:
        new = [f for f in filters if f not in self.subscriptions]
        if not new:
            return
        self.subscriptions += new
        if self.connected.is_set():
            self._subscribe(new)

    def unsubscribe(self, topics) -> None:
        gone = list(dict.fromkeys(topics))  # also filters an earlier run subscribed
        if not gone:
            return
        self.subscriptions = [f for f in self.subscriptions if f[0] not in set(gone)]
        if self.connected.is_set():
            self.log.append(("unsubscribe", tuple(gone)))

    def publish(self, topic, payload, qos=0, retain=False, expiry_s=None) -> int:
        mid = self._next()
        self.published[mid] = (topic, payload, retain)
        self.log.append(("publish", mid, topic))
        if self.auto_puback:
            self._events.put(("puback", mid))
        else:
            self.held.append(mid)
        return mid

    def publish_encoded(self, packets: bytes, count: int = 1) -> None:
        self.log.append(("packets", packets))

    def ack(self, mids, epoch=None) -> None:
        if epoch is not None and epoch != self.epoch:
            return
        for mid in mids:
            self.log.append(("ack", mid))

    def stop(self, timeout_s=5.0) -> None:
        self.stopped = True

    # --- what the test does
    def deliver(self, topic: str, payload: bytes | dict, mid: int, qos: int = 1) -> None:
        if isinstance(payload, dict):
            payload = orjson.dumps(payload)
        self._events.put(("message", Inbound(topic, payload, mid, qos)))

    def release(self) -> None:
        held, self.held = self.held, []
        for mid in held:
            self._events.put(("puback", mid))

    def drop(self) -> None:
        """The connection breaks; the service's next loop() connects again."""
        self._events.put(("drop",))

    def acked(self) -> list[int]:
        return [e[1] for e in self.log if e[0] == "ack"]

    def sent(self, suffix: str = "") -> list[tuple[str, dict]]:
        return [(t, orjson.loads(p)) for t, p, _ in list(self.published.values())
                if t.endswith(suffix)]


@dataclass
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1


@dataclass
class City:
    data: Path
    registry: Registry
    client: FakeClient
    service: AdapterService
    extra: dict = field(default_factory=dict)


def plug(n: int = 1, district: str = "valby") -> FleetDevice:
    return FleetDevice(f"m-{n}", "meter", district, 55.66, 12.5, account_id="a", tariff="t",
                       device_profile="tasmota-energy", native_id=f"plug-{n}")


LAMP = FleetDevice("sl-1", "streetlight", "valby", 55.66, 12.51, rated_w=40.0,
                   device_profile="zigbee2mqtt-light", native_id="lamp-1")
CONTRACT_LIGHT = FleetDevice("sl-9", "streetlight", "valby", 55.66, 12.52, rated_w=40.0)


@pytest.fixture
def city(tmp_path):
    data = tmp_path / "data"
    registry = Registry(data)
    registry.upsert_many([plug(), LAMP, CONTRACT_LIGHT])
    clients: list[FakeClient] = []

    def factory(url, client_id, **options):
        clients.append(FakeClient(url, client_id, **options))
        return clients[-1]

    service = AdapterService(Settings(mqtt_url="mqtt://127.0.0.1:1", data_dir=str(data)),
                             profiles=PROFILES, registry_dir=data, client_factory=factory,
                             clock=Clock(), config=AdapterConfig(registry_poll_s=0.05,
                                                                 dead_letter_flush_s=0.01))
    service.start(timeout_s=5)
    yield City(data, registry, clients[0], service)
    service.stop()
    registry.close()


def test_it_subscribes_in_a_persistent_session_to_what_registered_devices_use(city):
    c = city.client
    assert c.connected_with == {"clean_start": False, "receive_maximum": 1000,
                                "session_expiry_s": 3600}
    subscribed = {f for e in c.log if e[0] == "subscribe" for f in e[1]}
    assert subscribed == {"tele/+/SENSOR", "zigbee2mqtt/+", "city/v1/+/streetlight/+/cmd"}
    assert city.service.wait_subscribed(2)


def test_a_native_message_is_acknowledged_only_after_the_broker_took_its_reading(city):
    c = city.client
    c.auto_puback = False
    c.deliver("tele/plug-1/SENSOR", SENSOR, mid=7)
    wait_until(lambda: c.held, 2, 0.01, message="the contract publish")
    [(topic, reading)] = c.sent("/telemetry")
    assert topic == "city/v1/valby/meter/m-1/telemetry"
    assert reading["energy_kwh"] == 1.956 and reading["power_w"] == 9
    import time

    time.sleep(0.2)
    assert c.acked() == [], "acknowledged before the broker had the contract reading"
    publish_mid = c.held[0]
    c.release()
    wait_until(lambda: c.acked() == [7], 2, 0.01, message="the native ack")
    assert c.log.index(("puback", publish_mid)) < c.log.index(("ack", 7))


def test_a_message_with_several_contract_messages_waits_for_every_puback(city):
    c = city.client

    class TwoReadings:
        name, kind = "two", "meter"

        def subscriptions(self):
            return ["two/+"]

        def decode(self, topic, payload, now_ms):
            return Decoded("plug-1", readings=[{"ts": T0, "seq": 1}, {"ts": T0 + 1, "seq": 2}],
                           status="online")

    city.service.profiles["two"] = TwoReadings()
    city.registry.edit("m-1", device_profile="two")
    wait_until(lambda: "two/+" in city.service.subscriptions, 2, 0.01)
    c.auto_puback = False
    c.deliver("two/x", b"{}", mid=9)
    wait_until(lambda: len(c.held) == 3, 2, 0.01, message="two readings and a status")
    assert [t for t, _, _ in c.published.values()][-3:] == [
        "city/v1/valby/meter/m-1/telemetry", "city/v1/valby/meter/m-1/telemetry",
        "city/v1/valby/meter/m-1/status"]
    assert list(c.published.values())[-1][2] is True  # status is retained
    first, *rest = c.held
    c.held = rest
    c._events.put(("puback", first))
    import time

    time.sleep(0.2)
    assert 9 not in c.acked()
    c.release()
    wait_until(lambda: 9 in c.acked(), 2, 0.01)


def test_what_cannot_be_mapped_is_dead_lettered_and_acknowledged_once_on_disk(city):
    c = city.client
    c.deliver("tele/nobody/SENSOR", SENSOR, mid=11)
    c.deliver("tele/plug-1/SENSOR", b"]", mid=12)
    c.deliver("tele/plug-1/SENSOR", b'{"Time": "2026-11-30T18:00:00"}', mid=13)
    c.deliver("tele/plug-1/SENSOR", SENSOR, mid=14, qos=0)  # QoS 0: nothing to acknowledge
    wait_until(lambda: set(c.acked()) == {11, 12, 13}, 3, 0.01, message="the acks")
    counts = read_dead_letter_counts(city.data)
    assert counts == {"unknown_device": 1, "not_json": 1, "missing_field": 1}
    letters = {d.reason: d for d in read_dead_letters(city.data)}
    assert letters["unknown_device"].topic == "tele/nobody/SENSOR"
    assert "'nobody'" in letters["unknown_device"].detail
    assert letters["unknown_device"].payload == SENSOR
    assert len(c.sent("/telemetry")) == 1  # only the QoS 0 one
    assert city.service.stats()["dead_letters"] == counts


def test_a_dead_letter_is_on_disk_before_its_message_is_acknowledged(city, monkeypatch):
    c = city.client
    store = city.service.dead_letters
    real_add = store.add
    gate = threading.Event()

    def slow_add(letters):
        gate.wait(2)
        real_add(letters)

    monkeypatch.setattr(store, "add", slow_add)
    c.deliver("tele/nobody/SENSOR", SENSOR, mid=21)
    import time

    time.sleep(0.2)
    assert 21 not in c.acked()
    gate.set()
    wait_until(lambda: 21 in c.acked(), 2, 0.01)
    assert read_dead_letter_counts(city.data) == {"unknown_device": 1}


def test_a_command_becomes_the_native_command_and_a_matching_state_report_the_ack(city):
    c = city.client
    command = {"id": "c-1", "ts": T0, "brightness_pct": 40, "reason": "rule:dark"}
    c.deliver("city/v1/valby/streetlight/sl-1/cmd", command, mid=31)
    wait_until(lambda: 31 in c.acked(), 2, 0.01, message="the command's ack")
    assert c.sent("/set") == [("zigbee2mqtt/lamp-1/set", {"state": "ON", "brightness": 102})]
    c.deliver("zigbee2mqtt/lamp-1", {"state": "ON", "brightness": 200}, mid=32)
    c.deliver("zigbee2mqtt/lamp-1", {"state": "ON", "brightness": 102}, mid=33)
    c.deliver("zigbee2mqtt/lamp-1", {"state": "ON", "brightness": 102}, mid=34)
    wait_until(lambda: {32, 33, 34} <= set(c.acked()), 2, 0.01)
    [(topic, ack)] = c.sent("/ack")
    assert topic == "city/v1/valby/streetlight/sl-1/ack"
    assert ack["id"] == "c-1" and ack["ok"] is True and ack["ts"] == T0
    assert abs(ack["brightness_pct"] - 40) < 1
    # a contract light's command is not ours: acknowledged, nothing published
    before = len(c.published)
    c.deliver("city/v1/valby/streetlight/sl-9/cmd", command, mid=35)
    wait_until(lambda: 35 in c.acked(), 2, 0.01)
    assert len(c.published) == before
    # a command that is not one is a dead letter
    c.deliver("city/v1/valby/streetlight/sl-1/cmd", {"id": "c-2"}, mid=36)
    wait_until(lambda: 36 in c.acked(), 2, 0.01)
    assert read_dead_letter_counts(city.data) == {"bad_command": 1}


def test_registry_changes_subscribe_and_unsubscribe_without_a_restart(city):
    c = city.client
    city.registry.set_status("sl-1", "revoked")  # the only zigbee2mqtt light
    wait_until(lambda: ("unsubscribe", ("city/v1/+/streetlight/+/cmd", "zigbee2mqtt/+"))
               in c.log, 2, 0.01, message="the unsubscription")
    assert city.service.wait_subscribed(2)
    city.registry.upsert(plug(2, "norrebro"))
    wait_until(lambda: city.service.route("m-2"), 2, 0.01)
    c.deliver("tele/plug-2/SENSOR", SENSOR, mid=41)
    wait_until(lambda: 41 in c.acked(), 2, 0.01)
    assert c.sent("/telemetry")[-1][0] == "city/v1/norrebro/meter/m-2/telemetry"
    # remembered for the next run's persistent session
    from adapters.deadletter import DeadLetterStore

    remembered = DeadLetterStore(city.data / FILENAME).subscriptions()
    assert remembered == {"tele/+/SENSOR"}


def test_after_a_lost_connection_old_message_ids_are_never_acknowledged(city):
    c = city.client
    c.auto_puback = False
    c.deliver("tele/plug-1/SENSOR", SENSOR, mid=51)
    wait_until(lambda: c.held, 2, 0.01)
    c.session_present = True
    c.drop()  # and the service's next loop() connects again, to the same session
    wait_until(lambda: not city.service.stats()["unacked"] and c.epoch == 2, 2, 0.01)
    c.release()  # PUBACKs of the old connection's publishes
    import time

    time.sleep(0.3)
    assert 51 not in c.acked()


def test_a_profile_error_for_every_candidate_names_the_first_reason(city):
    class Broken:
        name, kind = "broken", "meter"

        def subscriptions(self):
            return ["broken/+"]

        def decode(self, topic, payload, now_ms):
            raise DecodeError("bad_unit", "power in furlongs")

    city.service.profiles["broken"] = Broken()
    city.registry.upsert(FleetDevice("m-7", "meter", "valby", 55.6, 12.5, account_id="a",
                                     tariff="t", device_profile="broken", native_id="b"))
    wait_until(lambda: "broken/+" in city.service.subscriptions, 2, 0.01)
    city.client.deliver("broken/b", b"{}", mid=61)
    wait_until(lambda: 61 in city.client.acked(), 2, 0.01)
    [letter] = read_dead_letters(city.data)
    assert (letter.reason, letter.detail) == ("bad_unit", "power in furlongs")


@pytest.mark.parametrize("report", ["reason codes", "refused_publishes"])
def test_a_contract_publish_the_broker_refuses_is_dead_lettered_and_its_message_acknowledged(
        city, report):
    c = city.client
    c.refuse_publish = {"/telemetry": 0x87}  # the adapters' ACL does not cover the topic
    c.refusal_by_attribute = report == "refused_publishes"
    c.auto_puback = False
    c.deliver("tele/plug-1/SENSOR", SENSOR, mid=71)
    wait_until(lambda: c.held, 2, 0.01, message="the contract publish")
    [(topic, reading)] = c.sent("/telemetry")
    c.release()
    wait_until(lambda: 71 in c.acked(), 2, 0.01, message="the native ack")
    [letter] = read_dead_letters(city.data)
    assert letter.reason == "publish_refused"
    assert letter.topic == topic == "city/v1/valby/meter/m-1/telemetry"
    assert orjson.loads(letter.payload) == reading
    assert "0x87" in letter.detail and "not authorized" in letter.detail
    assert city.service.stats()["publish_refused"] == 1
    # the next one the broker takes is acknowledged as usual, with no letter
    c.refuse_publish = {}
    c.deliver("tele/plug-1/SENSOR", SENSOR, mid=72)
    wait_until(lambda: c.held, 2, 0.01)
    c.release()
    wait_until(lambda: 72 in c.acked(), 2, 0.01)
    assert read_dead_letter_counts(city.data) == {"publish_refused": 1}


def test_a_refused_subscription_is_not_the_sessions_and_is_asked_again_after_a_change(city):
    from adapters.deadletter import DeadLetterStore

    c = city.client
    service = city.service
    assert service.wait_subscribed(2)
    c.refuse_subscription = {"zigbee2mqtt/+": 0x87}
    c.session_present = False  # the broker lost the session: everything is asked again
    before = len(c.log)
    c.drop()
    wait_until(lambda: c.epoch == 2 and c.subscribed.is_set(), 2, 0.01, message="the SUBACK")
    assert not service.wait_subscribed(0.3)
    remembered = DeadLetterStore(city.data / FILENAME).subscriptions()
    assert remembered == {"tele/+/SENSOR", "city/v1/+/streetlight/+/cmd"}
    import time

    time.sleep(0.2)  # not asked again on every loop turn
    assert len([e for e in c.log[before:] if e[0] == "subscribe"]) == 1
    c.refuse_subscription = {}
    city.registry.upsert(plug(3))  # the registry changes: asked again, and granted
    wait_until(lambda: c.log[-1] == ("subscribe", ("zigbee2mqtt/+",)), 2, 0.01)
    assert service.wait_subscribed(2)


@pytest.mark.parametrize("session_present", [True, False])
def test_a_new_connection_subscribes_only_what_the_session_lacks(city, session_present):
    """Retained messages come once, when a subscription is new to the session: a session the
    broker kept is not subscribed again."""
    c = city.client
    assert city.service.wait_subscribed(2)
    before = len(c.log)
    c.session_present = session_present
    c.drop()
    wait_until(lambda: c.epoch == 2, 2, 0.01)
    assert city.service.wait_subscribed(2)
    again = {f for e in c.log[before:] if e[0] == "subscribe" for f in e[1]}
    assert again == (set() if session_present else
                     {"tele/+/SENSOR", "zigbee2mqtt/+", "city/v1/+/streetlight/+/cmd"})


def test_stopping_writes_the_held_dead_letters_and_acknowledges_them(city, monkeypatch):
    c = city.client
    store = city.service.dead_letters
    real_add = store.add
    gate = threading.Event()

    def slow_add(letters):
        gate.wait(2)
        real_add(letters)

    monkeypatch.setattr(store, "add", slow_add)
    c.deliver("tele/nobody/SENSOR", SENSOR, mid=81)
    wait_until(lambda: city.service.stats()["unacked"] == 1, 2, 0.01)
    stopping = threading.Thread(target=city.service.stop)
    stopping.start()
    import time

    time.sleep(0.2)
    gate.set()
    stopping.join(10)
    assert 81 in c.acked() and c.stopped
    assert c.log.index(("ack", 81)) == len(c.log) - 1


