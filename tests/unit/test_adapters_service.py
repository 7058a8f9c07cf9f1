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
import paho.mqtt.client as paho
import pytest

from adapters import load_profiles, read_dead_letter_counts, read_dead_letters
from adapters.deadletter import FILENAME
from adapters.profile import Decoded, DecodeError
from adapters.service import AdapterConfig, AdapterService
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


@dataclass
class Info:
    mid: int
    rc: int = paho.MQTT_ERR_SUCCESS


@dataclass
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1


@dataclass
class ReasonCode:
    is_failure: bool = False


@dataclass
class Flags:
    session_present: bool = False


class FakeClient:
    """A broker session as paho presents it, run by the service's own ``loop()`` calls.
    Every event is logged in order in ``log``: ("publish", mid, topic), ("puback", mid),
    ("ack", inbound mid), ("subscribe", filters), ("unsubscribe", filters)."""

    protocol = paho.MQTTv5

    def __init__(self, url=None, client_id=""):
        self.on_connect = self.on_disconnect = self.on_message = self.on_publish = None
        self.on_subscribe = self.on_unsubscribe = None
        self.auto_puback = True
        self.log: list[tuple] = []
        self.published: dict[int, tuple[str, bytes, bool]] = {}
        self.held: list[int] = []
        self.session_present = False
        self._events: queue.Queue = queue.Queue()
        self._mid = 0
        self._lock = threading.Lock()

    # --- what the service calls
    def connect(self, host, port=1883, keepalive=60, clean_start=None, properties=None):
        self.connected_with = {"clean_start": clean_start,
                               "receive_maximum": getattr(properties, "ReceiveMaximum", None)}
        self._events.put(("connack",))

    def loop(self, timeout=1.0):
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return paho.MQTT_ERR_SUCCESS
        kind = event[0]
        if kind == "connack":
            self.on_connect(self, None, Flags(self.session_present), ReasonCode(), None)
        elif kind == "message":
            self.on_message(self, None, event[1])
        elif kind == "puback":
            self.log.append(("puback", event[1]))
            self.on_publish(self, None, event[1], ReasonCode(), None)
        elif kind == "suback":
            self.on_subscribe(self, None, event[1], [ReasonCode()] * event[2], None)
        elif kind == "unsuback":
            self.on_unsubscribe(self, None, event[1], [], None)
        elif kind == "drop":
            self.on_disconnect(self, None, None, "lost", None)
            return paho.MQTT_ERR_CONN_LOST
        return paho.MQTT_ERR_SUCCESS

    def _next(self) -> int:
        with self._lock:
            self._mid += 1
            return self._mid

    def subscribe(self, topics, qos=0, options=None, properties=None):
        mid = self._next()
        filters = [t for t, _ in topics]
        self.log.append(("subscribe", tuple(filters)))
        self._events.put(("suback", mid, len(filters)))
        return paho.MQTT_ERR_SUCCESS, mid

    def unsubscribe(self, topics, properties=None):
        mid = self._next()
        self.log.append(("unsubscribe", tuple(topics)))
        self._events.put(("unsuback", mid))
        return paho.MQTT_ERR_SUCCESS, mid

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        mid = self._next()
        self.published[mid] = (topic, payload, retain)
        self.log.append(("publish", mid, topic))
        if self.auto_puback:
            self._events.put(("puback", mid))
        else:
            self.held.append(mid)
        return Info(mid)

    def ack(self, mid, qos):
        self.log.append(("ack", mid))

    def disconnect(self, *a, **k):
        pass

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
        self._events.put(("drop",))

    def acked(self) -> list[int]:
        return [e[1] for e in self.log if e[0] == "ack"]

    def sent(self, suffix: str = "") -> list[tuple[str, dict]]:
        return [(t, orjson.loads(p)) for t, p, _ in list(self.published.values())
                if t.endswith(suffix)]


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

    def factory(url, client_id):
        clients.append(FakeClient(url, client_id))
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
    assert c.connected_with == {"clean_start": False, "receive_maximum": 1000}
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
    c.drop()
    wait_until(lambda: not city.service.stats()["unacked"], 2, 0.01)
    c.release()  # PUBACKs of the old connection's publishes
    c.session_present = True
    c.connect("h")
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
