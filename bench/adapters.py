"""Adapters benchmark: real Mosquitto + `citygrid adapters run` as its own process.

Measures, in one run, at a fixed offered rate (default 2,000 messages/s):
1. the baseline: a contract reading published straight to ``city/v1/…/telemetry`` and
   received by a subscriber (QoS 1 both ways) — publish→receive latency p50/p99;
2. the adapters: a Tasmota SENSOR message (profile ``tasmota-energy``, 1,000 registered
   plugs) published natively, translated by the service and received as a contract reading —
   the same latency, so the latency the adapters add is (2) − (1);
3. the adapters' CPU per message: the service process's CPU time (user + system, psutil)
   over the measured window, divided by the messages it translated.

Baseline and adapters runs alternate (``--repeat`` pairs); each message carries its number in
``power_w`` so the receiver matches it to its send time (``time.time_ns`` in both processes,
one machine). Every message must arrive exactly once.

Usage: .venv/bin/python bench/adapters.py [--rate 2000] [--seconds 15] [--repeat 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Mosquitto  # noqa: E402
from citygrid import mqtt  # noqa: E402
from citygrid.fleet import FleetDevice  # noqa: E402
from citygrid.registry import Registry  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402

DEVICES = 1000
TZ = ZoneInfo("Europe/Copenhagen")  # the shipped tasmota-energy profile's device time zone
WARMUP_S = 2.0


def native(i: int, now: float) -> tuple[str, bytes]:
    local = datetime.fromtimestamp(now, TZ).strftime("%Y-%m-%dT%H:%M:%S")
    return (f"tele/plug-{i % DEVICES:05d}/SENSOR",
            orjson.dumps({"Time": local, "ENERGY": {"Total": 12.5 + i / 1000, "Power": i,
                                                    "Voltage": 230, "Current": 0.1}}))


def direct(i: int, now: float) -> tuple[str, bytes]:
    return (f"city/v1/bench/meter/m-{i % DEVICES:05d}/telemetry",
            orjson.dumps({"ts": int(now * 1000), "seq": i, "energy_kwh": 12.5 + i / 1000,
                          "power_w": i, "voltage_v": 230}))


def publish(url: str, kind: str, rate: float, count: int, out) -> None:
    """Publish ``count`` messages at ``rate``/s (QoS 1); put their send times (ns) on ``out``."""
    make = native if kind == "adapters" else direct
    u = MqttUrl.parse(url)
    client = mqtt.make_client(u, f"bench-pub-{kind}-{os.getpid()}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    mqtt.connect(client, u)
    client.loop_start()
    sent = [0] * count
    started = time.monotonic()
    info = None
    for i in range(count):
        ahead = started + i / rate - time.monotonic()
        if ahead > 0.0005:
            time.sleep(ahead)
        now = time.time()
        topic, payload = make(i, now)
        sent[i] = time.time_ns()
        info = client.publish(topic, payload, qos=1)
    if info is not None:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()
    out.put(sent)


class Receiver:
    """Contract readings, their arrival times by message number (power_w)."""

    def __init__(self, url: str):
        u = MqttUrl.parse(url)
        self.arrived: dict[int, int] = {}
        self.duplicates = 0
        self.client = mqtt.make_client(u, f"bench-rx-{os.getpid()}")
        self.client.on_message = self._on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.on_connect = lambda c, *a: c.subscribe("city/v1/+/meter/+/telemetry", qos=1)
        mqtt.connect(self.client, u)
        self.client.loop_start()
        assert done.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        at = time.time_ns()
        i = int(orjson.loads(message.payload)["power_w"])
        if i in self.arrived:
            self.duplicates += 1
        else:
            self.arrived[i] = at

    def reset(self) -> None:
        self.arrived, self.duplicates = {}, 0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def start_adapters(url: str, data: Path, log_path: Path, protocol: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115
    env = {**os.environ, "CITYGRID_MQTT_PROTOCOL": protocol}
    process = subprocess.Popen(
        [sys.executable, "-m", "cityctl", "adapters", "run", "--mqtt-url", url, "--data-dir",
         str(data), "--client-id", "bench-adapters", "--report-interval", "5"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # subscribed: the service remembers its filters
        try:
            db = sqlite3.connect(f"file:{data / 'adapters.sqlite'}?mode=ro", uri=True)
            rows = db.execute("SELECT filter FROM subscriptions").fetchall()
            db.close()
            if ("tele/+/SENSOR",) in rows:
                return process
        except sqlite3.Error:
            pass
        if process.poll() is not None:
            raise SystemExit(f"citygrid adapters run exited: see {log_path}")
        time.sleep(0.1)
    raise SystemExit(f"citygrid adapters run did not subscribe in 30 s: see {log_path}")


def run(url: str, kind: str, rate: float, seconds: float, receiver: Receiver,
        adapters: psutil.Process | None) -> dict:
    count = int(rate * (seconds + WARMUP_S))
    warm = int(rate * WARMUP_S)
    receiver.reset()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    process = ctx.Process(target=publish, args=(url, kind, rate, count, out))
    process.start()
    cpu0 = None
    time.sleep(WARMUP_S)
    if adapters is not None:
        t = adapters.cpu_times()
        cpu0 = (t.user + t.system, len(receiver.arrived))
    sent = out.get(timeout=seconds + 120)
    process.join(30)
    deadline = time.monotonic() + 30
    while len(receiver.arrived) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    result: dict = {"kind": kind, "offered_per_s": rate, "messages": count,
                    "received": len(receiver.arrived), "duplicates": receiver.duplicates}
    if adapters is not None and cpu0 is not None:
        t = adapters.cpu_times()
        translated = len(receiver.arrived) - cpu0[1]
        result["cpu_us_per_message"] = round((t.user + t.system - cpu0[0]) * 1e6
                                             / max(1, translated), 1)
    lat = [(receiver.arrived[i] - sent[i]) / 1e6 for i in range(warm, count)
           if i in receiver.arrived]
    elapsed = (sent[-1] - sent[warm]) / 1e9
    result.update(achieved_per_s=round((count - warm) / elapsed) if elapsed > 0 else None,
                  p50_ms=round(quantile(lat, 0.5), 2), p99_ms=round(quantile(lat, 0.99), 2),
                  max_ms=round(max(lat), 2))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--protocol", default="5", choices=("5", "3.1.1"),
                    help="the adapters' MQTT protocol (CITYGRID_MQTT_PROTOCOL; default 5)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        tmp_path = Path(tmp)
        broker = Mosquitto(tmp_path / "mosquitto")
        broker.start()
        data = tmp_path / "data"
        registry = Registry(data)
        registry.upsert_many(
            FleetDevice(f"m-{n:05d}", "meter", "bench", 55.66, 12.5, account_id="a",
                        tariff="t", device_profile="tasmota-energy", native_id=f"plug-{n:05d}")
            for n in range(DEVICES))
        registry.close()
        service = start_adapters(broker.url, data, tmp_path / "adapters.log", args.protocol)
        proc = psutil.Process(service.pid)
        receiver = Receiver(broker.url)
        results = []
        try:
            for r in range(args.repeat):
                for kind in ("baseline", "adapters"):
                    res = run(broker.url, kind, args.rate, args.seconds, receiver,
                              proc if kind == "adapters" else None)
                    res["round"] = r + 1
                    results.append(res)
                    print(json.dumps(res), flush=True)
            rss_mb = round(proc.memory_info().rss / 2**20)
        finally:
            receiver.close()
            service.terminate()
            service.wait(30)
            broker.stop()
        print((tmp_path / "adapters.log").read_text()[-1500:])
    base = [r for r in results if r["kind"] == "baseline"]
    adp = [r for r in results if r["kind"] == "adapters"]
    lost = sum(r["messages"] - r["received"] for r in results)
    summary = {
        "rate": args.rate, "seconds": args.seconds, "repeat": args.repeat,
        "protocol": args.protocol,
        "lost": lost, "duplicates": sum(r["duplicates"] for r in results),
        "baseline_p50_ms": statistics.median(r["p50_ms"] for r in base),
        "baseline_p99_ms": statistics.median(r["p99_ms"] for r in base),
        "adapters_p50_ms": statistics.median(r["p50_ms"] for r in adp),
        "adapters_p99_ms": statistics.median(r["p99_ms"] for r in adp),
        "cpu_us_per_message": statistics.median(r["cpu_us_per_message"] for r in adp),
        "adapters_rss_mb": rss_mb,
    }
    summary["added_p50_ms"] = round(summary["adapters_p50_ms"] - summary["baseline_p50_ms"], 2)
    summary["added_p99_ms"] = round(summary["adapters_p99_ms"] - summary["baseline_p99_ms"], 2)
    print(json.dumps(summary, indent=1))
    print(f"CPU per message: {summary['cpu_us_per_message']} µs (target ≤ 30): "
          f"{'met' if summary['cpu_us_per_message'] <= 30 else 'NOT met'}")
    print(f"added latency p50 {summary['added_p50_ms']} ms, p99 {summary['added_p99_ms']} ms "
          f"(target p99 ≤ 5 ms): {'met' if summary['added_p99_ms'] <= 5 else 'NOT met'}")
    print("command: .venv/bin/python bench/adapters.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
