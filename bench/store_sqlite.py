"""The embedded SQLite store's write path: readings/s and CPU per reading of
``SqliteStore.write`` for ingest-like batches (5,000 points: streetlight and meter readings of
10,000 devices, tags device_id and district, 4-6 numeric/bool fields, timestamps in ms, the
encoded series key as ingest hands it in), into a fresh data dir each repeat.

Each repeat is its own process (a fresh interpreter and file); the figures are medians over
the repeats. With ``--compare DIR`` the store of another checkout (e.g. a worktree of the
commit before: ``git worktree add /tmp/before HEAD``) runs in the same invocation, the two
trees alternating, so a noisy shared machine hits both alike; the ratio is printed.

    .venv/bin/python bench/store_sqlite.py [-n 200000] [--batch 5000] [--repeats 5]
        [--compare /tmp/before] [--rewrite] [--maintain] [--interval 60] [--prefill 0]

``--rewrite`` also times writing every reading a second time (redelivery: the merge path).
``--maintain`` also times ``maintain()`` (hourly rollups, retention) over what was written
(with ``--interval 900`` the 200,000 readings span five hours). ``--prefill N`` writes N
older readings first, untimed: the cost of a write into a file that already holds data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
T0 = 1_790_000_000_000  # ms
DEVICES = 10_000
METER_SHARE = 5  # every fifth device is a meter


def readings(n: int, key_of, interval_s: int = 60, first_round: int = 0) -> list:
    """``n`` readings, a round of every device each ``interval_s`` (each its own offset)."""
    from citygrid.store.base import Point

    routes = []
    for d in range(DEVICES):
        kind = "meter" if d % METER_SHARE == 0 else "streetlight"
        tags = {"device_id": f"{kind[:2]}-{d:05d}", "district": f"d{d % 12}"}
        routes.append((kind, tags, key_of(kind, tags)))
    out = []
    for i in range(n):
        r, d = divmod(i, DEVICES)
        r += first_round
        kind, tags, key = routes[d]
        ts = T0 + r * interval_s * 1000 + d * interval_s * 1000 // DEVICES
        if kind == "streetlight":
            fields = {"seq": r, "brightness_pct": float((i * 7) % 101), "power_w": 20.0 + i % 13,
                      "energy_wh": 1000.0 + 0.5 * r, "lux": 3.2, "motion": i % 7 == 0}
        else:
            fields = {"seq": r, "energy_kwh": 50.0 + 0.01 * r, "power_w": 600.0 + i % 50,
                      "voltage_v": 230.0 + i % 5}
        out.append(Point(kind, tags, fields, ts, key))
    return out


def child(tree: str, args: argparse.Namespace) -> None:
    """One repeat in this process: write ``n`` readings through the tree's store."""
    import gc

    sys.path.insert(0, tree)
    from citygrid.store import lineproto, sqlite

    assert sqlite.__file__.startswith(tree), sqlite.__file__
    n, batch = args.n, args.batch
    before = -(-args.prefill // DEVICES)  # rounds of the prefill, before the timed ones
    points = readings(n, lineproto.series_key, args.interval, 0)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        store = sqlite.SqliteStore(Path(tmp) / "telemetry.sqlite")
        store.ensure_ready()
        if args.prefill:
            old = readings(before * DEVICES, lineproto.series_key, args.interval, -before)
            for k in range(0, len(old), batch):
                store.write(old[k:k + batch])
            del old
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)  # as `citygrid ingest` does
        passes = [("write", points)] + ([("rewrite", points)] if args.rewrite else [])
        for name, pts in passes:
            c0, w0 = time.process_time(), time.perf_counter()
            for k in range(0, n, batch):
                store.write(pts[k:k + batch])
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            out[f"{name}_us_cpu"] = cpu / n * 1e6
            out[f"{name}_per_s"] = n / wall
        assert store.count("streetlight", start_ms=T0) + store.count("meter", start_ms=T0) == n
        if args.maintain:
            c0, w0 = time.process_time(), time.perf_counter()
            done = store.maintain(T0 + 24 * 3_600_000)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            # It rolls up the complete hours: those before the newest reading's.
            until = points[-1].ts_ms // 3_600_000 * 3_600_000
            rolled = sum(p.ts_ms < until for p in points) + (args.prefill and before * DEVICES)
            out["maintain_us_cpu"] = cpu / max(rolled, 1) * 1e6  # a reading rolled up
            out["maintain_s_cpu"], out["maintain_s_wall"] = cpu, wall
            out["rollups"] = done["rollups"]
        store.close()
    print(json.dumps(out))


def run(tree: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", tree, "-n", str(args.n), "--batch",
           str(args.batch), "--interval", str(args.interval), "--prefill", str(args.prefill)
           ] + (["--rewrite"] if args.rewrite else []) + (["--maintain"] if args.maintain else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{tree}: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="readings a repeat")
    ap.add_argument("--batch", type=int, default=5_000, help="points a write")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--interval", type=int, default=60, help="s between a device's readings")
    ap.add_argument("--prefill", type=int, default=0,
                    help="readings written (untimed) before, so the file is not empty")
    ap.add_argument("--compare", metavar="DIR", help="another checkout's tree, side by side")
    ap.add_argument("--rewrite", action="store_true", help="also time writing it all again")
    ap.add_argument("--maintain", action="store_true", help="also time maintain() (rollups)")
    ap.add_argument("--child", metavar="TREE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(str(Path(args.child).resolve()), args)
        return
    trees = {"this": str(HERE)}
    if args.compare:
        trees["compare"] = str(Path(args.compare).resolve())
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():  # alternating, so noise hits both alike
            results[name].append(run(tree, args))
    print(f"{args.n:,} readings in batches of {args.batch:,}, {DEVICES:,} devices, a reading "
          f"each {args.interval} s, {args.prefill:,} written before; median of {args.repeats} "
          "repeats")
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for name, rs in results.items()}
    for name, m in medians.items():
        print(f"{name:>8} ({trees[name]})")
        for k, v in m.items():
            print(f"{'':>10}{k:<18}{v:>12,.1f}")
    if args.compare:
        this, other = medians["this"], medians["compare"]
        for k in this:
            if k in other and other[k]:
                print(f"{'this/compare':>14} {k:<18}{this[k] / other[k]:>8.3f}")


if __name__ == "__main__":
    main()
