"""The simulator's engine without a broker: the schedule, the multiplexed mode's QoS 1
bookkeeping on a fake wire client, the payload templates, the physics tables."""

from __future__ import annotations

import heapq
import random
from datetime import datetime
from statistics import mean, pstdev

import orjson
import pytest

from citygrid import wire
from citygrid.city import COPENHAGEN
from citygrid.contract import decode_readings
from citygrid.fleet import FleetDevice
from citygrid.settings import MqttUrl
from simulators import engine as sim_engine
from simulators import physics
from simulators.devices import World, make_device
from simulators.engine import FIRST_MID, OFFLINE, ONLINE, Engine, Schedule, SimConfig
from simulators.fleetgen import generate

TZ = COPENHAGEN.tz
WORLD = World(COPENHAGEN)


class FakeClient:
    """What the engine uses of ``wire.Client``; it records the bytes it is given."""

    instances: list[FakeClient] = []

    def __init__(self, url, client_id, *, protocol, on_connect, on_published, on_disconnect,
                 on_messages, subscriptions, **kw):
        self.client_id, self.v5 = client_id, protocol == wire.MQTT5
        self.on_connect, self.on_published = on_connect, on_published
        self.on_disconnect, self.on_messages = on_disconnect, on_messages
        self.subscriptions = subscriptions
        self.sent = b""
        self.acked: list[list[int]] = []
        self.connected = False
        self.refuse = False
        self.last_error = None
        self.stopped = False
        FakeClient.instances.append(self)

    def loop(self, timeout_s: float = 1.0) -> bool:
        if not self.connected:
            if self.refuse:
                self.last_error = "connection refused"
                return False
            self.connected = True
            self.on_connect(False)
        return True

    def publish_encoded(self, packets: bytes, count: int = 1) -> None:
        assert self.connected
        self.sent += packets

    def ack(self, mids, epoch=None) -> None:
        self.acked.append(list(mids))

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopped = True

    def packets(self) -> list[tuple[int, int, str, bytes]]:
        """(first byte, packet id, topic, payload) of every QoS 1 PUBLISH sent so far."""
        out = []
        found, _ = wire.frame(self.sent)
        for first, i, end in found:
            assert first >> 4 == 3 and (first >> 1) & 3 == 1
            tl = int.from_bytes(self.sent[i:i + 2], "big")
            topic = self.sent[i + 2:i + 2 + tl].decode()
            j = i + 2 + tl
            mid = int.from_bytes(self.sent[j:j + 2], "big")
            j += 2
            if self.v5:
                assert self.sent[j] == 0  # no properties
                j += 1
            out.append((first, mid, topic, self.sent[j:end]))
        return out


@pytest.fixture
def fake_wire(monkeypatch):
    FakeClient.instances = []
    monkeypatch.setattr(sim_engine.wire, "Client", FakeClient)
    return FakeClient


def small_engine(protocol: str = "5", lights: int = 3, meters: int = 2, hour: int = 22,
                 **config) -> Engine:
    """At 22:00 the lights are lit and their sensors report motion events; at noon they are
    off and publish just their schedule."""
    fleet = generate(COPENHAGEN, lights, meters, seed=2)
    cfg = SimConfig(speed=1, interval_s=1, devices_per_connection=1000, protocol=protocol,
                    start_ms=int(datetime(2026, 11, 27, hour, 0, tzinfo=TZ).timestamp() * 1000),
                    **config)
    return Engine(MqttUrl.parse("mqtt://127.0.0.1:1"), fleet, COPENHAGEN, cfg)


def test_the_schedule_is_the_heap_of_due_times():
    rng = random.Random(3)
    phases = [rng.randrange(1000) for _ in range(200)] + [500] * 5  # ties: by device
    heap = [(10_000 + p, i) for i, p in enumerate(phases)]
    heapq.heapify(heap)
    sched = Schedule(10_000, 1000, phases)
    for _ in range(3 * len(phases)):
        due, i = heapq.heappop(heap)
        heapq.heappush(heap, (due + 1000, i))
        assert (sched.next_due, sched.order[sched.pos]) == (due, i)
        sched.pos += 1
        if sched.pos == len(sched):
            sched.pos, sched.base = 0, sched.base + 1000


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_readings_go_out_as_wire_encodes_them_numbered_and_in_schedule_order(fake_wire,
                                                                            protocol):
    engine = small_engine(protocol)
    engine.connect()
    [client] = fake_wire.instances
    assert [t for t, _ in client.subscriptions] == [
        t for t, d in zip(engine.cmd_topics, engine.devices, strict=True)
        if d.spec.kind == "streetlight"]
    statuses = client.packets()
    assert [(p[0], p[2], p[3]) for p in statuses] == [
        (0x33, t, ONLINE) for t in engine.status_topics]  # retained, QoS 1
    client.sent = b""
    due = [engine.schedule.base + o for o in engine.schedule.offsets]
    assert engine._publish_due(engine.schedule.base + 2999) is True  # three rounds
    engine.connections[0].flush()
    sent = client.packets()
    # The schedule's readings, and the lights' motion events between them (at 22:00).
    assert len(sent) == engine.stats["readings"] == 3 * 5 + engine.stats["motion_events"]
    scheduled = {d + k * 1000 for k in range(3) for d in due}
    order = [engine.telemetry_topics[i] for i in engine.schedule.order] * 3
    assert [p[2] for p in sent if orjson.loads(p[3])["ts"] in scheduled] == order
    stamps = [orjson.loads(p[3])["ts"] for p in sent]
    assert stamps == sorted(stamps)  # events go out in time order between the readings
    for first, mid, topic, payload in sent:
        assert first == 0x32 and mid >= FIRST_MID
        [reading] = decode_readings(topic.split("/")[3], payload, topic)
        packet = wire.encode_publish(topic, payload, 1, False, mid, v5=protocol == "5")
        assert packet in client.sent
    assert scheduled <= set(stamps)


def test_the_window_holds_back_the_rest_in_order_and_acks_let_it_go(fake_wire, monkeypatch):
    engine = small_engine()
    engine.connect()
    conn = engine.connections[0]
    [client] = fake_wire.instances
    client.on_published([p[1] for p in client.packets()])  # the statuses
    assert conn.acked == 5 and not conn.inflight
    client.sent = b""
    conn.window = 4
    engine._publish_due(engine.schedule.base + 1999)  # ten readings
    conn.flush()
    first = client.packets()
    assert len(first) == 4 and len(conn.waiting) == 6 and conn.unacknowledged == 10
    client.sent = b""
    client.on_published([first[0][1], first[1][1]])  # two acks: two more go
    second = client.packets()
    assert len(second) == 2 and len(conn.waiting) == 4
    client.sent = b""
    client.on_published([p[1] for p in first[2:] + second])
    client.on_published([p[1] for p in client.packets()])
    assert not conn.unacknowledged and conn.acked == 5 + 10
    seqs = {}
    for p in first + second:
        seqs.setdefault(p[2], []).append(orjson.loads(p[3])["seq"])
    assert all(s == sorted(s) for s in seqs.values())


def test_a_full_backlog_pauses_the_schedule_and_no_reading_is_skipped(fake_wire, monkeypatch):
    monkeypatch.setattr(sim_engine, "MAX_BACKLOG", 3)
    engine = small_engine(hour=12)
    engine.connect()
    conn = engine.connections[0]
    conn.window = 2
    [client] = fake_wire.instances
    client.on_published([p[1] for p in client.packets()])
    client.sent = b""
    until = engine.schedule.base + 10_999  # eleven rounds
    result = engine._publish_due(until)
    assert result is conn  # 2 in flight, 3 waiting: the next reading waits for the broker
    assert engine.stats["readings"] == 5 and engine.schedule.pos == 0
    while engine._publish_due(until) is conn:
        conn.flush()
        client.on_published(list(conn.inflight))
    conn.flush()
    client.on_published(list(conn.inflight))
    client.on_published(list(conn.inflight))
    seqs = [orjson.loads(p[3])["seq"] for p in client.packets()]
    assert engine.stats["readings"] == len(seqs) == 5 * 11  # every due reading, in order
    assert sorted(seqs) == sorted(k for k in range(1, 12) for _ in range(5))


def test_a_lost_connection_sends_again_what_was_not_acknowledged(fake_wire):
    engine = small_engine()
    engine.connect()
    conn = engine.connections[0]
    [client] = fake_wire.instances
    client.on_published([p[1] for p in client.packets()])
    client.sent = b""
    engine._publish_due(engine.schedule.base + 999)
    conn.flush()
    before = client.packets()
    client.on_published([before[0][1]])  # one acknowledged, four not
    client.connected = False
    client.on_disconnect("the broker closed the connection")
    assert not conn.up
    engine._publish_due(engine.schedule.base + 999)  # the next round waits, unsent
    assert len(conn.waiting) == 5
    client.sent = b""
    conn.retry_at = 0
    conn.poll()
    again = client.packets()
    assert conn.up
    # What was in flight, marked DUP, same ids and bytes; the statuses; then the queue.
    assert [(p[0], p[1], p[3]) for p in again[:4]] == [(0x3A, p[1], p[3]) for p in before[1:]]
    assert [p[3] for p in again[4:9]] == [ONLINE] * 5
    assert len(again) == 4 + 5 + 5 and not conn.waiting


def test_packet_ids_stay_above_the_clients_own_and_skip_those_in_flight(fake_wire):
    engine = small_engine(lights=1, meters=0)
    engine.connect()
    conn = engine.connections[0]
    conn.inflight = {65535: b"x", FIRST_MID: b"y"}
    conn.mid = 65534
    assert conn._next_mid() == FIRST_MID + 1


def test_a_broker_that_is_not_there_is_said_at_connect(fake_wire, monkeypatch):
    class Refusing(FakeClient):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.refuse = True

    monkeypatch.setattr(sim_engine.wire, "Client", Refusing)
    engine = small_engine()
    with pytest.raises(ConnectionError, match="connection refused"):
        engine.connect()


def test_commands_are_applied_acknowledged_to_the_broker_and_answered(fake_wire):
    engine = small_engine(lights=2, meters=0)
    engine.connect()
    [client] = fake_wire.instances
    client.sent = b""
    topic = engine.cmd_topics[1]
    good = wire.Message(topic, b'{"id":"c1","ts":1790000000000,"brightness_pct":40,'
                               b'"reason":"override:operator"}', 7, 1, False, 1)
    bad = wire.Message(topic, b"dim", 8, 1, False, 1)
    stranger = wire.Message("city/v1/x/streetlight/nobody/cmd", b"{}", 9, 1, False, 1)
    client.on_messages([good, bad, stranger])
    assert client.acked == [[7, 8, 9]]  # every QoS 1 command taken, ours or not
    acks = [(p[2], orjson.loads(p[3])) for p in client.packets()]
    assert [t for t, _ in acks] == [engine.cmd_topics[1][:-3] + "ack"] * 2
    assert acks[0][1]["ok"] is True and acks[0][1]["brightness_pct"] == 40
    assert acks[1][1]["ok"] is False and acks[1][1]["id"] == "?"
    assert engine.devices[1].level == 40
    assert engine.stats["commands"] == 2


def test_close_says_offline_waits_for_the_acks_and_disconnects(fake_wire, monkeypatch):
    engine = small_engine()
    engine.connect()
    [client] = fake_wire.instances
    client.on_published([p[1] for p in client.packets()])
    client.sent = b""

    def loop(timeout_s=1.0):  # the broker acknowledges whatever it was sent
        client.on_published(list(engine.connections[0].inflight))
        return True

    client.loop = loop
    engine.close()
    offline = client.packets()
    assert [(p[0], p[2], p[3]) for p in offline] == [
        (0x33, t, OFFLINE) for t in engine.status_topics]
    assert client.stopped and engine.stats["pubacks"] == 10
    assert "unacknowledged" not in engine.stats


# --- payloads and physics --------------------------------------------------------------

def light(faults=None, seed=1):
    spec = FleetDevice("sl-1", "streetlight", "indre-by", 55.68, 12.58, rated_w=57.0)
    return make_device(spec, "downtown", random.Random(seed), faults or {})


def meter(seed=1, profile="household"):
    spec = FleetDevice("m-1", "meter", "valby", 55.66, 12.50, account_id="a", tariff="t",
                       profile=profile)
    return make_device(spec, "suburban", random.Random(seed), {})


LIGHT_KEYS = ["ts", "seq", "brightness_pct", "power_w", "energy_wh", "lux", "motion",
              "motion_count", "temp_c", "no2_ugm3", "pm25_ugm3"]
METER_KEYS = ["ts", "seq", "energy_kwh", "power_w", "voltage_v"]


@pytest.mark.parametrize("device, keys, digits", [
    (light, LIGHT_KEYS, {"power_w": 2, "energy_wh": 3, "lux": 2, "temp_c": 2, "no2_ugm3": 1,
                         "pm25_ugm3": 1}),
    (lambda: light({"lamp_failure": 1.0}), [*LIGHT_KEYS, "fault"], {"power_w": 2}),
    (meter, METER_KEYS, {"energy_kwh": 4, "power_w": 1, "voltage_v": 1}),
    (lambda: meter(profile="business"), METER_KEYS, {"energy_kwh": 4, "power_w": 1}),
])
def test_payloads_are_the_contracts_json_with_values_rounded_as_before(device, keys, digits):
    """The template writes what ``orjson.dumps`` wrote of the reading's dict: the same keys
    in the same order, each value rounded as ``round(x, n)`` rounded it."""
    d = device()
    ts = int(datetime(2026, 11, 27, 17, 0, tzinfo=TZ).timestamp() * 1000)
    for k in range(200):
        for payload in d.tick(ts + k * 60_000, 60, WORLD):
            decode_readings(d.spec.kind, payload)
            body = orjson.loads(payload)
            assert list(body) == keys
            for name, n in digits.items():
                assert isinstance(body[name], float) and body[name] == round(body[name], n)
            assert orjson.loads(orjson.dumps(body)) == body


def test_a_commanded_level_is_written_as_given():
    d = light()
    ts = int(datetime(2026, 11, 27, 23, 0, tzinfo=TZ).timestamp() * 1000)
    d.command(b'{"id":"c","ts":1,"brightness_pct":37.5,"reason":"x"}', ts)
    [p] = d.tick(ts, 60, WORLD)
    assert b'"brightness_pct":37.5,' in p
    d.command(b'{"id":"c","ts":1,"brightness_pct":40,"reason":"x"}', ts)  # a float, 40.0
    [p] = d.tick(ts + 60_000, 60, WORLD)
    assert b'"brightness_pct":40.0,' in p and orjson.loads(p)["power_w"] == round(
        57 * 0.4 * 1.08 + 0.5, 2)


def test_the_normal_table_is_a_standard_normal():
    assert len(physics.NORMAL) == 1 << physics.NORMAL_BITS
    assert mean(physics.NORMAL) == pytest.approx(0, abs=1e-9)
    assert pstdev(physics.NORMAL) == pytest.approx(1, abs=0.002)
    assert list(physics.NORMAL) == sorted(physics.NORMAL)
    rng = random.Random(4)
    draws = [physics.normal(rng) for _ in range(50_000)]
    assert mean(draws) == pytest.approx(0, abs=0.02) and pstdev(draws) == pytest.approx(1, 0.02)
    assert sum(abs(x) > 1.96 for x in draws) / len(draws) == pytest.approx(0.05, abs=0.005)


@pytest.mark.parametrize("m", [0.004, 0.3, 2.5, 11.4, 29.0, 45.0])
def test_poisson_draws_have_the_mean_and_variance_of_a_poisson(m):
    rng = random.Random(8)
    n = 40_000
    draws = [physics.poisson(rng, m) for _ in range(n)]
    assert mean(draws) == pytest.approx(m, abs=5 * (m / n) ** 0.5 + 1e-3)
    assert pstdev(draws) ** 2 == pytest.approx(m, rel=0.05, abs=2e-3)
    assert physics.poisson_cdf(min(m, 30))[-1] > 1 - 1e-11


def test_the_load_profiles_are_their_base_times_the_noise():
    local = datetime(2026, 11, 3, 19, 0, tzinfo=TZ)
    season = physics.season(local)
    base = physics.household_base_w(local, season)
    draws = [physics.household_w(local, season, random.Random(s)) for s in range(3000)]
    typical = sorted(draws)[len(draws) // 2]
    assert typical == pytest.approx(base, rel=0.03)  # the median: lognormal, median 1
    assert physics.business_w(local, season, random.Random(1), base=1000.0) > 200
