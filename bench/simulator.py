"""Simulator benchmark: what one `citygrid simulate` process carries into the real broker.

1. multiplexed: 10,000 devices (1,000 per connection) all due as often as the engine can go;
   readings/s counted once the broker has acknowledged every one (QoS 1 PUBACK);
2. per-device: 10,000 MQTT connections (own client id, Last Will, command subscription),
   how long they take to connect, and the readings/s they then sustain at a 10 s interval.

Usage: .venv/bin/python bench/simulator.py [--devices 10000] [--seconds 15] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Mosquitto  # noqa: E402
from citygrid.city import COPENHAGEN  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402
from simulators.engine import Engine, SimConfig  # noqa: E402
from simulators.fleetgen import generate  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_for(engine: Engine, seconds: float) -> tuple[int, float]:
    """Run the engine for `seconds`, then until the broker acked everything; (readings, s)."""
    timer = threading.Timer(seconds, engine.stop)
    started = time.monotonic()
    timer.start()
    stats = engine.run()  # close() waits for the outstanding PUBACKs
    return stats["readings"], time.monotonic() - started


def multiplexed(url: str, fleet, seconds: float, seed: int, protocol: str) -> float:
    # Every device due every 50 ms: far more than one process can publish, so it runs flat out.
    config = SimConfig(speed=1, interval_s=0.05, seed=seed, devices_per_connection=1000,
                       client_prefix=f"bench-mux-{seed}", report_every_s=1e9,
                       protocol=protocol)
    engine = Engine(MqttUrl.parse(url), fleet, COPENHAGEN, config)
    engine.connect()
    readings, took = run_for(engine, seconds)
    return readings / took


def per_device(url: str, fleet, seconds: float) -> dict:
    config = SimConfig(speed=1, interval_s=10, mode="per-device", report_every_s=1e9)
    engine = Engine(MqttUrl.parse(url), fleet, COPENHAGEN, config)
    started = time.monotonic()
    engine.connect()
    connect_s = time.monotonic() - started
    held = sum(c.up for c in engine.connections)
    readings, took = run_for(engine, seconds)
    return {"connections": held, "connect_s": round(connect_s, 1),
            "readings_per_s": round(readings / took), "rss_mb": round(peak_rss_mb())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    fleet = generate(COPENHAGEN, args.devices * 3 // 4, args.devices - args.devices * 3 // 4)
    with tempfile.TemporaryDirectory(prefix="citygrid-bench-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            rates: dict[str, list[float]] = {"5": [], "3.1.1": []}
            for r in range(args.repeat):
                for protocol, runs in rates.items():
                    runs.append(multiplexed(broker.url, fleet, args.seconds, r, protocol))
                    print(f"multiplexed run {r + 1}, MQTT {protocol}: {runs[-1]:,.0f} "
                          f"readings/s ({args.devices:,} devices, 1,000 per connection)",
                          flush=True)
            for protocol, runs in rates.items():
                print(f"multiplexed median, MQTT {protocol}: {statistics.median(runs):,.0f} "
                      "readings/s (target ≥ 20,000)")
            pd = per_device(broker.url, fleet, args.seconds)
            print(f"per-device: {pd['connections']:,} connections held (target 10,000), "
                  f"connected in {pd['connect_s']} s, {pd['readings_per_s']:,} readings/s at a "
                  f"10 s interval, simulator peak RSS {pd['rss_mb']} MB", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"multiplexed_per_s": rates,
                                                 "per_device": pd}, indent=2))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
