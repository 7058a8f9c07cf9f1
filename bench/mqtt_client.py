"""MQTT clients side by side: paho-mqtt, CityGrid's citygrid.wire, and a bare socket loop on
the ``mqtt5`` codec, in one run against a private Mosquitto.

1. ``--codec``: the CPU of framing PUBLISH packets out of one buffer, ``mqtt5.read`` per
   packet vs citygrid.wire's Python framing (no broker).
2. Backlog drain: a persistent session with N queued QoS 1 messages, each payload
   ``orjson.loads``-ed; each consumer drains its own backlog, consumers alternating, and the
   figures are medians over ``--repeat`` rounds: messages/s and the consumer's CPU µs a
   message (process CPU time over the drain).
3. Publish: N QoS 1 publishes, until every PUBACK is in: messages/s and CPU µs a message.

    .venv/bin/python bench/mqtt_client.py [--messages 100000] [--repeat 3] [--codec]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mqtt5
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Mosquitto  # noqa: E402
from citygrid import mqtt  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402
from citygrid.wire import Client, encode_publish, frame  # noqa: E402

TOPIC = "city/v1/d{d}/streetlight/sl-{i:05d}/telemetry"
PAYLOAD = orjson.dumps({"ts": 1764600000000, "seq": 1, "brightness_pct": 30.0, "power_w": 16.7,
                        "energy_wh": 1.0, "lux": 0.5, "motion": False})


def codec(n: int) -> None:
    buf = b"".join(encode_publish(TOPIC.format(d=i % 12, i=i % 10_000), PAYLOAD, 1, False,
                                  i % 65535 + 1) for i in range(n))

    def with_mqtt5() -> int:
        mv, off, got = memoryview(buf), 0, 0
        while off < len(buf):
            p, k = mqtt5.read(mv[off:])
            off += k
            got += len(p.payload) > 0
        return got

    def with_wire() -> int:
        packets, _ = frame(buf)
        got = 0
        for _first, i, end in packets:
            tl = (buf[i] << 8) | buf[i + 1]
            topic = buf[i + 2:i + 2 + tl].decode()
            j = i + 2 + tl + 2
            j += 1 + buf[j]
            got += len(buf[j:end]) > 0 and bool(topic)
        return got

    times: dict[str, list[float]] = {"mqtt5.read": [], "citygrid.wire frame": []}
    for _ in range(5):
        for name, fn in (("mqtt5.read", with_mqtt5), ("citygrid.wire frame", with_wire)):
            t = time.process_time()
            assert fn() == n
            times[name].append((time.process_time() - t) / n * 1e6)
    for name, v in times.items():
        print(f"codec {name}: {statistics.median(v):.2f} µs CPU a PUBLISH (median of 5)")


def fill(url: MqttUrl, client_id: str, n: int) -> None:
    """A persistent session for ``client_id`` holding n QoS 1 messages."""
    c = Client(url, client_id, clean_start=False, session_expiry_s=3600,
               subscriptions=[("city/v1/+/+/+/telemetry", 1)]).start()
    assert c.subscribed.wait(10)
    c.stop()
    pub = Client(url, "bench-filler").start()
    assert pub.wait_connected(10)
    for i in range(n):
        pub.publish(TOPIC.format(d=i % 12, i=i % 10_000), PAYLOAD, 1)
        if pub.inflight > 20_000:
            time.sleep(0.001)
    assert pub.flush(120)
    pub.stop()


def drain_paho(url: MqttUrl, client_id: str, n: int) -> tuple[float, float]:
    client = mqtt.make_client(url, client_id)
    got = [0]
    done = threading.Event()

    def on_message(c, userdata, message):
        orjson.loads(message.payload)
        got[0] += 1
        if got[0] == n:
            done.set()

    client.on_message = on_message
    cpu, t = time.process_time(), time.monotonic()
    mqtt.connect(client, url, clean_start=False, session_expiry_s=3600, receive_maximum=65535)
    client.loop_start()
    assert done.wait(300), got
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return n / wall, cpu / n * 1e6


def drain_wire(url: MqttUrl, client_id: str, n: int) -> tuple[float, float]:
    got = [0]
    done = threading.Event()
    client: Client

    def on_messages(messages):
        loads = orjson.loads
        for m in messages:
            loads(m.payload)
        client.ack([m.mid for m in messages], messages[0].epoch)
        got[0] += len(messages)
        if got[0] >= n:
            done.set()

    client = Client(url, client_id, clean_start=False, session_expiry_s=3600,
                    receive_maximum=65535, on_messages=on_messages,
                    subscriptions=[("city/v1/+/+/+/telemetry", 1)])
    cpu, t = time.process_time(), time.monotonic()
    client.start()
    assert done.wait(300), got
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    client.stop()
    return n / wall, cpu / n * 1e6


def drain_mqtt5(url: MqttUrl, client_id: str, n: int) -> tuple[float, float]:
    """The bare loop of the field notes: mqtt5.read per packet, PUBACKs once per recv."""
    cpu, t = time.process_time(), time.monotonic()
    sock = socket.create_connection((url.host, url.port))
    sock.sendall(mqtt5.ConnectPacket(client_id, clean_start=False, session_expiry_interval=3600,
                                     receive_max=65535).write())
    buf, got = b"", 0
    while got < n:
        select.select([sock], [], [], 5)
        buf += sock.recv(1 << 20)
        mv, off, acks = memoryview(buf), 0, []
        while True:
            try:
                p, k = mqtt5.read(mv[off:])
            except Exception:  # an incomplete packet: wait for the rest
                break
            off += k
            if isinstance(p, mqtt5.PublishPacket):
                orjson.loads(p.payload)
                got += 1
                if p.packet_id:
                    acks.append(mqtt5.PubAckPacket(p.packet_id).write())
        del mv
        buf = buf[off:]
        if acks:
            sock.sendall(b"".join(acks))
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    sock.sendall(b"\xe0\x00")
    sock.close()
    return n / wall, cpu / n * 1e6


def publish_paho(url: MqttUrl, n: int) -> tuple[float, float]:
    client = mqtt.make_client(url, "bench-pub-paho")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    mqtt.connect(client, url)
    client.loop_start()
    time.sleep(0.2)
    cpu, t = time.process_time(), time.monotonic()
    for k in range(0, n, 20_000):  # paho's 16-bit message ids: at most 65,535 outstanding
        infos = [client.publish(TOPIC.format(d=i % 12, i=i % 10_000), PAYLOAD, qos=1)
                 for i in range(k, min(n, k + 20_000))]
        for info in infos:
            info.wait_for_publish(60)
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return n / wall, cpu / n * 1e6


def publish_wire(url: MqttUrl, n: int) -> tuple[float, float]:
    client = Client(url, "bench-pub-wire").start()
    assert client.wait_connected(10)
    cpu, t = time.process_time(), time.monotonic()
    for k in range(0, n, 500):  # a load generator's tick: one write for 500 publishes
        with client.corked():
            for i in range(k, min(n, k + 500)):
                client.publish(TOPIC.format(d=i % 12, i=i % 10_000), PAYLOAD, 1)
    assert client.flush(120)
    wall, cpu = time.monotonic() - t, time.process_time() - cpu
    client.stop()
    return n / wall, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--codec", action="store_true", help="only the framing micro-benchmark")
    args = ap.parse_args()
    codec(20_000)
    if args.codec:
        return
    n = args.messages
    with tempfile.TemporaryDirectory(prefix="citygrid-bench-mqtt-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        url = MqttUrl.parse(broker.url)
        try:
            drains: dict[str, list[tuple[float, float]]] = {"paho": [], "citygrid.wire": [],
                                                             "bare mqtt5 loop": []}
            pubs: dict[str, list[tuple[float, float]]] = {"paho": [], "citygrid.wire": []}
            for r in range(args.repeat):
                for name, fn in (("paho", drain_paho), ("citygrid.wire", drain_wire),
                                 ("bare mqtt5 loop", drain_mqtt5)):
                    cid = f"bench-{name.split()[0]}-{r}"
                    fill(url, cid, n)
                    rate, us = fn(url, cid, n)
                    drains[name].append((rate, us))
                    print(f"round {r + 1} drain {name}: {rate:,.0f}/s, {us:.1f} µs CPU a "
                          "message", flush=True)
                for name, fn in (("paho", publish_paho), ("citygrid.wire", publish_wire)):
                    rate, us = fn(url, n)
                    pubs[name].append((rate, us))
                    print(f"round {r + 1} publish {name}: {rate:,.0f}/s, {us:.1f} µs CPU a "
                          "message", flush=True)
            print(f"medians over {args.repeat} rounds, {n:,} QoS 1 messages each "
                  f"({os.cpu_count()} cores, Mosquitto on the same machine):")
            for what, table in (("drain", drains), ("publish", pubs)):
                for name, v in table.items():
                    print(f"  {what} {name}: {statistics.median(x[0] for x in v):,.0f}/s, "
                          f"{statistics.median(x[1] for x in v):.1f} µs CPU a message")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
