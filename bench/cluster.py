"""A 3-node broker cluster against one Mosquitto, in one run (docs/scale-out.md).

1. **Throughput**: QoS 1 messages from a publisher to a subscriber, both ``citygrid.wire``
   over MQTT 3.1.1 (what NATS speaks) — through one Mosquitto, and through the NATS cluster
   with the publisher on node 0 and the subscriber on node 2. Messages a second from the
   first publish to the last message received, and the broker's CPU-seconds per 1,000.
2. **Failover**: devices publish readings at a steady rate to node 0; ``citygrid ingest``
   (in this process, given every node, node 1 first) stores them in a real InfluxDB; node 1
   is killed with SIGKILL midway. Failover time is from the kill to the first reading stored
   that was *published after the kill* (it can only have come through another node), and
   to ingest's connection on another node; duplicates are the messages ingest received
   beyond the readings sent (the redelivery of what it had not acknowledged); stored is what
   InfluxDB holds (each reading once, or a loss).

Medians over ``--repeat`` rounds; each failover round restarts the killed node first.

    .venv/bin/python bench/cluster.py --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Influxd, Mosquitto  # noqa: E402
from cityctl.natscluster import NatsCluster  # noqa: E402
from citygrid import contract, wire  # noqa: E402
from citygrid.settings import MqttUrl, Settings  # noqa: E402
from citygrid.store.influx import InfluxStore  # noqa: E402
from ingest.service import IngestConfig, IngestService  # noqa: E402


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in ticks
    return total


def throughput(pub_url: str, sub_url: str, n: int, tag: str, pids: list[int]
               ) -> tuple[float, float]:
    """(messages/s, broker CPU-seconds per 1,000 messages)."""
    got = threading.Event()
    count = [0]

    def on_messages(messages: list[wire.Message]) -> None:
        count[0] += len(messages)
        sub.ack([m.mid for m in messages], messages[0].epoch)
        if count[0] >= n:
            got.set()

    topic = f"bench/{tag}"
    sub = wire.Client(MqttUrl.parse(sub_url), f"sub-{tag}", protocol=wire.MQTT311,
                      subscriptions=[(topic, 1)], on_messages=on_messages).start()
    pub = wire.Client(MqttUrl.parse(pub_url), f"pub-{tag}", protocol=wire.MQTT311,
                      max_inflight=1000).start()
    try:
        assert sub.subscribed.wait(20) and pub.wait_connected(20)
        payload = orjson.dumps({"ts": 0, "seq": 0, "brightness_pct": 40.0, "power_w": 24.5,
                                "energy_wh": 1520.5, "lux": 3.2, "motion": False})
        cpu0, t0 = cpu_s(pids), time.monotonic()
        for _ in range(n):
            pub.publish(topic, payload, qos=1)
        if not got.wait(300):
            raise RuntimeError(f"{tag}: {count[0]} of {n} messages arrived")
        elapsed, cpu = time.monotonic() - t0, cpu_s(pids) - cpu0
    finally:
        sub.stop()
        pub.stop()
    return n / elapsed, cpu / n * 1000


def failover(cluster: NatsCluster, influx_url: str, tmp: Path, rate: float, seconds: float,
             tag: str) -> dict:
    store = InfluxStore(influx_url, f"bench_{tag}")
    store.ensure_ready()
    settings = Settings(mqtt_url=cluster.cluster_url([1, 2, 0]), mqtt_protocol="3.1.1",
                        data_dir=str(tmp / tag))
    service = IngestService(settings, store, IngestConfig(
        client_id=f"ingest-{tag}", topic=f"city/v1/{tag}/+/+/telemetry", flush_interval_s=0.05,
        report_interval_s=3600))
    service.start(timeout_s=30)
    devices = wire.Client(MqttUrl.parse(cluster.url(0)), f"dev-{tag}", protocol=wire.MQTT311,
                          max_inflight=1000).start()
    assert devices.wait_connected(20)
    n = int(rate * seconds)
    t_base = int(time.time() * 1000) - 3_600_000
    stored_after_kill: list[float] = []
    reconnected: list[float] = []
    killed_at, kill_seq = None, n

    def newest() -> int:
        rows = store.query('SELECT max("seq") FROM "meter"')
        return int(rows[0]["values"][0][1]) if rows else -1
    try:
        started = time.monotonic()
        for i in range(n):
            ts = t_base + i
            devices.publish(str(contract.Topic(tag, "meter", f"m-{i % 100}")), orjson.dumps(
                {"ts": ts, "seq": i, "energy_kwh": 1.0 + i / 1000, "power_w": 400.0}), qos=1)
            if i == n // 2:
                cluster.kill(1)
                killed_at, kill_seq = time.monotonic(), i
            if killed_at is not None and i % 25 == 0:
                if not reconnected and service.metrics.mqtt_failovers:
                    reconnected.append(time.monotonic())
                if not stored_after_kill and newest() > kill_seq:
                    stored_after_kill.append(time.monotonic())
            ahead = started + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        assert devices.flush(60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            count = store.count("meter")
            if not stored_after_kill and newest() > kill_seq:
                stored_after_kill.append(time.monotonic())
            if count >= n:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        stored = store.count("meter")
    finally:
        devices.stop()
        service.stop()
    messages = service.metrics.messages
    store.drop()
    store.close()
    assert killed_at is not None
    return {"sent": n, "stored": stored, "received": messages,
            "duplicates": messages - n,
            "failover_s": (stored_after_kill[0] - killed_at) if stored_after_kill else None,
            "reconnect_s": (reconnected[0] - killed_at) if reconnected else None,
            "node_after": service.metrics.mqtt_node}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=500.0, help="readings/s in the failover")
    ap.add_argument("--seconds", type=float, default=20.0, help="failover run length")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mosquitto = Mosquitto(tmp / "mosquitto")
        cluster = NatsCluster(tmp / "nats")
        influxd = Influxd(tmp / "influxd")
        mosquitto.start()
        cluster.start()
        influxd.start()
        try:
            mosq, nats = [], []
            for r in range(args.repeat):
                for name in (("mosquitto", "nats") if r % 2 == 0 else ("nats", "mosquitto")):
                    if name == "mosquitto":
                        rate, cpu = throughput(mosquitto.url, mosquitto.url, args.messages,
                                               f"m{r}", [mosquitto.process.pid])
                        mosq.append((rate, cpu))
                    else:
                        pids = [n.process.pid for n in cluster.nodes]
                        rate, cpu = throughput(cluster.url(0), cluster.url(2), args.messages,
                                               f"n{r}", pids)
                        nats.append((rate, cpu))
                    print(f"  round {r + 1} {name}: {rate:,.0f} msg/s, {cpu:.3f} broker "
                          "CPU-s per 1,000", flush=True)
            rounds = []
            for r in range(args.repeat):
                if not cluster.running(1):
                    cluster.restart(1)
                    time.sleep(2.0)
                result = failover(cluster, influxd.url, tmp, args.rate, args.seconds, f"f{r}")
                rounds.append(result)
                print(f"  failover round {r + 1}: {result}", flush=True)
        finally:
            influxd.stop()
            cluster.stop()
            mosquitto.stop()

    def med(values):
        return statistics.median(values)

    print(f"\nthroughput, QoS 1, MQTT 3.1.1, {args.messages:,} messages, medians of "
          f"{args.repeat}:")
    print(f"  one Mosquitto:        {med([r for r, _ in mosq]):>8,.0f} msg/s, "
          f"{med([c for _, c in mosq]):.3f} broker CPU-s per 1,000")
    print(f"  NATS, 3 nodes (0→2):  {med([r for r, _ in nats]):>8,.0f} msg/s, "
          f"{med([c for _, c in nats]):.3f} broker CPU-s per 1,000 (all nodes)")
    print(f"  ratio NATS/Mosquitto: {med([r for r, _ in nats]) / med([r for r, _ in mosq]):.2f}")
    times = [r["failover_s"] for r in rounds if r["failover_s"] is not None]
    print(f"failover of ingest's node at {args.rate:.0f} readings/s, {args.repeat} rounds:")
    print(f"  kill → first reading published after it stored: median {med(times):.2f} s "
          f"(rounds {', '.join(f'{t:.2f}' for t in times)})")
    again = [r["reconnect_s"] for r in rounds if r["reconnect_s"] is not None]
    if again:
        print(f"  kill → ingest connected to another node: median {med(again):.2f} s "
              f"(rounds {', '.join(f'{t:.2f}' for t in again)})")
    print(f"  duplicates delivered: {', '.join(str(r['duplicates']) for r in rounds)}; "
          f"stored {', '.join(str(r['stored']) for r in rounds)} of "
          f"{', '.join(str(r['sent']) for r in rounds)}")


if __name__ == "__main__":
    main()
