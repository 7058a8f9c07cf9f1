"""Ingest benchmark: real Mosquitto + real InfluxDB + `citygrid ingest` on this machine.

Measures, in one run:
1. the ceiling of a Python consumer: one bare paho subscriber (persistent session, QoS 1,
   json.loads per message) draining a queued backlog;
2. `citygrid ingest` draining the same backlog into InfluxDB (ratio to 1.);
3. the sustained rate with zero loss: offered load in steps, each reading stored exactly once,
   the backlog not growing; reading→stored latency p50/p99 from ingest's own lag figures;
4. p50/p99 reading→stored at half the sustained maximum;
5. ingest's peak RSS (VmHWM).

Usage: .venv/bin/python bench/ingest.py [--backlog 100000] [--steps 4000,8000,...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Influxd, Mosquitto  # noqa: E402
from citygrid import mqtt  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402
from citygrid.store.influx import InfluxStore  # noqa: E402

DEVICES = 10_000


def reading(i: int, ts_ms: int) -> tuple[str, bytes]:
    """Reading i: device i % DEVICES, its (i // DEVICES)-th reading.

    Publishers take disjoint device ranges (see publish), so no two readings of one
    device can share a timestamp and overwrite each other.
    """
    device = i % DEVICES
    topic = f"city/v1/d{device % 12}/streetlight/sl-{device:05d}/telemetry"
    payload = orjson.dumps({"ts": ts_ms, "seq": i // DEVICES, "brightness_pct": 40.0,
                            "power_w": 24.5, "energy_wh": 1520.5 + i, "lux": 3.2,
                            "motion": i % 7 == 0})
    return topic, payload


# --------------------------------------------------------------------------- load


def publish(url: str, part: int, parts: int, count: int, rate: float | None,
            ts_base: int | None, client_id: str) -> float:
    """Publish `count` readings at QoS 1 from devices ≡ part (mod parts); rate None = flat out.

    ts = wall-clock ms at publish when ts_base is None (latency), else ts_base + i (backlog).
    Returns the seconds it took.
    """
    u = MqttUrl.parse(url)
    client = mqtt.make_client(u, client_id)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    mqtt.connect(client, u)
    client.loop_start()
    started = time.monotonic()
    info = None
    for k in range(count):
        i = part + k * parts
        if rate:
            ahead = started + k / rate - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)
        ts = int(time.time() * 1000) if ts_base is None else ts_base + i
        topic, payload = reading(i, ts)
        while True:
            info = client.publish(topic, payload, qos=1)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                break
            time.sleep(0.001)  # paho's 16-bit message ids: wait for acks
    if info is not None:
        info.wait_for_publish(120)
    elapsed = time.monotonic() - started
    client.loop_stop()
    client.disconnect()
    return elapsed


def publish_parallel(url: str, count: int, rate: float | None, ts_base: int | None,
                     procs: int = 2) -> float:
    """Several publisher processes: one Python publisher cannot offer more than ~15k/s."""
    assert count % procs == 0 and DEVICES % procs == 0
    with mp.get_context("spawn").Pool(procs) as pool:
        results = [pool.apply_async(publish, (url, p, procs, count // procs,
                                              rate / procs if rate else None, ts_base,
                                              f"bench-pub-{os.getpid()}-{p}"))
                   for p in range(procs)]
        return max(r.get() for r in results)


def create_session(url: str, client_id: str, topic: str) -> None:
    """Subscribe once with a persistent session, so the backlog queues for this client."""
    u = MqttUrl.parse(url)
    client = mqtt.make_client(u, client_id)
    done = []
    client.on_subscribe = lambda *a: done.append(1)
    mqtt.connect(client, u, clean_start=False, session_expiry_s=3600)
    client.loop_start()
    client.subscribe(topic, qos=1)
    while not done:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()


def discard_session(url: str, client_id: str) -> None:
    """End a persistent session: an idle one would queue every later message of the run."""
    u = MqttUrl.parse(url)
    client = mqtt.make_client(u, client_id)
    mqtt.connect(client, u, clean_start=True, session_expiry_s=0)
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


# --------------------------------------------------------------------------- consumers


def backlog_base_ms(n: int) -> int:
    """A backlog's first timestamp: an hour back, a millisecond apart — inside the raw
    retention (InfluxDB refuses points older than it) and never ahead of the clock."""
    return int(time.time() * 1000) - 3_600_000 - n


def bare_paho_drain(url: str, n: int, broker_pid: int) -> float:
    """The ceiling: a bare paho subscriber, persistent session, json.loads each message."""
    client_id = "bench-bare"
    topic = "city/v1/+/+/+/telemetry"
    create_session(url, client_id, topic)
    publish_parallel(url, n, None, backlog_base_ms(n))
    u = MqttUrl.parse(url)
    client = mqtt.make_client(u, client_id)
    got = [0]
    finished = [0.0]

    def on_message(c, userdata, message):
        json.loads(message.payload)
        got[0] += 1
        if got[0] == n:
            finished[0] = time.monotonic()

    client.on_message = on_message
    with CpuMeter(broker=broker_pid, subscriber=os.getpid()) as cpu:
        started = time.monotonic()
        mqtt.connect(client, u, clean_start=False, session_expiry_s=3600, receive_maximum=65535)
        client.loop_start()
        while got[0] < n:
            time.sleep(0.01)
            if time.monotonic() - started > 300:
                raise TimeoutError(f"bare subscriber got {got[0]} of {n}")
    client.disconnect()
    client.loop_stop()
    discard_session(url, client_id)
    print(f"  bare drain CPU: {cpu}")
    return n / (finished[0] - started)


class IngestProcess:
    def __init__(self, mqtt_url: str, influx: InfluxStore, data_dir: Path, client_id: str,
                 report_interval: float = 1.0):
        self.log_path = data_dir / f"{client_id}.log"
        self.argv = [sys.executable, "-m", "cityctl", "ingest", "--mqtt-url", mqtt_url,
                     "--influx-url", influx.url, "--influx-db", influx.database,
                     "--data-dir", str(data_dir), "--client-id", client_id,
                     "--report-interval", str(report_interval)]
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start; return the monotonic time its session was resumed (CONNACK)."""
        self.log_path.write_text("")
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        while "connected to" not in self.log_path.read_text():
            if self.process.poll() is not None:
                raise RuntimeError(self.log_path.read_text())
            time.sleep(0.005)
        return time.monotonic()

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by named processes between start() and stop()."""

    def __init__(self, **pids: int):
        self.pids = pids

    def __enter__(self):
        self.before = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.started
        self.used = {k: cpu_seconds(p) - self.before[k] for k, p in self.pids.items()}

    def __str__(self) -> str:
        return ", ".join(f"{k} {v / self.wall:.0%}" for k, v in self.used.items())


def wait_count(store: InfluxStore, target: int, timeout_s: float = 300) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.count("streetlight") >= target:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"stored {store.count('streetlight')} of {target}")


def ingest_drain(url: str, store: InfluxStore, data: Path, n: int, broker_pid: int,
                 influxd_pid: int) -> tuple[float, float]:
    ingest = IngestProcess(url, store, data, "bench-ingest-drain")
    create_session(url, "bench-ingest-drain", "city/v1/+/+/+/telemetry")
    publish_parallel(url, n, None, backlog_base_ms(n))
    started = ingest.start()
    assert ingest.process is not None
    try:
        with CpuMeter(broker=broker_pid, influxd=influxd_pid,
                      ingest=ingest.process.pid) as cpu:
            done = wait_count(store, n)
        print(f"  ingest drain CPU: {cpu}; ingest {cpu.used['ingest'] / n * 1e6:.1f} µs of "
              f"CPU a reading, InfluxDB {cpu.used['influxd'] / n * 1e6:.1f}, Mosquitto "
              f"{cpu.used['broker'] / n * 1e6:.1f}")
        rss = ingest.peak_rss_mb()
    finally:
        ingest.stop()  # a failed run leaves no ingest behind
    discard_session(url, "bench-ingest-drain")
    return n / (done - started), rss, cpu.used["ingest"] / n * 1e6


def sustained(url: str, influx: Influxd, data: Path, steps: list[int], seconds: float):
    results = []
    for rate in steps:
        store = InfluxStore(influx.url, f"bench_rate_{rate}")
        store.drop()
        store.ensure_ready()
        client_id = f"bench-ingest-{rate}-{time.monotonic_ns()}"
        ingest = IngestProcess(url, store, data, client_id)
        ingest.start()
        n = int(rate * seconds)
        t0_ms = int(time.time() * 1000)
        cpu0 = ingest.cpu_seconds()
        took = publish_parallel(url, n, rate, None)
        published_at = time.monotonic()
        try:
            catch_up_s = round(wait_count(store, n, timeout_s=30) - published_at, 2)
        except TimeoutError:
            catch_up_s = None
        stored = store.count("streetlight")
        time.sleep(1.5)  # let the last self-report land
        cpu = ingest.cpu_seconds() - cpu0
        rss = ingest.peak_rss_mb()
        ingest.stop()
        discard_session(url, client_id)
        reports = store.query(
            f"SELECT lag_p50_ms, lag_p99_ms, readings_per_s FROM citygrid_ingest "
            f"WHERE time >= {t0_ms}ms AND readings_per_s > 0")
        rows = reports[0]["values"] if reports else []
        p50 = statistics.median(r[1] for r in rows) if rows else float("nan")
        p99 = max(r[2] for r in rows) if rows else float("nan")
        # Stored is a count of distinct points (identity = device + timestamp): more than
        # published would be points from nowhere, fewer is loss.
        result = {"offered_per_s": rate, "achieved_offer_per_s": round(n / took),
                  "stored": stored, "published": n, "lost": max(n - stored, 0),
                  "unexpected_extra": max(stored - n, 0), "lag_p50_ms": p50, "lag_p99_ms": p99,
                  "catch_up_after_last_publish_s": catch_up_s,
                  "ingest_cpu_s_per_1k": round(cpu / n * 1000, 4), "ingest_rss_mb": rss}
        print(f"  offered {rate:>6}/s (achieved {result['achieved_offer_per_s']:>6}/s): "
              f"stored {stored}/{n}, lag p50 {p50:.0f} ms p99 {p99:.0f} ms, "
              f"ingest {cpu / took * 100:.0f}% CPU, RSS {rss:.0f} MB", flush=True)
        results.append(result)
        store.drop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--steps", default="2000,4000,6000,8000,10000,12000")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=3, help="backlog drains per consumer")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--drain-only", action="store_true", help="only the backlog drains")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="citygrid-bench-") as tmp:
        tmp = Path(tmp)
        broker = Mosquitto(tmp / "mosquitto")
        influx = Influxd(tmp / "influx")
        broker.start()
        influx.start()
        try:
            bare, drains, rss, cpu_us = [], [], [], []
            for r in range(args.repeat):
                bare.append(bare_paho_drain(broker.url, args.backlog, broker.process.pid))
                store = InfluxStore(influx.url, f"bench_drain_{r}")
                store.ensure_ready()
                rate, peak, us = ingest_drain(broker.url, store, tmp, args.backlog,
                                              broker.process.pid, influx.process.pid)
                drains.append(rate)
                cpu_us.append(us)
                rss.append(peak)
                store.drop()
                print(f"drain {r + 1}: bare paho {bare[-1]:,.0f}/s, citygrid ingest "
                      f"{rate:,.0f}/s (ratio {rate / bare[-1]:.2f}), ingest peak RSS "
                      f"{peak:.0f} MB", flush=True)
            ratios = [d / b for d, b in zip(drains, bare, strict=True)]
            print(f"backlog of {args.backlog:,}: bare paho median {statistics.median(bare):,.0f}"
                  f"/s, ingest median {statistics.median(drains):,.0f}/s, "
                  f"ratio median {statistics.median(ratios):.2f} (target ≥ 1.3); ingest "
                  f"CPU a reading median {statistics.median(cpu_us):.1f} µs (target ≤ 0.35 × "
                  "Node-RED's 42 = 14.7)")
            if args.drain_only:
                return
            print("sustained (offered load steps):")
            steps = [int(s) for s in args.steps.split(",")]
            rates = sustained(broker.url, influx, tmp, steps, args.seconds)
            ok = [r for r in rates if r["lost"] == 0 and r["unexpected_extra"] == 0
                  and r["lag_p99_ms"] < 5000 and r["catch_up_after_last_publish_s"] is not None
                  and r["catch_up_after_last_publish_s"] <= 2.0
                  and r["achieved_offer_per_s"] >= 0.95 * r["offered_per_s"]]
            best = max((r["offered_per_s"] for r in ok), default=0)
            print(f"sustained maximum with zero loss: {best:,}/s")
            half = None
            if best:
                half_rate = best // 2
                print(f"at half of it ({half_rate:,}/s):")
                half = sustained(broker.url, influx, tmp, [half_rate], args.seconds)[0]
                print(f"  p99 reading→stored {half['lag_p99_ms']:.0f} ms (target ≤ 1000)")
            results = {
                "backlog": args.backlog,
                "bare_paho_drain_per_s": bare, "ingest_drain_per_s": drains,
                "ratio_median": statistics.median(ratios),
                "ingest_cpu_us_per_reading": cpu_us,
                "ingest_peak_rss_mb": max(rss + [r["ingest_rss_mb"] for r in rates]),
                "steps": rates, "sustained_max_per_s": best, "half_load": half,
            }
            print(f"ingest peak RSS over the run: {results['ingest_peak_rss_mb']:.0f} MB "
                  "(target ≤ 200)")
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2))
        finally:
            broker.stop()
            influx.stop()


if __name__ == "__main__":
    main()
