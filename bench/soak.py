"""Soak: the platform at half its maximum load for a long while — memory flat, no error growth.

The same set-up as bench/pipeline.py (private Mosquitto and InfluxDB, `citygrid ingest` and
`citygrid rules run` over 10,000 devices, the simulator as load on a Copenhagen night, probe
lights for reading→command), run for --minutes. Every --every seconds it samples each
component's RSS and CPU, ingest's self-report (readings/s, lag, dead letters, write errors)
and the probes' latency; at the end it checks every reading was stored exactly once.

Verdicts: memory is flat when the last quarter's median RSS is within 10 % (or 20 MB) of the
second quarter's; errors do not grow when dead letters stay 0 and nothing had to be spooled
(a spooled point means InfluxDB refused or timed out a write).

Usage: .venv/bin/python bench/soak.py [--minutes 30] [--rate 2000] [--json F]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=2000, help="readings/s (half the maximum)")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ns = argparse.Namespace(devices=args.devices, probes=1000, seconds=args.minutes * 60,
                            catch_up=60.0)
    with tempfile.TemporaryDirectory(prefix="citygrid-soak-") as tmp:
        tmp = Path(tmp)
        bench = pipeline.Bench(tmp, ns)
        try:
            store = pipeline.InfluxStore(bench.influx.url, "soak")
            store.ensure_ready()
            procs = bench.citygrid(1, "soak", tmp / "data")
            sim = pipeline.Proc("simulate", [
                sys.executable, "-m", "cityctl", "simulate", "--mqtt-url", bench.broker.url,
                "--fleet", str(tmp / "background.geojson"), "--start", bench.night.isoformat(),
                "--interval", f"{len(bench.background) / args.rate}s",
                "--duration", f"{args.minutes * 60}s", "--speed", "1", "--mode", "multiplexed",
                "--report-every", "30"], bench.logs)
            sim.wait_log("clock: simulated")
            m = re.search(r"clock: simulated (\d+) ms at wall (\d+) ms", sim.text())
            offset_ms = int(m[2]) - int(m[1])  # the simulated night's distance from now
            probes = pipeline.Probes(bench.url, bench.probes, offset_ms)
            probes.start()
            t0 = time.monotonic()
            samples = []
            while sim.process.poll() is None:
                time.sleep(args.every)
                sim.sample()
                row = {"t_s": round(time.monotonic() - t0)}
                for p in procs:
                    _, _, rss = pipeline.proc_stat(p.process.pid)
                    row[p.name.rsplit("-", 1)[0] + "_rss_mb"] = round(rss, 1)
                for name, proc in (("broker", bench.broker), ("influxd", bench.influx)):
                    row[f"{name}_rss_mb"] = round(pipeline.proc_stat(proc.process.pid)[2], 1)
                report = store.query("SELECT last(readings_per_s), last(lag_p99_ms), "
                                     "last(dead_letters_total), max(spool_points) "
                                     "FROM citygrid_ingest")
                if report:
                    _, rate, lag, dead, spooled = report[0]["values"][0]
                    row.update(ingest_per_s=rate, lag_p99_ms=lag and lag - offset_ms,
                               dead_letters=dead, spooled=spooled)
                recent = probes.latencies[-200:]
                row["command_p99_ms"] = round(pipeline.quantile(recent, 0.99), 1)
                samples.append(row)
                print(json.dumps(row), flush=True)
            probes.stop()
            done = re.search(r"readings=(\d+)", sim.text())
            published = int(done[1]) + probes.published
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                stored = store.count("streetlight") + store.count("meter")
                if stored >= published:
                    break
                time.sleep(0.5)
            for p in procs:
                p.stop()
        finally:
            bench.close()

    quarter = max(1, len(samples) // 4)
    verdicts = {}
    for key in [k for k in samples[0] if k.endswith("_rss_mb")]:
        early = statistics.median(s[key] for s in samples[quarter:2 * quarter] or samples)
        late = statistics.median(s[key] for s in samples[-quarter:])
        verdicts[key] = {"second_quarter_mb": early, "last_quarter_mb": late,
                         "flat": late <= max(early * 1.10, early + 20)}
    errors = [s.get("dead_letters") or 0 for s in samples] + \
             [s.get("spooled") or 0 for s in samples]
    result = {"minutes": args.minutes, "rate": args.rate, "published": published,
              "stored": stored, "lost": max(0, published - stored),
              "probe_commands": len(probes.latencies), "probe_missed": probes.missed,
              "memory": verdicts, "errors_grew": max(errors, default=0) > 0,
              "samples": samples}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
