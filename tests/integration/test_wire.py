"""CityGrid's MQTT client (citygrid/wire.py) against the real Mosquitto: both protocol
versions, persistent sessions, Receive Maximum, the publish window, reconnect, the Will,
message expiry, TLS with and without client certificates, accounts."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from cityctl.localservices import Mosquitto, free_port
from citygrid.settings import MqttUrl, Settings
from citygrid.wire import MQTT5, MQTT311, Client, Message, MqttError, Will, frame
from tests.helpers import wait_until
from tests.integration.test_security import tls_broker  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration
PROTOCOLS = pytest.mark.parametrize("protocol", [MQTT5, MQTT311], ids=["mqtt5", "mqtt311"])


class Inbox:
    """Collects what a client receives; acknowledges when told to."""

    def __init__(self, auto_ack: bool = True):
        self.messages: list[Message] = []
        self.auto_ack = auto_ack
        self.client: Client | None = None
        self.lock = threading.Lock()

    def __call__(self, messages: list[Message]) -> None:
        with self.lock:
            self.messages.extend(messages)
        if self.auto_ack and self.client is not None:
            self.client.ack([m.mid for m in messages if m.qos], messages[0].epoch)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages]


def client(url: str, client_id: str, protocol: int, inbox: Inbox | None = None,
           **kw) -> Client:
    c = Client(MqttUrl.parse(url), client_id, protocol=protocol,
               on_messages=inbox, **kw)
    if inbox is not None:
        inbox.client = c
    return c


@PROTOCOLS
def test_publish_and_receive_qos0_qos1_and_retained(mosquitto, uid, protocol):
    inbox = Inbox()
    sub = client(mosquitto.url, f"sub-{uid}", protocol, inbox,
                 subscriptions=[(f"{uid}/#", 1)]).start()
    pub = client(mosquitto.url, f"pub-{uid}", protocol).start()
    try:
        assert sub.subscribed.wait(5) and pub.wait_connected(5)
        for i in range(500):
            pub.publish(f"{uid}/a/{i % 7}", b"q%d" % i, qos=i % 2)
        assert pub.flush(10)
        wait_until(lambda: len(inbox.messages) == 500, 10)
        assert sorted(inbox.payloads()) == sorted(b"q%d" % i for i in range(500))
        assert {m.topic for m in inbox.messages} == {f"{uid}/a/{k}" for k in range(7)}
        assert {m.qos for m in inbox.messages} == {0, 1}
        pub.publish(f"{uid}/retained", b"kept", qos=1, retain=True)
        assert pub.flush(5)
    finally:
        sub.stop()
    late = Inbox()
    sub2 = client(mosquitto.url, f"late-{uid}", protocol, late,
                  subscriptions=[(f"{uid}/retained", 1)]).start()
    try:
        wait_until(lambda: late.messages, 5)
        assert late.messages[0].payload == b"kept" and late.messages[0].retain
        pub.publish(f"{uid}/retained", b"", qos=1, retain=True)  # clear it
        assert pub.flush(5)
    finally:
        sub2.stop()
        pub.stop()


@PROTOCOLS
def test_a_persistent_session_gets_what_came_while_away_and_what_it_never_acked(
        mosquitto, uid, protocol):
    topic = f"{uid}/t"
    inbox = Inbox(auto_ack=False)  # takes, never acknowledges
    kw = dict(clean_start=False, session_expiry_s=300, subscriptions=[(topic, 1)])
    sub = client(mosquitto.url, f"sess-{uid}", protocol, inbox, **kw).start()
    pub = client(mosquitto.url, f"pub-{uid}", protocol).start()
    assert sub.subscribed.wait(5) and pub.wait_connected(5)
    for i in range(20):
        pub.publish(topic, b"a%d" % i, qos=1)
    wait_until(lambda: len(inbox.messages) == 20, 10)
    sub.stop()  # away, with 20 unacknowledged
    for i in range(30):
        pub.publish(topic, b"b%d" % i, qos=1)
    assert pub.flush(5)
    again = Inbox()
    sub = client(mosquitto.url, f"sess-{uid}", protocol, again, **kw)
    sessions: list[bool] = []
    sub.on_connect = sessions.append
    sub.start()
    try:
        wait_until(lambda: len(set(again.payloads())) == 50, 10)
        assert sessions == [True]
        assert set(again.payloads()) == ({b"a%d" % i for i in range(20)}
                                         | {b"b%d" % i for i in range(30)})
        # The unacknowledged ones came again marked as redeliveries of the same messages.
    finally:
        sub.stop()
        pub.stop()


def test_receive_maximum_is_the_window_the_broker_may_send_unacknowledged(mosquitto, uid):
    topic = f"{uid}/w"
    inbox = Inbox(auto_ack=False)
    sub = client(mosquitto.url, f"rm-{uid}", MQTT5, inbox, receive_maximum=50,
                 subscriptions=[(topic, 1)]).start()
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5).start()
    try:
        assert sub.subscribed.wait(5) and pub.wait_connected(5)
        for i in range(200):
            pub.publish(topic, b"%d" % i, qos=1)
        assert pub.flush(10)
        wait_until(lambda: len(inbox.messages) >= 50, 10)
        time.sleep(0.5)
        assert len(inbox.messages) == 50  # no more until we acknowledge
        sub.ack([m.mid for m in inbox.messages], inbox.messages[0].epoch)
        # Acknowledged, the broker sends on. (Mosquitto 2.0.11 then sends the whole rest of
        # its queue at once, paho's client sees the same: docs/benchmarks.md, "The MQTT
        # client".)
        wait_until(lambda: len(inbox.messages) > 50, 10)
    finally:
        sub.stop()
        pub.stop()


def test_acks_of_an_earlier_connection_are_not_sent_on_a_new_one(mosquitto, uid):
    c = client(mosquitto.url, f"ep-{uid}", MQTT5).start()
    try:
        assert c.wait_connected(5)
        epoch = c.epoch
        c.ack([1, 2, 3], epoch - 1)  # would be a protocol error on this connection
        time.sleep(0.3)
        assert c.connected.is_set() and c.epoch == epoch
    finally:
        c.stop()


def test_the_broker_window_holds_back_publishes_beyond_it(mosquitto, uid):
    inbox = Inbox()
    sub = client(mosquitto.url, f"sub-{uid}", MQTT5, inbox,
                 subscriptions=[(f"{uid}/n", 1)]).start()
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5, max_inflight=8).start()
    try:
        assert sub.subscribed.wait(5) and pub.wait_connected(5)
        seen: list[int] = []
        pub.on_published = seen.extend
        mids = [pub.publish(f"{uid}/n", b"%d" % i, qos=1) for i in range(3000)]
        assert pub.inflight > 8  # most wait their turn
        assert pub.flush(20)
        assert sorted(seen) == sorted(mids)
        wait_until(lambda: len(inbox.messages) == 3000, 10)
        # In order: the broker forwards one publisher's messages as they were sent.
        assert inbox.payloads() == [b"%d" % i for i in range(3000)]
    finally:
        sub.stop()
        pub.stop()


@PROTOCOLS
def test_reconnects_after_a_broker_restart_and_resends_what_was_not_acknowledged(
        tmp_path, uid, protocol):
    broker = Mosquitto(tmp_path / "b", free_port())
    broker.start()
    inbox = Inbox()
    sub = client(broker.url, f"sub-{uid}", protocol, inbox, clean_start=False,
                 session_expiry_s=300, subscriptions=[(f"{uid}/r", 1)],
                 reconnect_min_s=0.1, reconnect_max_s=0.5).start()
    pub = client(broker.url, f"pub-{uid}", protocol, reconnect_min_s=0.1,
                 reconnect_max_s=0.5).start()
    try:
        assert sub.subscribed.wait(5) and pub.wait_connected(5)
        pub.publish(f"{uid}/r", b"before", qos=1)
        wait_until(lambda: inbox.messages, 5)
        broker.stop()
        wait_until(lambda: not pub.connected.is_set() and not sub.connected.is_set(), 10)
        # Published while the broker is down: kept, sent once it is back.
        pub.publish(f"{uid}/r", b"during", qos=1)
        broker.start()
        assert pub.wait_connected(15) and sub.subscribed.wait(15)
        assert pub.flush(10)
        wait_until(lambda: b"during" in inbox.payloads(), 10)
        assert sub.epoch >= 2 and pub.epoch >= 2
    finally:
        sub.stop()
        pub.stop()
        broker.stop()


def test_backoff_grows_with_jitter_and_names_the_failure(uid):
    port = free_port()  # nothing listens
    c = Client(MqttUrl("127.0.0.1", port), f"none-{uid}", reconnect_min_s=0.05,
               reconnect_max_s=0.4)
    started = time.monotonic()
    for _ in range(5):
        assert c.loop(0.1) is False
    elapsed = time.monotonic() - started
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.4, each drawn from its upper half: 0.575 … 1.15 s
    assert 0.5 < elapsed < 1.6
    assert "refused" in (c.last_error or "").lower()


def test_the_will_is_published_when_a_client_vanishes(mosquitto, uid):
    inbox = Inbox()
    sub = client(mosquitto.url, f"sub-{uid}", MQTT5, inbox,
                 subscriptions=[(f"{uid}/status", 1)]).start()
    dev = client(mosquitto.url, f"dev-{uid}", MQTT5,
                 will=Will(f"{uid}/status", b"offline", qos=1, retain=False)).start()
    try:
        assert sub.subscribed.wait(5) and dev.wait_connected(5)
        dev._sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: a vanished device
        wait_until(lambda: b"offline" in inbox.payloads(), 10)
    finally:
        dev._stopping.set()
        sub.stop()
    # A normal stop sends DISCONNECT: no Will.
    inbox.messages.clear()
    sub = client(mosquitto.url, f"sub2-{uid}", MQTT5, inbox,
                 subscriptions=[(f"{uid}/status", 1)]).start()
    dev = client(mosquitto.url, f"dev2-{uid}", MQTT5,
                 will=Will(f"{uid}/status", b"offline2", qos=1, retain=False)).start()
    try:
        assert sub.subscribed.wait(5) and dev.wait_connected(5)
        dev.stop()
        time.sleep(0.5)
        assert b"offline2" not in inbox.payloads()
    finally:
        sub.stop()


def test_message_expiry_drops_what_waited_too_long(mosquitto, uid):
    topic = f"{uid}/cmd"
    kw = dict(clean_start=False, session_expiry_s=300, subscriptions=[(topic, 1)])
    sub = client(mosquitto.url, f"exp-{uid}", MQTT5, Inbox(), **kw).start()
    assert sub.subscribed.wait(5)
    sub.stop()
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5).start()
    assert pub.wait_connected(5)
    pub.publish(topic, b"stale", qos=1, expiry_s=1)
    pub.publish(topic, b"fresh", qos=1, expiry_s=60)
    assert pub.flush(5)
    time.sleep(2.2)
    inbox = Inbox()
    sub = client(mosquitto.url, f"exp-{uid}", MQTT5, inbox, **kw).start()
    try:
        wait_until(lambda: inbox.messages, 5)
        time.sleep(0.3)
        assert inbox.payloads() == [b"fresh"]
    finally:
        sub.stop()
        pub.stop()


def test_shared_subscriptions_split_the_load(mosquitto, uid):
    boxes = [Inbox(), Inbox()]
    subs = [client(mosquitto.url, f"w{i}-{uid}", MQTT5, boxes[i],
                   subscriptions=[(f"$share/g{uid}/{uid}/s/#", 1)]).start() for i in (0, 1)]
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5).start()
    try:
        assert all(s.subscribed.wait(5) for s in subs) and pub.wait_connected(5)
        for i in range(400):
            pub.publish(f"{uid}/s/{i}", b"%d" % i, qos=1)
        assert pub.flush(10)
        wait_until(lambda: sum(len(b.messages) for b in boxes) == 400, 10)
        assert all(b.messages for b in boxes)
        assert sorted(boxes[0].payloads() + boxes[1].payloads()) == \
            sorted(b"%d" % i for i in range(400))
    finally:
        for s in subs:
            s.stop()
        pub.stop()


def test_a_refused_connection_says_why(tmp_path, uid):
    broker = Mosquitto(tmp_path / "closed", free_port(), extra_conf="")
    conf = broker.argv()  # write it, then lock the door
    (broker.dir / "mosquitto.conf").write_text(
        (broker.dir / "mosquitto.conf").read_text().replace("allow_anonymous true",
                                                            "allow_anonymous false"))
    import subprocess

    proc = subprocess.Popen(conf)
    try:
        from cityctl.localservices import wait_for_port
        wait_for_port(broker.port)
        for protocol in (MQTT5, MQTT311):
            c = Client(MqttUrl("127.0.0.1", broker.port, username="nobody", password="x"),
                       f"x-{uid}", protocol=protocol, reconnect_min_s=0.01)
            assert c.loop(0.1) is False
            assert "refused" in c.last_error and ("not authorized" in c.last_error
                                                  or "bad user name" in c.last_error)
    finally:
        proc.terminate()
        proc.wait(5)


def test_tls_with_a_ca_and_with_a_client_certificate(tls_broker, uid):  # noqa: F811
    d, tls, mutual = tls_broker
    for port, extra in ((tls, {}), (mutual, {"cert_file": str(d / "client.pem"),
                                             "key_file": str(d / "client.key")})):
        url = Settings(mqtt_url=f"mqtts://localhost:{port}", mqtt_ca=str(d / "ca.pem"),
                       **({"mqtt_cert": extra["cert_file"], "mqtt_key": extra["key_file"]}
                          if extra else {})).mqtt
        inbox = Inbox()
        sub = Client(url, f"tls-sub-{uid}-{port}", on_messages=inbox,
                     subscriptions=[(f"{uid}/tls", 1)])
        inbox.client = sub
        pub = Client(url, f"tls-pub-{uid}-{port}")
        sub.start()
        pub.start()
        try:
            assert sub.subscribed.wait(10) and pub.wait_connected(10)
            for i in range(2000):  # enough to need several TLS records and reads
                pub.publish(f"{uid}/tls", b"x" * 200 + b"%d" % i, qos=1)
            assert pub.flush(15)
            wait_until(lambda box=inbox: len(box.messages) == 2000, 15)
        finally:
            sub.stop()
            pub.stop()
    # The wrong CA: refused, and said.
    bad = Client(Settings(mqtt_url=f"mqtts://localhost:{tls}").mqtt, f"bad-{uid}",
                 reconnect_min_s=0.01)
    assert bad.loop(0.1) is False and "certificate" in bad.last_error.lower()


def test_framing_waits_for_whole_packets():
    from citygrid.wire import encode_publish

    p = encode_publish("a/b", b"x" * 300, 1, False, 7)
    packets, used = frame(p[:2])
    assert packets == [] and used == 0
    packets, used = frame(p + p[:5])
    assert len(packets) == 1 and used == len(p)
    with pytest.raises(MqttError):
        frame(b"\x30\xff\xff\xff\xff\x01")




def test_a_corked_burst_arrives_whole_and_in_order(mosquitto, uid):
    inbox = Inbox()
    sub = client(mosquitto.url, f"sub-{uid}", MQTT5, inbox,
                 subscriptions=[(f"{uid}/c", 1)]).start()
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5).start()
    try:
        assert sub.subscribed.wait(5) and pub.wait_connected(5)
        with pub.corked():
            for i in range(2000):
                pub.publish(f"{uid}/c", b"%d" % i, qos=1)
            assert pub._out  # held back until the end of the burst
        assert pub.flush(10)
        wait_until(lambda: len(inbox.messages) == 2000, 10)
        assert inbox.payloads() == [b"%d" % i for i in range(2000)]
    finally:
        sub.stop()
        pub.stop()


@PROTOCOLS
def test_subscriptions_added_and_dropped_while_connected(mosquitto, uid, protocol):
    inbox = Inbox()
    sub = client(mosquitto.url, f"dyn-{uid}", protocol, inbox).start()
    pub = client(mosquitto.url, f"pub-{uid}", protocol).start()
    try:
        assert sub.wait_connected(5) and pub.wait_connected(5)
        sub.subscribe([(f"{uid}/a", 1), (f"{uid}/b", 1)])
        wait_until(lambda: not sub._requests, 5)
        mid = pub.publish(f"{uid}/a", b"1", qos=1)
        assert pub.wait_acknowledged(mid, 5)
        wait_until(lambda: inbox.payloads() == [b"1"], 5)
        sub.unsubscribe([f"{uid}/a"])
        wait_until(lambda: not sub._requests, 5)
        pub.publish(f"{uid}/a", b"2", qos=1)
        pub.publish(f"{uid}/b", b"3", qos=1)
        wait_until(lambda: b"3" in inbox.payloads(), 5)
        assert inbox.payloads() == [b"1", b"3"]
        assert sub.subscriptions == [(f"{uid}/b", 1)]
    finally:
        sub.stop()
        pub.stop()


def test_a_read_interval_takes_many_messages_a_read(mosquitto, uid):
    inbox = Inbox()
    reads: list[int] = []

    def count(messages):
        reads.append(len(messages))
        inbox(messages)

    sub = Client(MqttUrl.parse(mosquitto.url), f"slow-{uid}", on_messages=count,
                 subscriptions=[(f"{uid}/v", 0)], read_interval_s=0.3)
    inbox.client = sub
    sub.start()
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5).start()
    try:
        assert sub.subscribed.wait(5) and pub.wait_connected(5)
        for i in range(40):
            pub.publish(f"{uid}/v", b"%d" % i)
            time.sleep(0.02)  # 40 messages over 0.8 s
        wait_until(lambda: len(inbox.messages) == 40, 5)
        assert len(reads) <= 6, reads  # not one read a message
    finally:
        sub.stop()
        pub.stop()


def test_a_backlog_right_behind_the_connack_is_handed_over_at_once(mosquitto, uid):
    """A persistent session's queued messages can arrive in the CONNACK's read: they go to
    the service then, not when the next packet happens to come (a keepalive later)."""
    topic = f"{uid}/backlog"
    kw = dict(clean_start=False, session_expiry_s=300)
    first = client(mosquitto.url, f"bl-{uid}", MQTT5, Inbox(), subscriptions=[(topic, 1)],
                   **kw).start()
    assert first.subscribed.wait(5)
    first.stop()
    pub = client(mosquitto.url, f"pub-{uid}", MQTT5).start()
    assert pub.wait_connected(5)
    for i in range(50):
        pub.publish(topic, b"%d" % i, qos=1)
    assert pub.flush(5)
    inbox = Inbox()
    again = client(mosquitto.url, f"bl-{uid}", MQTT5, inbox, keepalive=60, **kw)  # no SUBSCRIBE
    started = time.monotonic()
    again.start()
    try:
        wait_until(lambda: len(inbox.messages) == 50, 10)
        assert time.monotonic() - started < 5
    finally:
        again.stop()
        pub.stop()


def test_a_refused_publish_is_reported_with_its_reason(tmp_path, uid):
    port = free_port()
    d = tmp_path / "acl"
    d.mkdir()
    (d / "acl").write_text("topic write allowed/#\n")
    conf = d / "m.conf"
    import pwd  # Mosquitto started as root would drop to a user who cannot read tmp_path
    me = pwd.getpwuid(os.geteuid()).pw_name
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {d}/acl\n"
                    f"user {me}\n")
    import subprocess

    from cityctl.localservices import find_binary, wait_for_port

    proc = subprocess.Popen([find_binary("mosquitto"), "-c", str(conf)],
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        seen: list[tuple[list[int], dict[int, int]]] = []
        c = Client(MqttUrl("127.0.0.1", port), f"ref-{uid}")
        c.on_published = lambda mids: seen.append((mids, dict(c.refused_publishes)))
        c.start()
        assert c.wait_connected(5)
        ok = c.publish("allowed/x", b"1", qos=1)
        bad = c.publish("denied/x", b"2", qos=1)
        assert c.flush(5)
        acked = {m for mids, _ in seen for m in mids}
        refused = {k: v for _, r in seen for k, v in r.items()}
        assert {ok, bad} <= acked and refused == {bad: 0x87}
        c.stop()
    finally:
        proc.terminate()
        proc.wait(5)


# ------------------------------------------------------------------ several broker nodes

def test_a_cluster_url_connects_to_the_first_node_that_answers_and_fails_over(tmp_path, uid):
    """Two brokers as the nodes of ``mqtt://a,b``: the first is down at the start, so the
    client takes the second; the second killed, it goes back to the first (restarted), its
    subscriptions and what it published meanwhile with it."""
    a, b = Mosquitto(tmp_path / "a", free_port()), Mosquitto(tmp_path / "b", free_port())
    b.start()
    url = f"mqtt://127.0.0.1:{a.port},127.0.0.1:{b.port}"
    inbox = Inbox()
    sub = client(url, f"sub-{uid}", MQTT311, inbox, subscriptions=[(f"{uid}/f", 1)],
                 reconnect_min_s=0.05, reconnect_max_s=0.2).start()
    pub = client(url, f"pub-{uid}", MQTT311, reconnect_min_s=0.05,
                 reconnect_max_s=0.2).start()
    try:
        assert sub.subscribed.wait(10) and pub.wait_connected(10)
        assert sub.node == pub.node == f"127.0.0.1:{b.port}"
        pub.publish(f"{uid}/f", b"on b", qos=1)
        wait_until(lambda: b"on b" in inbox.payloads(), 5)
        a.start()
        b.kill()
        # Failing over takes ~0.05 s, quicker than a poll can see ``connected`` cleared: wait
        # for the count. (``subscribed`` is cleared before ``node`` moves on.)
        wait_until(lambda: pub.stats["failovers"] >= 1, 10)
        pub.publish(f"{uid}/f", b"while failing over", qos=1, retain=True)
        on_a = f"127.0.0.1:{a.port}"
        wait_until(lambda: sub.node == on_a and sub.subscribed.is_set() and pub.node == on_a
                   and pub.connected.is_set(), 10)
        # Retained: the two brokers share nothing, so the subscriber may subscribe on the
        # new node after the publish arrives there; it gets the message either way.
        assert pub.flush(10)
        wait_until(lambda: b"while failing over" in inbox.payloads(), 10)
        assert pub.stats["failovers"] >= 1 and sub.stats["failovers"] >= 1
    finally:
        sub.stop()
        pub.stop()
        a.stop()
        b.stop()


def test_every_node_down_backs_off_once_per_round(uid):
    ports = [free_port(), free_port(), free_port()]  # nothing listens on any
    c = Client(MqttUrl.parse(",".join(f"mqtt://127.0.0.1:{p}" if i == 0 else f"127.0.0.1:{p}"
                                      for i, p in enumerate(ports))),
               f"none-{uid}", reconnect_min_s=0.05, reconnect_max_s=0.4)
    tried = []
    for _ in range(6):
        tried.append(c.node)
        assert c.loop(0.1) is False
    assert tried == [f"127.0.0.1:{p}" for p in ports] * 2  # each node in turn
    assert c._delay == 0.2  # doubled after each round of three, not after every try


def test_tls_checks_the_host_of_the_node_that_answers(tls_broker, uid):  # noqa: F811
    d, tls, _ = tls_broker
    dead = free_port()
    url = Settings(mqtt_url=f"mqtts://127.0.0.1:{dead},localhost:{tls}",
                   mqtt_ca=str(d / "ca.pem")).mqtt
    c = Client(url, f"tls-fo-{uid}", reconnect_min_s=0.01).start()
    try:
        assert c.wait_connected(10) and c.node == f"localhost:{tls}"
    finally:
        c.stop()


def test_paho_clients_go_to_the_next_node_too(tmp_path, uid):
    from citygrid import mqtt

    a, b = Mosquitto(tmp_path / "a", free_port()), Mosquitto(tmp_path / "b", free_port())
    b.start()
    url = MqttUrl.parse(f"mqtt://127.0.0.1:{a.port},127.0.0.1:{b.port}")
    c = mqtt.make_client(url, f"paho-{uid}")
    c.reconnect_delay_set(0, 1)
    try:
        mqtt.connect(c, url)  # a is down: b answers
        c.loop_start()
        wait_until(c.is_connected, 5)
        assert c.port == b.port
        a.start()
        b.kill()
        wait_until(lambda: c.is_connected() and c.port == a.port, 15)
    finally:
        c.loop_stop()
        a.stop()
        b.stop()


def test_the_shared_subscription_probe_passes_on_a_broker_that_shares(mosquitto, uid):
    from citygrid.wire import probe_shared

    for protocol in (MQTT5, MQTT311):
        probe_shared(MqttUrl.parse(mosquitto.url), f"g-{uid}", f"probe-{uid}",
                     protocol=protocol, timeout_s=5)  # raises if nothing came through
