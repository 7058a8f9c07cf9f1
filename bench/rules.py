"""Rule engine benchmark: reading→command latency under load.

A private Mosquitto; `citygrid rules run` with the Copenhagen example over a fleet of
10,000 lights; `citygrid simulate` publishing 5,000 readings/s from 9,700 of them in the
background (a Copenhagen night, so the rules are busy: baselines, motion boosts,
neighbours). The other 300 lights are probes: each gets a dark reading, then a motion
reading, and the time from publishing the motion reading to receiving the light's
100 % command is one sample.

Usage: .venv/bin/python bench/rules.py [--lights 10000] [--rate 5000] [--probes 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cityctl.localservices import Mosquitto  # noqa: E402
from citygrid import mqtt  # noqa: E402
from citygrid.city import COPENHAGEN  # noqa: E402
from citygrid.contract import Topic  # noqa: E402
from citygrid.fleet import Fleet, FleetDevice  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402
from simulators.fleetgen import generate  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lights", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=5_000, help="background readings/s")
    ap.add_argument("--probes", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="citygrid-bench-") as tmp:
        tmp = Path(tmp)
        broker = Mosquitto(tmp / "mosquitto")
        broker.start()
        background = generate(COPENHAGEN, args.lights - args.probes, 0, seed=5)
        # Probes stand 1.1 km apart, away from the city: no neighbour's motion holds them
        # at 100 % already, so each motion reading must produce a command.
        probes = [FleetDevice(f"probe-{i:04d}", "streetlight", "probes", 56.0 + i * 0.01,
                              12.0, rated_w=50.0) for i in range(args.probes)]
        Fleet([*background.devices, *probes]).dump(tmp / "fleet.geojson")
        background.dump(tmp / "background.geojson")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        logs = []

        def spawn(name: str, argv: list[str]) -> subprocess.Popen:
            log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
            logs.append(log)
            return subprocess.Popen([sys.executable, "-m", "cityctl", *argv,
                                     "--mqtt-url", broker.url, "--data-dir", str(tmp / "data")],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)

        rules = spawn("rules", ["rules", "run", "--fleet", str(tmp / "fleet.geojson")])
        while "rules running" not in (tmp / "rules.log").read_text():
            time.sleep(0.1)
        night = datetime.now(COPENHAGEN.tz).replace(hour=22, minute=0, second=0,
                                                    microsecond=0) - timedelta(days=1)
        interval = (args.lights - args.probes) / args.rate
        sim = spawn("simulate", ["simulate", "--fleet", str(tmp / "background.geojson"),
                                 "--start", night.isoformat(), "--interval", f"{interval}s",
                                 "--report-every", "5"])
        sim_started = time.monotonic()
        time.sleep(15)  # the background settles: every light has had its baseline command

        url = MqttUrl.parse(broker.url)
        received: dict[str, float] = {}
        expected: dict[str, int] = {}  # probe → the ts of its motion reading
        got = threading.Condition()

        def on_message(client, userdata, m) -> None:
            now = time.perf_counter()
            body = orjson.loads(m.payload)
            device = Topic.parse(m.topic).device_id
            if body["brightness_pct"] == 100.0 and expected.get(device) == body["ts"]:
                with got:
                    received.setdefault(device, now)
                    got.notify_all()

        sub = mqtt.make_client(url, "bench-probe-sub")
        sub.on_message = on_message
        mqtt.connect(sub, url)
        sub.loop_start()
        sub.subscribe("city/v1/+/streetlight/+/cmd", qos=1)
        pub = mqtt.make_client(url, "bench-probe-pub")
        mqtt.connect(pub, url)
        pub.loop_start()
        time.sleep(1)

        def sim_now_ms() -> int:
            return int((night.timestamp() + time.monotonic() - sim_started) * 1000)

        def reading(seq: int, motion: bool, ts: int) -> bytes:
            return orjson.dumps({"ts": ts, "seq": seq, "brightness_pct": 30.0,
                                 "power_w": 16.7, "energy_wh": 1.0, "lux": 0.5,
                                 "motion": motion})

        cpu0, wall0 = cpu_seconds(rules.pid), time.monotonic()
        latencies, lost = [], 0
        for p in probes:
            topic = str(Topic(p.district, "streetlight", p.device_id))
            pub.publish(topic, reading(1, False, sim_now_ms()), qos=1).wait_for_publish(5)
            time.sleep(0.02)  # its baseline command
            ts = sim_now_ms()
            expected[p.device_id] = ts
            sent = time.perf_counter()
            pub.publish(topic, reading(2, True, ts), qos=1)
            with got:
                if got.wait_for(lambda d=p.device_id: d in received, timeout=5):
                    latencies.append((received[p.device_id] - sent) * 1000)
                else:
                    lost += 1
            time.sleep(0.01)
        cpu = (cpu_seconds(rules.pid) - cpu0) / (time.monotonic() - wall0)
        rates = [float(line.split("readings/s")[0].split()[-1]) for line in
                 (tmp / "simulate.log").read_text().splitlines() if "readings/s" in line]
        background = statistics.median(rates[1:]) if len(rates) > 1 else float("nan")
        for proc in (sim, rules):
            proc.terminate()
            proc.wait(30)
        sub.loop_stop()
        pub.loop_stop()
        broker.stop()
        latencies.sort()
        result = {
            "lights": args.lights, "background_readings_per_s": background,
            "probes": len(latencies), "lost": lost,
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": latencies[-1], "rules_cpu": cpu,
        }
        print(f"{args.lights:,} lights, background {background:,.0f} readings/s: "
              f"reading→command p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms "
              f"(target ≤ 20), max {result['max_ms']:.1f} ms over {len(latencies)} probes, "
              f"{lost} without a command; rule engine {cpu:.0%} of a core")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        if os.environ.get("BENCH_KEEP_LOG"):
            import shutil
            shutil.copy(tmp / "rules.log", os.environ["BENCH_KEEP_LOG"])


if __name__ == "__main__":
    main()
