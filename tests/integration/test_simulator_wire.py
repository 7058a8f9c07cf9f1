"""The simulator on the wire, against the real Mosquitto: what a device engineer would check."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime

import orjson
import pytest

from citygrid import contract, mqtt
from citygrid.city import COPENHAGEN
from citygrid.contract import Topic, decode_readings
from citygrid.fleet import Fleet
from citygrid.settings import MqttUrl
from simulators.devices import BLIND_MS, DRIVER_LOSS, STANDBY_W
from simulators.engine import Engine, Injection, SimConfig
from simulators.fleetgen import generate
from tests.helpers import REPO, Collector, run_in_thread, wait_until


def fleet_for(uid: str, lights: int, meters: int, seed: int = 1) -> Fleet:
    """A generated fleet moved into the test's own district (its own topic prefix)."""
    return Fleet(dataclasses.replace(d, district=uid)
                 for d in generate(COPENHAGEN, lights, meters, seed))




@pytest.fixture
def collect(mosquitto, uid):
    collectors = []

    def make(topic_filter: str | None = None) -> Collector:
        c = Collector(mosquitto.url, topic_filter or f"city/v1/{uid}/#")
        collectors.append(c)
        return c

    yield make
    for c in collectors:
        c.close()




def test_every_message_obeys_the_contract(mosquitto, uid, collect):
    fleet = fleet_for(uid, 15, 10)
    seen = collect()
    config = SimConfig(speed=1200, duration_s=3600, interval_s=60, devices_per_connection=10,
                       start_ms=int(time.time() * 1000) - 2 * 86_400_000)
    engine = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN, config)
    engine.connect()
    stats = engine.run()
    wait_until(lambda: len(seen.on("telemetry")) >= stats["readings"])
    telemetry = seen.on("telemetry")
    # The schedule's readings, and the motion events of the lights that were lit.
    assert stats["readings"] == len(telemetry) == 25 * 60 + stats["motion_events"]
    kinds = Counter()
    for topic, payload, _ in telemetry:
        t = Topic.parse(topic)
        for r in decode_readings(t.kind, payload, topic):
            kinds[t.kind] += 1
            assert config.start_ms <= r.ts < config.start_ms + 3600 * 1000
    assert kinds == {"streetlight": 15 * 60 + stats["motion_events"], "meter": 10 * 60}
    # The last offline statuses may still be on their way when the telemetry is all in.
    wait_until(lambda: len(seen.on("status")) >= 50, message="25 online, 25 offline")
    statuses = [contract.Status.model_validate_json(p) for _, p, _ in seen.on("status")]
    assert sum(s.online for s in statuses) == 25 and sum(not s.online for s in statuses) == 25
    seqs = Counter(Topic.parse(t).device_id for t, _, _ in telemetry)
    assert {seqs[d.device_id] for d in fleet if d.kind == "meter"} == {60}
    assert min(seqs[d.device_id] for d in fleet if d.kind == "streetlight") >= 60


NIGHT_MS = int(datetime(2026, 11, 24, 21, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)


@pytest.mark.parametrize("mode", ["per-device", "multiplexed"])
def test_a_detection_goes_out_at_once_as_a_full_reading(mosquitto, uid, collect, mode):
    """At night a light's presence sensor publishes each detection when it happens (then is
    blind for a while); its periodic readings keep their schedule."""
    fleet = fleet_for(uid, 8, 0)
    seen = collect(f"city/v1/{uid}/+/+/telemetry")
    config = SimConfig(speed=600, start_ms=NIGHT_MS, duration_s=1200, interval_s=60,
                       mode=mode, seed=3)
    engine = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN, config)
    engine.connect()
    stats = engine.run()
    wait_until(lambda: len(seen.messages) >= stats["readings"], message="every reading")
    assert stats["readings"] == len(seen.messages) == 8 * 20 + stats["motion_events"]
    assert stats["motion_events"] >= 8  # the arterials' traffic at 21:00
    phase = {engine.devices[i].spec.device_id: off % 60_000
             for i, off in zip(engine.schedule.order, engine.schedule.offsets, strict=True)}
    by_device: dict[str, list[dict]] = {}
    for topic, payload, _ in seen.messages:
        [r] = decode_readings("streetlight", payload, topic)  # a full reading, by contract
        by_device.setdefault(Topic.parse(topic).device_id, []).append(orjson.loads(payload))
    events = 0
    for device_id, rs in by_device.items():
        assert [r["seq"] for r in rs] == sorted(r["seq"] for r in rs)  # in the order made
        assert [r["ts"] for r in rs] == sorted(r["ts"] for r in rs)
        off = [r for r in rs if (r["ts"] - NIGHT_MS) % 60_000 != phase[device_id]]
        assert sum(1 for r in rs if r not in off) == 20  # the schedule, untouched
        assert all(r["motion"] and r["motion_count"] >= 1 for r in off)
        stamps = [r["ts"] for r in off]
        assert all(b - a >= BLIND_MS for a, b in zip(stamps, stamps[1:], strict=False))
        events += len(off)
    assert events == stats["motion_events"]


@pytest.mark.parametrize("mode", ["per-device", "multiplexed"])
def test_a_cabinet_outage_goes_dark_and_silent_then_comes_back(mosquitto, uid, collect, mode):
    fleet = fleet_for(uid, 10, 0)
    cabinet = fleet.devices[0].cabinet
    members = {d.device_id for d in fleet if d.cabinet == cabinet}
    seen = collect()
    config = SimConfig(speed=600, start_ms=NIGHT_MS, duration_s=1500, interval_s=60,
                       mode=mode, seed=3,
                       inject=[Injection.parse(f"cabinet_outage:{cabinet}@+5m/10m")])
    engine = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN, config)
    engine.connect()
    stats = engine.run()
    wait_until(lambda: len(seen.on("telemetry")) >= stats["readings"], message="readings")
    assert stats["injected_cabinet_outage"] == len(members)

    def status(device_id: str) -> list[bytes]:
        return [p for t, p, _ in seen.on("status") if Topic.parse(t).device_id == device_id]

    wait_until(lambda: all(status(d)[:3] == [b'{"online":true}', b'{"online":false}',
                                             b'{"online":true}'] for d in members),
               message="online, offline for the outage, online again")
    silent = (NIGHT_MS + 6 * 60_000, NIGHT_MS + 15 * 60_000)
    for topic, payload, _ in seen.on("telemetry"):
        ts = orjson.loads(payload)["ts"]
        if Topic.parse(topic).device_id in members:
            assert not silent[0] <= ts < silent[1], "a light of the cut cabinet spoke"
    back = {Topic.parse(t).device_id for t, p, _ in seen.on("telemetry")
            if orjson.loads(p)["ts"] >= silent[1]}
    assert members <= back


def test_a_command_is_acknowledged_and_shows_in_the_next_reading(mosquitto, uid, collect):
    fleet = fleet_for(uid, 3, 0)
    target = fleet.devices[0]
    topic = Topic(uid, "streetlight", target.device_id)
    seen = collect(f"city/v1/{uid}/streetlight/{target.device_id}/+")
    config = SimConfig(speed=1, interval_s=0.5, seed=4)
    engine = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN, config)
    thread = run_in_thread(engine)
    commander = mqtt.make_client(MqttUrl.parse(mosquitto.url))
    mqtt.connect(commander, MqttUrl.parse(mosquitto.url))
    commander.loop_start()

    def send(payload: bytes) -> None:
        commander.publish(str(topic.with_channel("cmd")), payload, qos=1,
                          properties=mqtt.message_expiry(commander, 30)).wait_for_publish(5)

    def acks() -> list[dict]:
        return [orjson.loads(p) for _, p, _ in seen.on("ack")]

    def readings_after(ts: int) -> list[dict]:
        return [orjson.loads(p) for _, p, _ in seen.on("telemetry")
                if orjson.loads(p)["ts"] > ts]

    try:
        wait_until(lambda: seen.on("telemetry"), message="first reading")
        send(orjson.dumps({"id": "cmd-1", "ts": int(time.time() * 1000), "brightness_pct": 37,
                           "reason": "override:operator"}))
        ack = wait_until(lambda: [a for a in acks() if a["id"] == "cmd-1"], message="ack")[0]
        contract.Ack.model_validate(ack)
        assert ack["ok"] is True and ack["brightness_pct"] == 37
        after = wait_until(lambda: readings_after(ack["ts"]), message="next reading")[0]
        assert after["brightness_pct"] == 37
        assert after["power_w"] == pytest.approx(target.rated_w * 0.37 * (1 + DRIVER_LOSS)
                                                 + STANDBY_W, abs=0.01)

        send(b'{"id":"cmd-2","ts":1790000000000,"brightness_pct":140,"reason":"x"}')
        bad = wait_until(lambda: [a for a in acks() if a["id"] == "cmd-2"], message="ack")[0]
        assert bad["ok"] is False and "brightness_pct" in bad["error"]
        assert bad["brightness_pct"] == 37
        assert wait_until(lambda: readings_after(bad["ts"]))[0]["brightness_pct"] == 37
    finally:
        engine.stop()
        thread.join(10)
        commander.loop_stop()
        commander.disconnect()


def test_last_will_fires_when_the_device_process_dies(mosquitto, uid, collect, tmp_path):
    fleet = fleet_for(uid, 4, 2)
    fleet.dump(tmp_path / "fleet.geojson")
    seen = collect(f"city/v1/{uid}/+/+/status")
    process = subprocess.Popen(
        [sys.executable, "-m", "cityctl", "simulate", "--mqtt-url", mosquitto.url,
         "--fleet", str(tmp_path / "fleet.geojson"), "--mode", "per-device",
         "--interval", "1s"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sum(p == b'{"online":true}' for _, p, _ in seen.messages) == 6,
                   message="six devices online")
        process.send_signal(signal.SIGKILL)
        process.wait()
        wait_until(lambda: sum(p == b'{"online":false}' for _, p, _ in seen.messages) == 6,
                   message="six Last Wills")
    finally:
        if process.poll() is None:
            process.kill()
    offline = {Topic.parse(t).device_id for t, p, _ in seen.messages if p == b'{"online":false}'}
    assert offline == {d.device_id for d in fleet}


@pytest.mark.parametrize("mode", ["per-device", "multiplexed"])
def test_offline_fault_says_offline_and_comes_back(mosquitto, uid, collect, mode):
    """Per-device: the connection drops and the Last Will says offline. Multiplexed (one
    connection for many): the simulator publishes the same retained status itself."""
    fleet = fleet_for(uid, 6, 0)
    seen = collect(f"city/v1/{uid}/+/+/status")
    config = SimConfig(speed=10, interval_s=1, mode=mode, seed=5,
                       faults={"offline": 0.05})
    engine = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN, config)
    thread = run_in_thread(engine)
    try:
        wait_until(lambda: any(p == b'{"online":false}' for _, p, _ in seen.messages),
                   message="offline from a device gone silent")
        gone = next(Topic.parse(t).device_id for t, p, _ in seen.messages
                    if p == b'{"online":false}')
        n = len(seen.messages)
        wait_until(lambda: any(Topic.parse(t).device_id == gone and p == b'{"online":true}'
                               for t, p, _ in seen.messages[n:]), message=f"{gone} back online")
    finally:
        engine.stop()
        thread.join(10)
    assert engine.stats["readings"] > 0


def test_meter_faults_on_the_wire_match_what_was_injected(mosquitto, uid, collect):
    fleet = fleet_for(uid, 0, 20)
    seen = collect(f"city/v1/{uid}/meter/+/telemetry")
    config = SimConfig(speed=3600, duration_s=6 * 3600, interval_s=60, seed=6,
                       start_ms=int(time.time() * 1000) - 3 * 86_400_000,
                       faults={"duplicate": 0.05, "gap": 0.05})
    engine = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN, config)
    engine.connect()
    stats = engine.run()
    wait_until(lambda: len(seen.messages) >= stats["readings"])
    ticks = 20 * 6 * 60  # every reading due in the six hours is sent (or is a gap)
    assert stats["readings"] == ticks - stats["fault_gap"] + stats["fault_duplicate"]
    pairs = Counter((Topic.parse(t).device_id, orjson.loads(p)["seq"])
                    for t, p, _ in seen.messages)
    duplicates = sum(n - 1 for n in pairs.values())
    gaps = ticks - len(pairs)
    assert duplicates == stats["fault_duplicate"]
    assert gaps == stats["fault_gap"]
    for observed in (duplicates, gaps):  # ≈ 5 % of 7,200 readings (sd ≈ 18)
        assert abs(observed - 0.05 * ticks) < 5 * (ticks * 0.05 * 0.95) ** 0.5


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_multiplexed_devices_lose_no_reading_when_the_broker_restarts(uid, tmp_path, protocol):
    """The wire connections notice the broker gone, keep the readings due meanwhile, and on
    the new connection send again what was unacknowledged: every seq arrives."""
    from cityctl.localservices import Mosquitto
    from citygrid.wire import Client

    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    got: list[tuple[str, bytes]] = []
    sub: Client | None = None

    def take(messages) -> None:
        got.extend((m.topic, m.payload) for m in messages)
        sub.ack([m.mid for m in messages if m.qos], messages[0].epoch)

    # A persistent session: what the simulator publishes while we reconnect waits for us.
    sub = Client(MqttUrl.parse(broker.url), f"sub-{uid}", clean_start=False,
                 session_expiry_s=600, receive_maximum=1000, reconnect_min_s=0.1,
                 subscriptions=[(f"city/v1/{uid}/+/+/telemetry", 1)], on_messages=take).start()
    fleet = fleet_for(uid, 12, 8)
    config = SimConfig(speed=1, interval_s=0.2, devices_per_connection=7, seed=3,
                       protocol=protocol, client_prefix=f"restart-{uid}")
    engine = Engine(MqttUrl.parse(broker.url), fleet, COPENHAGEN, config)
    try:
        assert sub.subscribed.wait(10)
        thread = run_in_thread(engine)
        wait_until(lambda: len(got) > 200, message="readings before the restart")
        broker.stop()
        time.sleep(1.5)  # readings fall due with no broker
        broker = Mosquitto(tmp_path / "broker", port=broker.port)
        broker.start()
        before = len(got)
        wait_until(lambda: all(c.up for c in engine.connections) and len(got) > before + 200,
                   message="the simulator back on the broker")
        engine.stop()
        thread.join(30)
        assert engine.stats["unacknowledged"] == 0

        def distinct() -> set[tuple[str, int]]:
            return {(Topic.parse(t).device_id, orjson.loads(p)["seq"]) for t, p in list(got)}

        wait_until(lambda: len(distinct()) >= engine.stats["readings"], timeout_s=15,
                   message="every reading at the subscriber")
        seqs: dict[str, set[int]] = {}
        for device, seq in distinct():
            seqs.setdefault(device, set()).add(seq)
        assert set(seqs) == {d.device_id for d in fleet}
        for device, s in seqs.items():
            assert s == set(range(1, max(s) + 1)), f"{device}: a gap"
        assert len(distinct()) == engine.stats["readings"]
    finally:
        engine.stop()
        sub.stop()
        broker.stop()
