"""A 3-node NATS cluster (Debian's nats-server 2.9) as the MQTT broker: what crosses nodes,
what survives a node's crash, what it refuses. MQTT 3.1.1 clients only (paho-mqtt 2.x)."""

from __future__ import annotations

import queue
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest

pytestmark = pytest.mark.integration

# The first CONNECT to a node creates or looks up the MQTT streams on the cluster: ~1-3 s here.
CONNECT_TIMEOUT_S = 15.0
RECEIVE_TIMEOUT_S = 10.0
# After a node's SIGKILL, each JetStream group it led needs a new leader (Raft: 4-9 s, another
# round on a split vote); until then nats-server fails a CONNECT after 4 s (its JetStream API
# timeout) and the client tries again. Measured here: the session is back in 6-25 s.
FAILOVER_TIMEOUT_S = 45.0


class Client:
    """A paho MQTT 3.1.1 client on one node: what it received, in a queue."""

    def __init__(self, port: int, client_id: str, clean_session: bool = True):
        self.port = port
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv311, clean_session=clean_session)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.session_present: bool | None = None
        self.subscribed = threading.Event()
        self.granted: list = []
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda client, userdata, m: self.messages.put(m)
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self.session_present = flags.session_present
            self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.granted = list(reason_codes)
        self.subscribed.set()

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> Client:
        """Connect (paho retrying each second on a refusal or a dropped CONNECT) until a
        CONNACK accepts, within ``timeout_s``."""
        self.client.reconnect_delay_set(1, 1)
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(timeout_s), \
            f"no CONNACK from 127.0.0.1:{self.port} in {timeout_s:.0f} s"
        return self

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos)
        assert self.subscribed.wait(RECEIVE_TIMEOUT_S), f"no SUBACK for {topic_filter}"
        assert [rc.value for rc in self.granted] == [qos], self.granted

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(RECEIVE_TIMEOUT_S)
        assert info.is_published(), f"no PUBACK for {topic}"

    def next_on(self, topic: str, timeout_s: float = RECEIVE_TIMEOUT_S) -> paho.MQTTMessage:
        """The next message on ``topic`` (others skipped), within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if m.topic == topic:
                return m
        raise AssertionError(f"nothing on {topic} in {timeout_s:.0f} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def open_client(clients: list[Client], port: int, client_id: str, **kw) -> Client:
    c = Client(port, client_id, **kw)
    clients.append(c)
    return c.connect()


def test_a_message_crosses_nodes(cluster, clients, uid):
    topic = f"city/v1/{uid}/streetlight/sl-1/telemetry"
    sub = open_client(clients, cluster.mqtt_port(2), f"sub-{uid}")
    sub.subscribe(topic, qos=1)
    pub = open_client(clients, cluster.mqtt_port(0), f"pub-{uid}")
    pub.publish(topic, b'{"seq": 1}', qos=1)

    m = sub.next_on(topic)
    assert m.payload == b'{"seq": 1}'
    assert m.qos == 1


WILL_CLIENT = textwrap.dedent("""
    import sys, threading, time
    import paho.mqtt.client as paho
    port, client_id, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ok = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv311)
    c.will_set(topic, b"offline", qos=1, retain=True)
    c.on_connect = lambda c, u, f, rc, p: rc.is_failure or ok.set()
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not ok.wait(15):
        sys.exit("no CONNACK")
    print("connected", flush=True)
    time.sleep(120)
""")


def test_retained_and_last_will_cross_nodes(cluster, clients, uid):
    status_filter = "city/v1/+/+/+/status"
    online = f"city/v1/{uid}/streetlight/sl-7/status"
    pub = open_client(clients, cluster.mqtt_port(0), f"pub-{uid}")
    pub.publish(online, b"online", qos=1, retain=True)

    # A new subscriber on another node gets the retained message, flagged as retained.
    late = open_client(clients, cluster.mqtt_port(1), f"late-{uid}")
    late.subscribe(status_filter, qos=1)
    m = late.next_on(online)
    assert (m.payload, m.retain) == (b"online", True)

    # A device on node 0 with a Will dies without a DISCONNECT: node 2 hears its Will.
    will_topic = f"city/v1/{uid}/streetlight/sl-8/status"
    watcher = open_client(clients, cluster.mqtt_port(2), f"watch-{uid}")
    watcher.subscribe(status_filter, qos=1)
    device = subprocess.Popen(
        [sys.executable, "-c", WILL_CLIENT, str(cluster.mqtt_port(0)), f"dev-{uid}", will_topic],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([device.stdout], [], [], CONNECT_TIMEOUT_S + 5)
        line = device.stdout.readline() if ready else b""
        assert line.strip() == b"connected", (line, device.poll())
        with pytest.raises(AssertionError):  # no Will while the device is alive
            watcher.next_on(will_topic, timeout_s=0.5)
        device.kill()  # SIGKILL: the kernel closes its socket, no DISCONNECT is sent
        device.wait(10)
    finally:
        if device.poll() is None:
            device.kill()
            device.wait()
        device.stdout.close()
        device.stderr.close()
    m = watcher.next_on(will_topic)
    assert (m.payload, m.retain) == (b"offline", False)  # live delivery: retain flag cleared

    # The Will was retained: a subscriber arriving later on node 1 still gets it.
    after = open_client(clients, cluster.mqtt_port(1), f"after-{uid}")
    after.subscribe(will_topic, qos=1)
    m = after.next_on(will_topic)
    assert (m.payload, m.retain) == (b"offline", True)


def test_a_persistent_session_survives_a_node_kill(cluster, clients, uid):
    topic = f"city/v1/{uid}/meter/m-1/telemetry"
    client_id = f"ingest-{uid}"
    first = open_client(clients, cluster.mqtt_port(1), client_id, clean_session=False)
    first.subscribe(topic, qos=1)
    first.close()  # a clean DISCONNECT: the session stays, on the cluster

    pub = open_client(clients, cluster.mqtt_port(0), f"pub-{uid}")
    expected = {f"reading-{i}".encode() for i in range(50)}
    for payload in sorted(expected):
        pub.publish(topic, payload, qos=1)

    cluster.kill(1)  # the node the session was made on
    assert not cluster.running(1)

    started = time.monotonic()
    again = open_client(clients, cluster.mqtt_port(2), client_id, clean_session=False)
    failover_s = time.monotonic() - started
    print(f"session back on n2 {failover_s:.1f} s after n1's SIGKILL")
    assert again.session_present is True
    received: set[bytes] = set()
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while received < expected and (left := deadline - time.monotonic()) > 0:
        try:
            m = again.messages.get(timeout=left)
        except queue.Empty:
            break
        if m.topic == topic:
            received.add(m.payload)
    assert received == expected, f"missing: {sorted(expected - received)}"

    cluster.restart(1)
    assert cluster.running(1)
    back = open_client(clients, cluster.mqtt_port(1), f"back-{uid}")
    assert back.connected.is_set()


def test_mqtt5_is_refused(cluster):
    answered = threading.Event()
    outcome: dict = {}

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        outcome["connack"] = reason_code
        answered.set()

    def on_disconnect(client, userdata, flags, reason_code, properties) -> None:
        outcome.setdefault("closed", reason_code)
        answered.set()

    v5 = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="v5-client",
                     protocol=paho.MQTTv5)
    v5.on_connect, v5.on_disconnect = on_connect, on_disconnect
    v5.connect("127.0.0.1", cluster.mqtt_port(0), keepalive=30)
    v5.loop_start()
    try:
        assert answered.wait(RECEIVE_TIMEOUT_S), "neither a CONNACK nor a close"
    finally:
        v5.loop_stop()
        v5.disconnect()
    connack = outcome.get("connack")
    assert connack is None or connack.is_failure, outcome
    assert not v5.is_connected()
