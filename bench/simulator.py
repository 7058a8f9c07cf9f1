"""Simulator benchmark: what one `citygrid simulate` process costs and carries into the broker.

Every figure is measured in a worker process of its own against one private Mosquitto (the
benchmark's process only starts the broker and collects), so an older checkout can be run
side by side with this one in the same run (``--compare DIR``, e.g. a worktree made with
``git worktree add /tmp/sim-before HEAD``); runs alternate between the trees and the protocol
versions, and each figure is the median of ``--repeat`` runs.

1. multiplexed, flat out: 10,000 devices (1,000 per connection) all due every 50 ms, far
   more than one process can publish, so the engine runs as fast as it can, as fast as the
   broker acknowledges (QoS 1 PUBACK: the engine's backlog is bounded).
2. multiplexed, paced (``--rates``, 5,000 readings/s by default: the rate at which the
   pipeline benchmark measured the simulator's 85 µs): the same fleet at the interval that
   gives that rate, on the real clock.
3. per-device (``--per-device``): 10,000 MQTT connections (own client id, Last Will, command
   subscription), the time to connect them all, the readings/s at a 10 s interval.

The figure that matters is **µs of CPU a reading**: the worker's CPU time (user + system,
every thread) over a steady-state window of ``--seconds`` — after ``--warmup`` seconds of
running (the connections' retained statuses acknowledged), before the goodbye (offline
statuses, the last acks) — divided by the readings published in it. Each run then ends
normally, and reports what the broker left unacknowledged (0 expected). Readings/s is
reported too; on a shared machine it says as much about the broker's core as about the
simulator.

Usage:
  .venv/bin/python bench/simulator.py [--devices 10000] [--seconds 10] [--repeat 3]
      [--rates 5000,15000] [--protocols 5,3.1.1] [--compare /tmp/sim-before] [--per-device]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def worker(args: argparse.Namespace) -> None:
    """One measurement with the simulator of the tree ``args.tree``; prints one JSON line."""
    sys.path.insert(0, str(Path(args.tree).resolve()))
    from citygrid.city import COPENHAGEN
    from citygrid.settings import MqttUrl
    from simulators.engine import Engine, SimConfig
    from simulators.fleetgen import generate

    lights = args.devices * 3 // 4
    fleet = generate(COPENHAGEN, lights, args.devices - lights)
    if args.mode == "per-device":
        interval, speed = 10.0, 1.0
    elif args.rate:
        interval, speed = args.devices / args.rate, 1.0
    else:
        interval, speed = 0.05, 1.0  # every device due every 50 ms: flat out
    config = SimConfig(speed=speed, interval_s=interval, seed=args.seed,
                       mode=args.mode, devices_per_connection=1000,
                       client_prefix=f"bench-{args.label}-{args.seed}-{os.getpid()}",
                       report_every_s=1e9, protocol=args.protocol)
    engine = Engine(MqttUrl.parse(args.url), fleet, COPENHAGEN, config)
    started = time.monotonic()
    engine.connect()
    connect_s = time.monotonic() - started
    held = sum(c.up for c in engine.connections)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    # The steady state: after the warm-up (the connections' retained statuses acknowledged,
    # the schedule under way), before the goodbye (offline statuses, the last acks).
    time.sleep(args.warmup)
    u0, s0 = _usage()
    n0, t0 = engine.stats["readings"], time.monotonic()
    time.sleep(args.seconds)
    u1, s1 = _usage()
    n1, t1 = engine.stats["readings"], time.monotonic()
    engine.stop()
    thread.join(120)
    readings, took, cpu = n1 - n0, t1 - t0, (u1 - u0) + (s1 - s0)
    stats = engine.stats
    print(json.dumps({
        "readings": readings, "wall_s": round(took, 3), "user_s": round(u1 - u0, 3),
        "sys_s": round(s1 - s0, 3), "cpu_us_per_reading": round(cpu / readings * 1e6, 2)
        if readings else None, "readings_per_s": round(readings / took),
        "run_readings": stats["readings"], "pubacks": stats.get("pubacks"),
        "unacknowledged": stats.get("unacknowledged", 0),
        "connections": held, "connect_s": round(connect_s, 2),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}),
        flush=True)


def run_worker(tree: Path, label: str, url: str, mode: str, protocol: str, rate: int,
               args: argparse.Namespace, seed: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree),
           "--label", label, "--url", url, "--mode", mode, "--protocol", protocol,
           "--rate", str(rate), "--devices", str(args.devices), "--seconds", str(args.seconds),
           "--warmup", str(args.warmup), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=args.warmup + args.seconds + 240,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if done.returncode != 0:
        raise RuntimeError(f"{label} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of running before the measured window")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rates", default="5000",
                    help="readings/s of the paced runs, comma-separated (0: none)")
    ap.add_argument("--protocols", default="5,3.1.1")
    ap.add_argument("--compare", type=Path, metavar="DIR",
                    help="an older checkout of the repository, measured alongside")
    ap.add_argument("--per-device", action="store_true",
                    help="also the per-device mode (10,000 connections), this tree only")
    ap.add_argument("--json", type=Path)
    # a worker's arguments
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    ap.add_argument("--label", default="this", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="multiplexed", help=argparse.SUPPRESS)
    ap.add_argument("--protocol", default="5", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT))
    from cityctl.localservices import Mosquitto

    trees = [("after", ROOT)] + ([("before", args.compare.resolve())] if args.compare else [])
    protocols = args.protocols.split(",")
    loads = [("flat out", 0)] + [(f"paced {r:,}/s", r)
                                 for r in map(int, args.rates.split(",")) if r]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="citygrid-bench-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            for r in range(args.repeat):
                for load, rate in loads:
                    for protocol in protocols:
                        for label, tree in (trees if r % 2 == 0 else trees[::-1]):
                            key = f"{label} | multiplexed {load} | MQTT {protocol}"
                            m = run_worker(tree, label, broker.url, "multiplexed", protocol,
                                           rate, args, r)
                            results.setdefault(key, []).append(m)
                            print(f"run {r + 1}  {key}: {m['cpu_us_per_reading']} µs CPU/reading"
                                  f"  ({m['readings']:,} readings, {m['readings_per_s']:,}/s,"
                                  f" user {m['user_s']} s + sys {m['sys_s']} s,"
                                  f" unacknowledged {m['unacknowledged']})", flush=True)
            if args.per_device:
                m = run_worker(ROOT, "after", broker.url, "per-device", protocols[0], 0, args, 0)
                results["after | per-device | MQTT " + protocols[0]] = [m]
                print(f"per-device: {m['connections']:,} connections held, connected in "
                      f"{m['connect_s']} s, {m['readings_per_s']:,} readings/s at a 10 s "
                      f"interval, {m['cpu_us_per_reading']} µs CPU/reading, peak RSS "
                      f"{m['rss_mb']} MB", flush=True)
        finally:
            broker.stop()
    print("\nmedians (µs of CPU a reading; readings/s):")
    summary = {}
    for key, runs in results.items():
        cpu = statistics.median(m["cpu_us_per_reading"] for m in runs)
        rate = statistics.median(m["readings_per_s"] for m in runs)
        summary[key] = {"cpu_us_per_reading": cpu, "readings_per_s": rate, "runs": runs}
        print(f"  {key:48s} {cpu:7.2f} µs   {rate:>9,.0f}/s   "
              f"(runs: {', '.join(str(m['cpu_us_per_reading']) for m in runs)})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
