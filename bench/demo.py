"""The demo's footprint: `citygrid up` with its default city, CPU per component.

Starts `citygrid up --plain` on a fresh data directory (the embedded defaults: the SQLite
store, Mosquitto when installed), waits until it is ready and has run ``--warmup`` seconds,
then measures every process of the tree for ``--seconds``: its share of one core (CPU
seconds over wall seconds), by component (broker, ingest, rules workers, gateway, adapters,
simulator, up itself), and in all. Repeated ``--repeat`` times, medians reported.

    .venv/bin/python bench/demo.py [--seconds 60] [--warmup 20] [--repeat 3] [--tree DIR]

``--tree DIR`` runs another checkout's `citygrid up` (a before-tree made with
``git worktree add /tmp/before <commit>``), so two trees can be compared in one session.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def component(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    if "mosquitto" in cmd or "embedded_broker" in cmd:
        return "broker"
    for name in ("ingest", "gateway", "adapters", "simulate"):
        if f" {name}" in cmd:
            return "simulator" if name == "simulate" else name
    if " rules" in cmd:
        return "rules"
    if " up" in cmd:
        return "up"
    return cmd[:40]


def run_once(tree: Path, seconds: float, warmup: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="citygrid-demo-") as tmp:
        log = open(Path(tmp) / "up.log", "w+b")  # noqa: SIM115
        up = subprocess.Popen(
            [sys.executable, "-m", "cityctl", "up", "--plain", "--report-every", "30",
             "--data-dir", str(Path(tmp) / "city")], cwd=tree, stdout=log,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(tree)},
            start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not re.search(rb"ready in", Path(log.name).read_bytes()):
                if up.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(Path(log.name).read_text()[-3000:])
                time.sleep(0.2)
            time.sleep(warmup)
            root = psutil.Process(up.pid)
            procs = [root, *root.children(recursive=True)]
            before = {}
            for p in procs:
                try:
                    t = p.cpu_times()
                    before[p.pid] = (p, t.user + t.system)
                except psutil.Error:
                    pass
            started = time.monotonic()
            time.sleep(seconds)
            wall = time.monotonic() - started
            share: dict[str, float] = defaultdict(float)
            for p, cpu in before.values():
                try:
                    t = p.cpu_times()
                    share[component(p)] += (t.user + t.system - cpu) / wall
                except psutil.Error:
                    pass
            share["all"] = sum(share.values())
            return dict(share)
        finally:
            os.killpg(up.pid, signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tree", type=Path, default=ROOT)
    args = ap.parse_args()
    runs = []
    for r in range(args.repeat):
        share = run_once(args.tree.resolve(), args.seconds, args.warmup)
        runs.append(share)
        print(f"run {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(share.items())),
              flush=True)
    keys = sorted({k for run in runs for k in run})
    print(f"median share of one core over {args.seconds:g} s ({args.tree}): " + ", ".join(
        f"{k} {statistics.median(run.get(k, 0.0) for run in runs):.3f}" for k in keys)
        + " (target: all ≤ 0.25)")


if __name__ == "__main__":
    main()
