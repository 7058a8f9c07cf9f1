"""CityGrid's services on a real 3-node broker cluster (Debian's nats-server: JetStream and
an MQTT listener per node, MQTT 3.1.1): devices on node 0, ingest on node 1, the rule engine
on node 2, each given every node (``mqtt://n1,n2,n0``), and a node killed with SIGKILL under
them (docs/scale-out.md)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import orjson
import paho.mqtt.client as paho
import pytest

from billing import load_config
from citygrid import contract, mqtt, wire
from citygrid.city import COPENHAGEN
from citygrid.fleet import FleetDevice
from citygrid.registry import Catalogue, Registry
from citygrid.settings import MqttUrl, Settings
from ingest.service import IngestConfig, IngestService
from rules.loader import DEFAULT_RULES
from rules.runner import RuleRunner, RunnerConfig
from tests.helpers import NIGHT, REPO, light_reading, meter, wait_until

FAILOVER_S = 45.0  # kill → working through another node, at most (NATS: 0–25 s seen)


@pytest.fixture
def nodes(cluster):
    """The NATS cluster (tests/conftest.py), every node running."""
    return cluster


def settings_for(url: str, tmp_path, **kw) -> Settings:
    return Settings(mqtt_url=url, mqtt_protocol="3.1.1", data_dir=str(tmp_path / "data"), **kw)


class Devices:
    """Devices on one node: QoS 1 publishes, MQTT 3.1.1, counted as the node acknowledges."""

    def __init__(self, url: str, client_id: str):
        self.url = MqttUrl.parse(url)
        self.client = mqtt.make_client(self.url, client_id, protocol=paho.MQTTv311)
        self.acked = 0
        self.client.on_publish = lambda *a: setattr(self, "acked", self.acked + 1)
        mqtt.connect(self.client, self.url)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, message="devices connected")

    def send(self, topic: str, payload: dict) -> None:
        self.client.publish(topic, orjson.dumps(payload), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Watcher:
    """A paho 3.1.1 subscriber on one node: every message under a filter, with its time."""

    def __init__(self, url: str, topic_filter: str, client_id: str):
        u = MqttUrl.parse(url)
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self.client = mqtt.make_client(u, client_id, protocol=paho.MQTTv311)
        done = threading.Event()
        self.client.on_message = lambda c, d, m: self.messages.append(
            (time.monotonic(), m.topic, m.payload, m.retain))
        self.client.on_subscribe = lambda *a: done.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        mqtt.connect(self.client, u)
        self.client.loop_start()
        assert done.wait(FAILOVER_S)  # a node just restarted may hold CONNECTs a while

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_ingest_stores_every_reading_once_through_a_kill_of_its_node(nodes, influx_store, uid,
                                                                     tmp_path):
    devices = Devices(nodes.url(0), f"dev-{uid}")
    settings = settings_for(nodes.cluster_url([1, 2, 0]), tmp_path)
    service = IngestService(settings, influx_store, IngestConfig(
        client_id=f"ingest-{uid}", topic=f"city/v1/{uid}/+/+/telemetry",
        flush_interval_s=0.05))
    service.start(timeout_s=20)
    n, per_device = 1500, 300
    t0 = int(time.time() * 1000) - 3_600_000
    readings = [(str(contract.Topic(uid, "meter", f"m-{d}")), meter(t0 + s * 1000, s))
                for s in range(per_device) for d in range(n // per_device)]
    try:
        assert service.metrics.mqtt_node == f"127.0.0.1:{nodes.mqtt_port(1)}"
        killed_at = None
        for i, (topic, payload) in enumerate(readings):
            devices.send(topic, payload)
            if i == n // 2:  # mid-stream: ingest's node dies
                wait_until(lambda: influx_store.count("meter") > 0, 20,
                           message="readings stored before the kill")
                nodes.kill(1)
                killed_at = time.monotonic()
            time.sleep(0.001)
        wait_until(lambda: devices.acked >= n, 30, message="node 0 took every reading")
        wait_until(lambda: influx_store.count("meter") >= n, 60, message=f"{n} points")
        time.sleep(1.0)  # a duplicate would have arrived by now
        assert killed_at is not None
        # On another node (the next, or the one after if the next was not ready yet).
        assert service.metrics.mqtt_node in (f"127.0.0.1:{nodes.mqtt_port(2)}",
                                             f"127.0.0.1:{nodes.mqtt_port(0)}")
        assert service.metrics.mqtt_failovers >= 1
        stored = []
        for s in influx_store.query('SELECT "seq" FROM "meter" GROUP BY "device_id"'):
            stored += [(s["tags"]["device_id"], v) for _, v in s["values"]]
        assert sorted(stored) == sorted((f"m-{d}", s) for s in range(per_device)
                                        for d in range(n // per_device))  # each once
        assert service.metrics.messages >= n  # redelivered ones included, stored once
    finally:
        service.stop()
        devices.close()


def test_the_rule_engine_resumes_commands_on_another_node_and_keeps_its_holds(
        nodes, uid, tmp_path):
    data = tmp_path / "data"
    registry = Registry(data, Catalogue(tariffs=frozenset(load_config().tariffs)))
    registry.upsert(FleetDevice("sl-1", "streetlight", uid, 55.696, 12.544, rated_w=50))
    registry.upsert(FleetDevice("sl-2", "streetlight", uid, 55.796, 12.644, rated_w=50))
    settings = settings_for(nodes.cluster_url([2, 0, 1]), tmp_path)
    runner = RuleRunner(settings, registry.fleet(), COPENHAGEN, None,
                        RunnerConfig(DEFAULT_RULES, client_id=f"rules-{uid}"),
                        inventory=Registry(data))
    commands = Watcher(nodes.url(1), f"city/v1/{uid}/streetlight/+/cmd", f"cmds-{uid}")
    devices = Devices(nodes.url(0), f"dev-{uid}")

    def to(device: str) -> list[tuple[float, dict]]:
        return [(t, orjson.loads(p)) for t, topic, p, _ in commands.messages
                if contract.Topic.parse(topic).device_id == device]

    runner.start(timeout_s=20)
    try:
        assert runner.engine.mqtt_node == f"127.0.0.1:{nodes.mqtt_port(2)}"
        # An operator holds sl-1 at 80 % for an hour; sl-2 gets its night baseline.
        devices.send(str(contract.Topic(uid, "streetlight", "sl-1", "override")),
                     {"level": 80, "expires_in_s": 3600, "who": "operator"})
        wait_until(lambda: any(c["brightness_pct"] == 80.0 for _, c in to("sl-1")), 15,
                   message="the held level")
        devices.send(str(contract.Topic(uid, "streetlight", "sl-2")), light_reading(1, NIGHT))
        wait_until(lambda: to("sl-2"), 15, message="a command to sl-2")
        before = len(to("sl-2"))
        nodes.kill(2)
        killed = time.monotonic()
        seq = 2
        while time.monotonic() - killed < FAILOVER_S and len(to("sl-2")) == before:
            # Motion at sl-2 every half second: a boost as soon as the engine is back.
            devices.send(str(contract.Topic(uid, "streetlight", "sl-2")),
                         light_reading(seq, NIGHT + seq * 1000, motion=True))
            devices.send(str(contract.Topic(uid, "streetlight", "sl-1")),
                         light_reading(seq, NIGHT + seq * 1000, motion=True))
            seq += 1
            time.sleep(0.5)
        assert len(to("sl-2")) > before, f"no command within {FAILOVER_S} s of the kill"
        resumed = to("sl-2")[before][0] - killed
        assert resumed < FAILOVER_S
        assert runner.engine.mqtt_node in (f"127.0.0.1:{nodes.mqtt_port(0)}",
                                           f"127.0.0.1:{nodes.mqtt_port(1)}")
        time.sleep(1.0)
        # The hold survived the failover: motion at sl-1 never took it off 80 %.
        assert all(c["brightness_pct"] == 80.0 for _, c in to("sl-1"))
        assert runner.engine.lights["sl-1"].level == 80.0
    finally:
        runner.stop()
        devices.close()
        commands.close()
        registry.close()


def test_a_shared_subscription_group_is_refused_where_it_would_lose_everything(nodes, uid,
                                                                             tmp_path):
    url = MqttUrl.parse(nodes.url(0))
    with pytest.raises(wire.SharedSubscriptionsUnsupported, match="--partition"):
        wire.probe_shared(url, f"g-{uid}", f"probe-{uid}", protocol=wire.MQTT311,
                          timeout_s=2)
    run = subprocess.run(
        [sys.executable, "-m", "cityctl", "ingest", "--group", "ingesters",
         "--mqtt-url", nodes.url(0), "--data-dir", str(tmp_path / "d")],
        env={"PATH": "/usr/bin:/bin", "CITYGRID_MQTT_PROTOCOL": "3.1.1",
             "CITYGRID_INFLUX_URL": "http://127.0.0.1:9"},
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 2
    assert "--group ingesters" in run.stderr and "delivered nothing" in run.stderr
