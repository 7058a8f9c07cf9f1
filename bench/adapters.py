"""Adapters benchmark: real Mosquitto + `citygrid adapters run` as its own process.

Measures, in one run, at a fixed offered rate (default 2,000 messages/s):
1. the baseline: a contract reading published straight to ``city/v1/…/telemetry`` and
   received by a subscriber (QoS 1 both ways) — publish→receive latency p50/p99;
2. the adapters: a Tasmota SENSOR message (profile ``tasmota-energy``, 1,000 registered
   plugs) published natively, translated by the service and received as a contract reading —
   the same latency, so the latency the adapters add is (2) − (1);
3. the adapters' CPU per message: the service process's CPU time (user + system, psutil)
   over the measured window, divided by the messages it translated.

Baseline and adapters runs alternate (``--repeat`` rounds); each message carries its number
in ``power_w`` so the receiver matches it to its send time (``time.time_ns`` in both processes,
one machine). Every message must arrive exactly once. The bench's own publisher and receiver
are ``citygrid.wire`` clients (cheap: on a small machine a client's CPU is the service's
latency too).

``--before TREE`` also runs the service from another work tree (``git worktree add TREE
<commit>``), in the same rounds, against the same broker and harness, so the two compare under
the same load: each round runs the baseline, then each tree's service in turn (started for its
run, stopped after; the order alternates), and the summary gives both.

Usage: .venv/bin/python bench/adapters.py [--rate 2000] [--seconds 15] [--repeat 2]
       [--protocol 5|3.1.1] [--before /tmp/adapters-before] [--batch-window-ms MS] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Mosquitto  # noqa: E402
from citygrid import wire  # noqa: E402
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
    make = direct if kind == "baseline" else native
    client = wire.Client(MqttUrl.parse(url), f"bench-pub-{os.getpid()}").start()
    if not client.wait_connected(10):
        raise SystemExit(f"the bench's publisher could not connect: {client.last_error}")
    sent = [0] * count
    started = time.monotonic()
    for i in range(count):
        ahead = started + i / rate - time.monotonic()
        if ahead > 0.0005:
            time.sleep(ahead)
        now = time.time()
        topic, payload = make(i, now)
        sent[i] = time.time_ns()
        client.publish(topic, payload, qos=1)
    client.flush(60)
    client.stop()
    out.put(sent)


class Receiver:
    """Contract readings, their arrival times by message number (power_w)."""

    def __init__(self, url: str):
        self.arrived: dict[int, int] = {}
        self.duplicates = 0
        self.client = wire.Client(MqttUrl.parse(url), f"bench-rx-{os.getpid()}",
                                  subscriptions=[("city/v1/+/meter/+/telemetry", 1)],
                                  on_messages=self._on_messages).start()
        assert self.client.subscribed.wait(10)

    def _on_messages(self, messages: list[wire.Message]) -> None:
        at = time.time_ns()
        arrived = self.arrived
        for message in messages:
            i = int(orjson.loads(message.payload)["power_w"])
            if i in arrived:
                self.duplicates += 1
            else:
                arrived[i] = at
        self.client.ack([m.mid for m in messages if m.qos], messages[0].epoch)

    def reset(self) -> None:
        self.arrived, self.duplicates = {}, 0

    def close(self) -> None:
        self.client.stop()


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def start_adapters(tree: Path, url: str, data: Path, log_path: Path, protocol: str,
                   extra: list[str]) -> subprocess.Popen:
    """`citygrid adapters run` from the work tree ``tree``; returns once it has subscribed (it
    remembers its session's filters in adapters.sqlite: forgotten here first)."""
    db_path = data / "adapters.sqlite"
    if db_path.exists():
        db = sqlite3.connect(db_path)
        with contextlib.suppress(sqlite3.Error):
            db.execute("DELETE FROM subscriptions")
            db.commit()
        db.close()
    log = open(log_path, "ab")  # noqa: SIM115
    env = {**os.environ, "CITYGRID_MQTT_PROTOCOL": protocol, "PYTHONPATH": str(tree)}
    process = subprocess.Popen(
        [sys.executable, "-m", "cityctl", "adapters", "run", "--mqtt-url", url, "--data-dir",
         str(data), "--client-id", "bench-adapters", "--report-interval", "5", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=tree, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
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


def stop_adapters(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


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


def _summary(results: list[dict], label: str, base: list[dict]) -> dict:
    runs = [r for r in results if r["kind"] == label]
    out = {"p50_ms": statistics.median(r["p50_ms"] for r in runs),
           "p99_ms": statistics.median(r["p99_ms"] for r in runs),
           "cpu_us_per_message": statistics.median(r["cpu_us_per_message"] for r in runs),
           "rss_mb": max(r.get("rss_mb", 0) for r in runs)}
    # the latency the adapters add: each run against its own round's baseline, then the median
    by_round = {r["round"]: r for r in base}
    out["added_p50_ms"] = round(statistics.median(
        r["p50_ms"] - by_round[r["round"]]["p50_ms"] for r in runs), 2)
    out["added_p99_ms"] = round(statistics.median(
        r["p99_ms"] - by_round[r["round"]]["p99_ms"] for r in runs), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--protocol", default="5", choices=("5", "3.1.1"),
                    help="the adapters' MQTT protocol (CITYGRID_MQTT_PROTOCOL; default 5)")
    ap.add_argument("--before", type=Path,
                    help="a work tree of an earlier commit: its service is measured too")
    ap.add_argument("--batch-window-ms", type=float,
                    help="the service's --batch-window-ms (this tree's only)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    extra = ([] if args.batch_window_ms is None else
             ["--batch-window-ms", str(args.batch_window_ms)])
    trees = [("after", ROOT)]
    if args.before:
        if not (args.before / "adapters" / "service.py").exists():
            raise SystemExit(f"{args.before} is not a CityGrid work tree")
        trees.append(("before", args.before.resolve()))
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        tmp_path = Path(tmp)
        broker = Mosquitto(tmp_path / "mosquitto")
        broker.start()
        data = {}
        for label, _tree in trees:
            data[label] = tmp_path / f"data-{label}"
            registry = Registry(data[label])
            registry.upsert_many(
                FleetDevice(f"m-{n:05d}", "meter", "bench", 55.66, 12.5, account_id="a",
                            tariff="t", device_profile="tasmota-energy",
                            native_id=f"plug-{n:05d}") for n in range(DEVICES))
            registry.close()
        receiver = Receiver(broker.url)
        results = []
        try:
            for r in range(args.repeat):
                res = run(broker.url, "baseline", args.rate, args.seconds, receiver, None)
                res["round"] = r + 1
                results.append(res)
                print(json.dumps(res), flush=True)
                order = trees if r % 2 == 0 else trees[::-1]
                for label, tree in order:
                    service = start_adapters(tree, broker.url, data[label],
                                             tmp_path / f"adapters-{label}.log", args.protocol,
                                             extra if label == "after" else [])
                    try:
                        proc = psutil.Process(service.pid)
                        res = run(broker.url, label, args.rate, args.seconds, receiver, proc)
                        res["rss_mb"] = round(proc.memory_info().rss / 2**20)
                    finally:
                        stop_adapters(service)
                    res["round"] = r + 1
                    results.append(res)
                    print(json.dumps(res), flush=True)
        finally:
            receiver.close()
            broker.stop()
        for label, _tree in trees:
            print(f"--- {label}: the end of its log")
            print((tmp_path / f"adapters-{label}.log").read_text()[-800:])
    base = [r for r in results if r["kind"] == "baseline"]
    lost = sum(r["messages"] - r["received"] for r in results)
    summary: dict = {
        "rate": args.rate, "seconds": args.seconds, "repeat": args.repeat,
        "protocol": args.protocol, "batch_window_ms": args.batch_window_ms,
        "lost": lost, "duplicates": sum(r["duplicates"] for r in results),
        "baseline_p50_ms": statistics.median(r["p50_ms"] for r in base),
        "baseline_p99_ms": statistics.median(r["p99_ms"] for r in base),
    }
    for label, _tree in trees:
        summary[label] = _summary(results, label, base)
    print(json.dumps(summary, indent=1))
    after = summary["after"]
    for label, _tree in trees:
        s = summary[label]
        print(f"{label}: CPU per message {s['cpu_us_per_message']} µs; added latency p50 "
              f"{s['added_p50_ms']} ms, p99 {s['added_p99_ms']} ms")
    print(f"CPU per message: {after['cpu_us_per_message']} µs (target ≤ 30): "
          f"{'met' if after['cpu_us_per_message'] <= 30 else 'NOT met'}")
    print(f"added latency p99 {after['added_p99_ms']} ms (target ≤ 5 ms): "
          f"{'met' if after['added_p99_ms'] <= 5 else 'NOT met'}")
    print("command: .venv/bin/python bench/adapters.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
