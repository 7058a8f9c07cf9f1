"""Pipeline benchmark: the whole platform at the limit of this machine, and a peer beside it.

Everything on one machine, in one run: a private Mosquitto and InfluxDB; `citygrid ingest`
(1, 2 or 4 workers in one shared-subscription group) and `citygrid rules run` (Copenhagen
lighting and billing examples, 10,000 devices) — or, for the peer, Node-RED with
node-red-contrib-influxdb; `citygrid simulate` as the load generator (a Copenhagen night,
multiplexed connections, real-time clock), stepping the offered load up until readings are
lost, the generator cannot offer more, or latency runs away.

Per step: offered and stored readings/s, loss (published − distinct points stored),
p50/p99 reading→stored (from ingest's self-report, less the simulator's clock offset),
p50/p99 reading→command (probe lights: a motion reading, timed to its 100 % command), CPU
seconds and peak RSS per component. The ceiling it is compared with, measured in the same
run: one bare paho subscriber draining a QoS 1 backlog while JSON-decoding it.

Usage:
  .venv/bin/python bench/pipeline.py [--steps 5000,10000,...] [--seconds 20]
      [--workers 1,2,4] [--rules-workers 2] [--no-nodered] [--json F] [--plot F.png]
  .venv/bin/python bench/pipeline.py --quick      # one small step: that it runs (CI)
Node-RED: `cd bench/nodered && npm install` (from the npm registry) before a full run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
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

from cityctl.localservices import Influxd, Mosquitto  # noqa: E402
from citygrid import mqtt  # noqa: E402
from citygrid.city import COPENHAGEN  # noqa: E402
from citygrid.contract import Topic  # noqa: E402
from citygrid.fleet import Fleet, FleetDevice  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402
from citygrid.store.influx import InfluxStore  # noqa: E402
from simulators.fleetgen import generate  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench" / "ingest.py")
bench_ingest = importlib.util.module_from_spec(_spec)
sys.modules["bench_ingest"] = bench_ingest  # its publishers run in spawned processes
_spec.loader.exec_module(bench_ingest)
NODERED = ROOT / "bench" / "nodered"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def proc_stat(pid: int) -> tuple[float, float, float]:
    """CPU seconds, peak RSS (MB, VmHWM) and current RSS (MB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (cpu, int(status["VmHWM"].split()[0]) / 1024, int(status["VmRSS"].split()[0]) / 1024)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


class Proc:
    """A component: its process, its log, its CPU and memory."""

    def __init__(self, name: str, argv: list[str], logs: Path, cwd: Path | None = None):
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                            cwd=cwd)
        self.cpu0 = 0.0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout_s: float = 60, times: int = 1) -> None:
        """Until the log says ``needle`` ``times`` times (e.g. once per rule worker)."""
        deadline = time.monotonic() + timeout_s
        while self.text().count(needle) < times:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not say {needle!r}:\n{self.text()[-2000:]}")
            time.sleep(0.05)

    def _stat(self) -> tuple[float, float, float]:
        """The process and its children (`rules run --workers N`: a supervisor and N
        workers): CPU summed, the largest process's peak and current RSS (each one's own)."""
        import psutil

        pids = [self.process.pid]
        with contextlib.suppress(psutil.Error):
            pids += [c.pid for c in psutil.Process(self.process.pid).children(recursive=True)]
        stats = []
        for pid in pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, KeyError):
                stats.append(proc_stat(pid))
        if not stats:
            raise ProcessLookupError(self.process.pid)
        return (sum(c for c, _, _ in stats), max(h for _, h, _ in stats),
                max(r for _, _, r in stats))

    def mark(self) -> None:
        self.last = self._stat()
        self.cpu0 = self.last[0]

    def sample(self) -> None:
        """Keep the latest figures: /proc forgets a process once it is reaped."""
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, KeyError):
            self.last = self._stat()

    def usage(self) -> dict[str, float]:
        self.sample()
        cpu, hwm, rss = self.last
        return {"cpu_s": round(cpu - self.cpu0, 2), "peak_rss_mb": round(hwm, 1),
                "rss_mb": round(rss, 1)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Probes:
    """Probe lights away from the city: a dark reading, then a motion reading; the time from
    publishing the motion reading to receiving the light's 100 % command is one sample."""

    def __init__(self, url: MqttUrl, probes: list[FleetDevice], offset_ms: int):
        self.url, self.probes, self.offset_ms = url, probes, offset_ms
        self.latencies: list[float] = []
        self.missed = 0
        self.published = 0
        self._expected: dict[str, int] = {}
        self._received: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.sub = mqtt.make_client(url, f"bench-probe-sub-{os.getpid()}")
        self.sub.on_message = self._on_message
        mqtt.connect(self.sub, url)
        self.sub.loop_start()
        self.sub.subscribe("city/v1/probes/streetlight/+/cmd", qos=1)
        self.pub = mqtt.make_client(url, f"bench-probe-pub-{os.getpid()}")
        mqtt.connect(self.pub, url)
        self.pub.loop_start()
        self.seq = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_message(self, client, userdata, m) -> None:
        now = time.perf_counter()
        body = orjson.loads(m.payload)
        device = Topic.parse(m.topic).device_id
        if body["brightness_pct"] == 100.0 and self._expected.get(device) == body["ts"]:
            with self._cond:
                self._received.setdefault(device, now)
                self._cond.notify_all()

    def sim_now(self) -> int:
        return int(time.time() * 1000) - self.offset_ms

    def _reading(self, motion: bool, ts: int) -> bytes:
        self.seq += 1
        return orjson.dumps({"ts": ts, "seq": self.seq, "brightness_pct": 30.0, "power_w": 16.7,
                             "energy_wh": 1.0, "lux": 0.5, "motion": motion})

    def _run(self) -> None:
        time.sleep(2)  # past the generator's first burst
        i = 0
        while not self._stop.is_set():
            p = self.probes[i % len(self.probes)]
            i += 1
            topic = str(Topic(p.district, "streetlight", p.device_id))
            self.pub.publish(topic, self._reading(False, self.sim_now()), qos=1)
            self._stop.wait(0.03)
            ts = self.sim_now()
            with self._cond:
                self._expected[p.device_id] = ts
                self._received.pop(p.device_id, None)
            sent = time.perf_counter()
            self.pub.publish(topic, self._reading(True, ts), qos=1)
            self.published += 2
            with self._cond:
                if self._cond.wait_for(lambda d=p.device_id: d in self._received, timeout=3):
                    self.latencies.append((self._received[p.device_id] - sent) * 1000)
                else:
                    self.missed += 1
            # A probe comes round again only after its motion's 120 s hold has ended
            # (simulated time = real time here), so each motion reading must command 100 %.
            self._stop.wait(max(0.07, 125 / len(self.probes) - 0.03))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        for c in (self.sub, self.pub):
            c.loop_stop()
            c.disconnect()


class Bench:
    def __init__(self, tmp: Path, args: argparse.Namespace):
        self.tmp, self.args = tmp, args
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.broker = Mosquitto(tmp / "mosquitto")
        self.influx = Influxd(tmp / "influx")
        self.broker.start()
        self.influx.start()
        self.url = MqttUrl.parse(self.broker.url)
        lights = int(args.devices * 0.9) - args.probes
        background = generate(COPENHAGEN, lights, args.devices - lights - args.probes, seed=9)
        self.probes = [FleetDevice(f"probe-{i:04d}", "streetlight", "probes", 56.0 + i * 0.01,
                                   12.0, rated_w=50.0) for i in range(args.probes)]
        self.background = background
        background.dump(tmp / "background.geojson")
        Fleet([*background.devices, *self.probes]).dump(tmp / "fleet.geojson")
        self.night = (datetime.now(COPENHAGEN.tz) - timedelta(days=1)).replace(
            hour=22, minute=0, second=0, microsecond=0)
        self.step_no = 0

    def close(self) -> None:
        self.broker.stop()
        self.influx.stop()

    # ------------------------------------------------------------------ one step

    def citygrid(self, workers: int, db: str, data: Path, rules: bool = True) -> list[Proc]:
        common = ["--mqtt-url", self.broker.url, "--influx-url", self.influx.url,
                  "--influx-db", db, "--data-dir", str(data)]
        procs = []
        for w in range(workers):
            argv = [sys.executable, "-m", "cityctl", "ingest", *common, "--client-id",
                    f"bench-ingest-{self.step_no}-{w}", "--report-interval", "1"]
            if workers > 1:
                argv += ["--group", f"bench{self.step_no}"]
            procs.append(Proc(f"ingest{w}-{self.step_no}", argv, self.logs))
        for p in procs:
            p.wait_log("subscribed to")
        if rules:
            procs.append(Proc(f"rules-{self.step_no}", [
                sys.executable, "-m", "cityctl", "rules", "run", *common,
                "--fleet", str(self.tmp / "fleet.geojson"),
                "--workers", str(self.args.rules_workers)], self.logs))
            procs[-1].wait_log("rules running", times=self.args.rules_workers)
        return procs

    def nodered(self, db: str) -> list[Proc]:
        from bench.nodered_flow import write_flow

        user_dir = self.tmp / f"nodered-{self.step_no}"
        port = bench_ingest_free_port()
        write_flow(user_dir, self.url.host, self.url.port, self.influx.url, db, port,
                   f"bench-nodered-{self.step_no}")
        red = Proc(f"nodered-{self.step_no}", [
            str(NODERED / "node_modules" / ".bin" / "node-red"), "--userDir", str(user_dir),
            "--port", str(port), str(user_dir / "flows.json")], self.logs, cwd=NODERED)
        red.wait_log("Connected to broker", 60)
        time.sleep(1)
        return [red]

    def step(self, system: str, rate: int, workers: int = 1, seconds: float | None = None,
             rules: bool = True) -> dict:
        self.step_no += 1
        seconds = seconds or self.args.seconds
        db = f"bench_{system}_{self.step_no}"
        store = InfluxStore(self.influx.url, db)
        store.drop()
        store.ensure_ready()
        data = self.tmp / f"data-{self.step_no}"
        procs = (self.citygrid(workers, db, data, rules) if system == "citygrid"
                 else self.nodered(db))
        n_background = len(self.background)
        interval = n_background / rate
        sim = Proc(f"simulate-{self.step_no}", [
            sys.executable, "-m", "cityctl", "simulate", "--mqtt-url", self.broker.url,
            "--fleet", str(self.tmp / "background.geojson"), "--start", self.night.isoformat(),
            "--interval", f"{interval}s", "--duration", f"{seconds}s", "--speed", "1",
            "--mode", "multiplexed", "--report-every", "2"], self.logs)
        sim.wait_log("clock: simulated")
        m = re.search(r"clock: simulated (\d+) ms at wall (\d+) ms", sim.text())
        offset_ms = int(m[2]) - int(m[1])
        others = {"broker": self.broker.process.pid, "influxd": self.influx.process.pid}
        base = {k: proc_stat(pid)[0] for k, pid in others.items()}
        for p in (*procs, sim):
            p.mark()
        probes = None
        if system == "citygrid" and rules and self.args.probes:
            probes = Probes(self.url, self.probes, offset_ms)
            probes.start()
        t0 = time.monotonic()
        t0_ms = int(time.time() * 1000)
        while sim.process.poll() is None and time.monotonic() - t0 < seconds + 120:
            sim.sample()
            time.sleep(0.2)
        took = time.monotonic() - t0
        if probes is not None:
            probes.stop()
        done = re.search(r"readings=(\d+)", sim.text())
        published = int(done[1]) if done else 0
        published += probes.published if probes else 0
        deadline = time.monotonic() + self.args.catch_up
        stored = 0
        while time.monotonic() < deadline:
            stored = store.count("streetlight") + store.count("meter")
            if stored >= published:
                break
            time.sleep(0.25)
        caught_up = time.monotonic() - t0 - took
        time.sleep(1.5)  # the last self-report
        usage = {"simulator": sim.usage()}
        for p in procs:
            usage[p.name.rsplit("-", 1)[0]] = p.usage()
        for k, pid in others.items():
            cpu, _, rss = proc_stat(pid)
            usage[k] = {"cpu_s": round(cpu - base[k], 2), "rss_mb": round(rss, 1)}
        result = {"system": system, "workers": workers, "rules": rules and system == "citygrid",
                  "offered_per_s": rate,
                  "achieved_offer_per_s": round(published / took), "published": published,
                  "stored": stored, "lost": max(0, published - stored),
                  "seconds": round(took, 1), "catch_up_s": round(caught_up, 1),
                  "stored_per_s": round(stored / max(took, caught_up + took)), "usage": usage}
        if system == "citygrid":
            rows = store.query(f"SELECT lag_p50_ms, lag_p99_ms FROM citygrid_ingest WHERE "
                               f"time >= {t0_ms}ms AND readings_per_s > 0")
            rows = rows[0]["values"] if rows else []
            result["stored_p50_ms"] = (round(statistics.median(r[1] for r in rows) - offset_ms)
                                       if rows else None)
            result["stored_p99_ms"] = round(max(r[2] for r in rows) - offset_ms) if rows else None
            if probes is not None:
                result["command_p50_ms"] = round(quantile(probes.latencies, 0.5), 1)
                result["command_p99_ms"] = round(quantile(probes.latencies, 0.99), 1)
                result["command_samples"] = len(probes.latencies)
                result["command_missed"] = probes.missed
        for p in procs:
            p.stop()
        sim.stop()
        store.drop()
        shutil.rmtree(data, ignore_errors=True)
        ok = self.ok(result)
        result["zero_loss"] = ok
        label = system + (" +rules" if result["rules"] else "")
        print(f"  {label:15} x{workers} offered {rate:>6}/s (achieved "
              f"{result['achieved_offer_per_s']:>6}/s): stored {stored}/{published}"
              f"{'' if ok else '  ✗'}"
              + (f", stored p50/p99 {result.get('stored_p50_ms')}/{result.get('stored_p99_ms')}"
                 f" ms, command p50/p99 {result.get('command_p50_ms')}/"
                 f"{result.get('command_p99_ms')} ms" if system == "citygrid" else "")
              + "; CPU s " + ", ".join(f"{k} {v['cpu_s']}" for k, v in usage.items()),
              flush=True)
        return result

    def ok(self, r: dict) -> bool:
        return sustained(r, self.args.catch_up)

    def ramp(self, system: str, steps: list[int], workers: int = 1, rules: bool = True
             ) -> list[dict]:
        results = []
        for rate in steps:
            results.append(self.step(system, rate, workers, rules=rules))
            if not results[-1]["zero_loss"]:
                break
        return results


def sustained(r: dict, catch_up_s: float = 30.0) -> bool:
    """Zero loss, the load really offered, caught up, and latency not running away: stored
    p99 under 5 s and, with the rules, half the commands within a second."""
    return (r["lost"] == 0 and r["achieved_offer_per_s"] >= 0.95 * r["offered_per_s"]
            and r["catch_up_s"] < catch_up_s
            and (r.get("stored_p99_ms") is None or r["stored_p99_ms"] < 5000)
            and (r.get("command_p50_ms") is None or r["command_p50_ms"] < 1000))


def bench_ingest_free_port() -> int:
    from cityctl.localservices import free_port

    return free_port()


def best(results: list[dict]) -> int:
    return max((r["offered_per_s"] for r in results if r["zero_loss"]), default=0)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, steps in results["ramps"].items():
        xs = [r["offered_per_s"] for r in steps]
        a.plot(xs, [r["stored_per_s"] for r in steps], marker="o", label=name)
        if steps and "stored_p99_ms" in steps[0]:
            b.plot(xs, [r.get("stored_p99_ms") or float("nan") for r in steps], marker="o",
                   label=f"{name}: reading→stored p99")
            if any(r.get("command_p99_ms") for r in steps):
                b.plot(xs, [r.get("command_p99_ms") or float("nan") for r in steps],
                       marker="x", linestyle="--", label=f"{name}: reading→command p99")
    lim = max((r["offered_per_s"] for s in results["ramps"].values() for r in s), default=1)
    a.plot([0, lim], [0, lim], color="grey", linewidth=0.8, linestyle=":", label="stored = offered")
    a.axhline(results["bare_paho_drain_per_s"], color="red", linewidth=0.8, linestyle="--",
              label="bare paho drain (1×)")
    a.set(xlabel="offered readings/s", ylabel="stored readings/s",
          title="Throughput: stored vs offered (every ramp ends at its first failed step)")
    b.set(xlabel="offered readings/s", ylabel="ms", yscale="log", title="Latency")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="2000,3000,4000,5000,6000,8000,10000")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", default="1,2,4", help="ingest workers to scale out over")
    ap.add_argument("--rules-workers", type=int, default=2,
                    help="rule engine processes, by district (up and compose run 2)")
    ap.add_argument("--ingest-steps", default="6000,9000,12000,15000,18000,21000")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=1000, help="probe lights (one motion "
                    "reading each per 125 s: 1,000 give 8 samples/s)")
    ap.add_argument("--backlog", type=int, default=100_000, help="for the bare paho drain")
    ap.add_argument("--catch-up", type=float, default=30.0)
    ap.add_argument("--no-nodered", action="store_true")
    ap.add_argument("--nodered-steps", default="4000,6000,8000,10000,12000,15000,18000")
    ap.add_argument("--quick", action="store_true", help="one small step, no peer: it runs")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seconds, args.workers, args.devices = "1000", 5.0, "1", 1000
        args.probes, args.backlog, args.no_nodered = 200, 10_000, True
    steps = [int(s) for s in args.steps.split(",")]
    ingest_steps = [int(s) for s in args.ingest_steps.split(",")]
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="citygrid-pipeline-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            bare = bench_ingest.bare_paho_drain(bench.broker.url, args.backlog,
                                                bench.broker.process.pid)
            print(f"bare paho drain (QoS 1 backlog, json.loads each): {bare:,.0f}/s", flush=True)
            results: dict = {"bare_paho_drain_per_s": round(bare), "ramps": {},
                             "devices": args.devices, "seconds_per_step": args.seconds}
            # The platform: ingest and the rule engine (the target).
            results["ramps"]["citygrid ingest+rules"] = bench.ramp("citygrid", steps)
            top = best(results["ramps"]["citygrid ingest+rules"])
            if top and not args.quick:
                results["half_load"] = bench.step("citygrid", top // 2)
            # Scale-out of ingest alone (the rule engine is one process either way), and the
            # like-for-like comparison with the peer, which only ingests.
            for w in workers if not args.quick else []:
                results["ramps"][f"citygrid ingest x{w}"] = bench.ramp(
                    "citygrid", ingest_steps, w, rules=False)
            if not args.no_nodered:
                if not (NODERED / "node_modules" / ".bin" / "node-red").exists():
                    raise SystemExit("Node-RED is not installed: cd bench/nodered && npm install")
                red = bench.ramp("nodered", [int(s) for s in args.nodered_steps.split(",")])
                results["ramps"]["node-red"] = red
            results["summary"] = {name: {"zero_loss_per_s": best(r)}
                                  for name, r in results["ramps"].items()}
            summary = results["summary"]
            platform = summary["citygrid ingest+rules"]["zero_loss_per_s"]
            summary["platform_over_bare_paho"] = round(platform / bare, 2)
            ingest = max((v["zero_loss_per_s"] for k, v in summary.items()
                          if k.startswith("citygrid ingest x")), default=0)
            if ingest:
                summary["ingest_over_bare_paho"] = round(ingest / bare, 2)
            red = summary.get("node-red", {}).get("zero_loss_per_s")
            if red:
                summary["platform_over_nodered"] = round(platform / red, 2)
                summary["ingest_over_nodered"] = round(ingest / red, 2)
            print(json.dumps(results["summary"], indent=2))
        finally:
            bench.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
