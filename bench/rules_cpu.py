"""The rule engine's CPU per reading: two checkouts side by side, or one tree's absolute figure.

Two-tree comparison (the default): both trees' engines get the same readings (Copenhagen
rules, 3,000 lights, a night, motion on 5 % of readings), interleaved in chunks with the
order alternating, and each tree's engine-thread CPU is summed: load from elsewhere on a
shared machine falls on both alike, so their ratio is steadier than either figure.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/rules_cpu.py /tmp/before .
    .venv/bin/python bench/rules_cpu.py /tmp/before . --batch 256   # after: on_readings

Absolute (``--absolute [TREE [TREE2]]``, default this tree): µs of engine-thread CPU a
reading on a Copenhagen night from a backlog — 10,000 lights and 200 meters (2 % of the
readings, with a real billing store) each reporting every 10 s, motion on 10 % of the light
readings, a few failed lamps, one district's NO2 high, the month ending two minutes in (every
meter settles once), the lights acknowledging every command, the engine's state saved every
1,000 readings — fed one reading at a time
(``on_reading``) and in batches of one socket read (``on_readings``, where the tree has it).
Each figure is the median of ``--repeats`` fresh engines; the first interval (every light's
first command) is warm-up. The engine's figure (readings and acks) and the state saves'
(``RuleStateStore.save``: the engine's snapshot and the SQL it becomes) are given apart.
With two trees their engines run interleaved, chunk by chunk, the order alternating, as in
the two-tree mode. A digest of the commands (device, level, reason, ts, hold), settlements
and alerts is printed too: two trees with the same digest acted alike.

    .venv/bin/python bench/rules_cpu.py --absolute . --repeats 5 --batch 256
    .venv/bin/python bench/rules_cpu.py --absolute /tmp/before . --repeats 5 --batch 256

``--lamp-monitor`` turns on the lamp monitor (``settings.lamp_monitor`` with its defaults) in a
tree that has it, and puts every 20 lights of a district on one control cabinet.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

PACKAGES = ("rules", "citygrid", "billing", "simulators", "ingest", "gateway", "cityctl")
LAMP_MONITOR = False  # --lamp-monitor


def import_tree(root: str) -> dict:
    """The tree's modules (a fresh import: another tree's are dropped first)."""
    for k in [k for k in sys.modules if k.split(".")[0] in PACKAGES]:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        import rules
        assert rules.__file__.startswith(root), rules.__file__
        from billing import BillingStore, load_config
        from billing.config import EXAMPLE as BILLING_EXAMPLE
        from citygrid.city import COPENHAGEN
        from rules.engine import RuleEngine
        from rules.loader import DEFAULT_RULES, load
        from rules.state import RuleStateStore
        from simulators.fleetgen import generate
    finally:
        sys.path.remove(root)
    ruleset = load(DEFAULT_RULES)
    if LAMP_MONITOR:
        import dataclasses

        from rules import model
        if hasattr(model, "LampMonitor"):
            ruleset = dataclasses.replace(ruleset, settings=ruleset.settings.model_copy(
                update={"lamp_monitor": model.LampMonitor()}))
    return {"RuleEngine": RuleEngine, "ruleset": ruleset, "city": COPENHAGEN,
            "RuleStateStore": RuleStateStore, "generate": generate,
            "BillingStore": BillingStore, "billing_config": load_config(BILLING_EXAMPLE)}


class Null:
    def command(self, *a): pass
    def publish(self, *a): pass
    def alert(self, *a): pass
    def points(self, *a): pass


class Recorder:
    """Keeps what the digest needs (cheap: a tuple a command)."""

    def __init__(self) -> None:
        self.commands: list[tuple] = []
        self.published: list[tuple] = []
        self.alerts: list[tuple] = []
        self.unacked: list[tuple[str, dict]] = []  # the lights acknowledge every command

    def command(self, device, payload, expiry_s):
        self.commands.append((payload["ts"], device.device_id, payload["brightness_pct"],
                              payload["reason"], payload.get("hold_s")))
        self.unacked.append((device.device_id, {"id": payload["id"], "ok": True}))

    def publish(self, topic, payload, qos, retain):
        self.published.append((topic, payload))

    def alert(self, alert, raised):
        self.alerts.append((alert.key, raised, alert.since_ms if raised else alert.cleared_ms,
                            alert.message))

    def points(self, points):
        pass

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (sorted(self.commands), sorted(self.published), sorted(self.alerts)):
            h.update(repr(part).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- two trees


def compare(before: str, after: str, batch: int) -> None:
    def load_tree(root):
        m = import_tree(root)
        fleet = m["generate"](m["city"], 3000, 0, seed=5)
        engine = m["RuleEngine"](m["ruleset"], fleet, m["city"], Null())
        store = m["RuleStateStore"](Path(tempfile.mkdtemp()) / "rules.sqlite")
        t0 = int(datetime(2026, 11, 27, 22, 0, tzinfo=m["city"].tz).timestamp() * 1000)
        return engine, store, t0, [d.device_id for d in fleet]

    trees = {"before": load_tree(str(Path(before).resolve())),
             "after": load_tree(str(Path(after).resolve()))}
    rng = random.Random(5)
    ids = trees["after"][3]
    n = 120_000
    readings = [(rng.choice(ids), {"seq": i, "brightness_pct": 30.0, "power_w": 16.7,
                 "energy_wh": 1.0, "lux": 0.5, "motion": rng.random() < 0.05})
                for i in range(n)]
    cpu = {k: 0.0 for k in trees}
    chunk = 3000
    order = list(trees)
    for c in range(0, n, chunk):
        order.reverse()  # alternate who goes first
        for name in order:
            engine, store, t0, _ = trees[name]
            batched = batch and hasattr(engine, "on_readings")
            step = batch or 1
            c0 = time.thread_time()
            for b in range(c, c + chunk, step):
                end = min(c + chunk, b + step)
                if batched:
                    engine.on_readings([(d, r, t0 + i * 2 // 3) for i in range(b, end)
                                        for d, r in (readings[i],)])
                else:
                    for i in range(b, end):
                        d, r = readings[i]
                        engine.on_reading(d, r, t0 + i * 2 // 3)
                if b // 300 != (end - 1) // 300 or b % 300 == 0:  # a save every 300
                    store.save(engine)
            if c >= 6000:  # the first 6,000: warm-up (every light's baseline)
                cpu[name] += time.thread_time() - c0
    for name, (engine, store, _, _) in trees.items():
        store.flush()
        store.close()
        print(f"{name}: {cpu[name] / (n - 6000) * 1e6:.2f} µs engine-thread CPU per reading, "
              f"commands {engine.commands_sent}")


# --------------------------------------------------------------------------- absolute

LIGHTS, METERS, INTERVAL_MS = 10_000, 200, 10_000


def night(m: dict, n: int) -> tuple:
    """The fleet and ``n`` readings of the night, in time order (the same every run)."""
    city = m["city"]
    fleet = m["generate"](city, LIGHTS, METERS, seed=5)
    if LAMP_MONITOR:
        fleet = _with_cabinets(fleet)
    rng = random.Random(7)
    t0 = int(datetime(2026, 11, 30, 23, 58, tzinfo=city.tz).timestamp() * 1000)
    devices = list(fleet)
    phase = {d.device_id: rng.randrange(INTERVAL_MS) for d in devices}
    devices.sort(key=lambda d: phase[d.device_id])
    failed = {d.device_id for d in devices if d.kind == "streetlight" and rng.random() < 0.003}
    smoggy = devices[0].district if devices[0].kind == "streetlight" else "indre-by"
    register = {d.device_id: rng.uniform(1_000, 40_000) for d in devices if d.kind == "meter"}
    energy = {d.device_id: rng.uniform(50_000, 400_000) for d in devices}
    seq = dict.fromkeys(phase, 0)
    readings = []
    k = 0
    while len(readings) < n:
        for d in devices:
            if len(readings) >= n:
                break
            ts = t0 + k * INTERVAL_MS + phase[d.device_id]
            seq[d.device_id] += 1
            if d.kind == "meter":
                watts = rng.uniform(200, 3000) if d.profile != "business" else \
                    rng.uniform(2000, 30000)
                register[d.device_id] += watts * INTERVAL_MS / 3_600_000_000
                fields = {"seq": seq[d.device_id], "energy_kwh": round(register[d.device_id], 4),
                          "power_w": round(watts, 1), "voltage_v": round(rng.gauss(230, 1.5), 1)}
            else:
                power = 0.5 if d.device_id in failed else (d.rated_w or 0) * 0.3 * 1.08 + 0.5
                energy[d.device_id] += power * INTERVAL_MS / 3_600_000
                fields = {"seq": seq[d.device_id], "brightness_pct": 30.0,
                          "power_w": round(power, 2), "energy_wh": round(energy[d.device_id], 3),
                          "lux": round(rng.uniform(0.05, 0.6), 2),
                          "motion": rng.random() < 0.10, "motion_count": 0,
                          "temp_c": round(rng.gauss(4, 0.3), 2),
                          "no2_ugm3": round(rng.gauss(240 if d.district == smoggy else 40, 2), 1),
                          "pm25_ugm3": round(rng.gauss(8, 1), 1)}
                if fields["motion"]:
                    fields["motion_count"] = 1
            readings.append((d.device_id, fields, ts))
        k += 1
    return fleet, readings


def _with_cabinets(fleet):
    """Every 20 lights of a district (in fleet order) on one cabinet."""
    import dataclasses

    counts: dict[str, int] = {}
    devices = []
    for d in fleet:
        if d.kind == "streetlight" and hasattr(d, "cabinet"):
            n = counts[d.district] = counts.get(d.district, -1) + 1
            d = dataclasses.replace(d, cabinet=f"cab-{d.district}-{n // 20:03d}")
        devices.append(d)
    return type(fleet)(devices)


class NightRun:
    """One fresh engine through the night, a chunk of ``SAVE_EVERY`` readings at a time
    (then the lights' acks and a state save, as the runner does every 0.2 s); CPU counted
    after the warm-up, in the engine (readings, acks) and in the state saves apart."""

    SAVE_EVERY = 1000  # the runner saves every 0.2 s: 1,000 readings at 5,000/s

    def __init__(self, m: dict, fleet, readings: list, batch: int, warmup: int):
        tmp = Path(tempfile.mkdtemp(prefix="rules-cpu-"))
        self.billing = m["BillingStore"](tmp / "billing.sqlite", m["billing_config"], fleet,
                                         m["city"].tz)
        self.out = Recorder()
        self.engine = m["RuleEngine"](m["ruleset"], fleet, m["city"], self.out,
                                      billing=self.billing)
        self.store = m["RuleStateStore"](tmp / "rules.sqlite")
        self.readings, self.batch, self.warmup = readings, batch, warmup
        self.on_readings = getattr(self.engine, "on_readings", None) if batch else None
        self.cpu = self.saving = 0.0

    def chunks(self) -> range:
        return range(0, len(self.readings), self.SAVE_EVERY)

    def run(self, start: int) -> None:
        engine, readings, out = self.engine, self.readings, self.out
        end = min(len(readings), start + self.SAVE_EVERY)
        c0 = time.thread_time()
        if self.on_readings is not None:
            for b in range(start, end, self.batch):
                self.on_readings(readings[b:min(end, b + self.batch)])
        else:
            on_reading = engine.on_reading
            for device_id, fields, ts in readings[start:end]:
                on_reading(device_id, fields, ts)
        acks, out.unacked = out.unacked, []
        for device_id, ack in acks:  # the lights' acks, a second or so later
            engine.on_ack(device_id, ack)
        c1 = time.thread_time()
        self.store.save(engine)
        if start >= self.warmup:
            self.cpu += c1 - c0
            self.saving += time.thread_time() - c1

    def finish(self) -> tuple[float, float, str, dict]:
        """µs a reading in the engine and in the saves, the digest, counts."""
        self.store.flush()
        self.store.close()
        self.billing.close()
        out = self.out
        counts = {"commands": len(out.commands), "settlements": len(out.published),
                  "alerts": len(out.alerts)}
        per = 1e6 / (len(self.readings) - self.warmup)
        return self.cpu * per, self.saving * per, out.digest(), counts


def run_night(m: dict, fleet, readings: list, batch: int, warmup: int
              ) -> tuple[float, float, str, dict]:
    run = NightRun(m, fleet, readings, batch, warmup)
    for start in run.chunks():
        run.run(start)
    return run.finish()


def _report(title: str, results: dict, digests: dict) -> None:
    print(title)
    for name, values in results.items():
        engine = statistics.median(v[0] for v in values)
        saves = statistics.median(v[1] for v in values)
        total = statistics.median(v[0] + v[1] for v in values)
        print(f"  {name:>26}: engine {engine:.2f} µs (runs "
              f"{', '.join(f'{v[0]:.2f}' for v in values)}); state saves {saves:.2f}; both "
              f"{total:.2f}; digest {', '.join(sorted(digests[name]))}")


def absolute(trees: list[str], repeats: int, batch: int, n: int) -> None:
    """Each tree's engines through the same night; with two trees, interleaved chunk by
    chunk (who goes first alternating), so the machine's load falls on both alike."""
    loaded = []
    for tree in trees:
        m = import_tree(str(Path(tree).resolve()))
        loaded.append((tree, m))
    fleet, readings = night(loaded[-1][1], n)  # (the same from every tree: a seeded city)
    warmup = LIGHTS + METERS
    modes = []
    for tree, m in loaded:
        label = "" if len(loaded) == 1 else f"{tree} "
        modes.append((f"{label}on_reading", m, 0))
        if batch and hasattr(m["RuleEngine"], "on_readings"):
            modes.append((f"{label}on_readings({batch})", m, batch))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in modes}
    digests: dict[str, set] = {name: set() for name, _, _ in modes}
    for r in range(repeats):
        runs = [(name, NightRun(m, fleet, readings, b, warmup)) for name, m, b in modes]
        for i, start in enumerate(runs[0][1].chunks()):
            for _, run in (runs if (i + r) % 2 == 0 else runs[::-1]):
                run.run(start)
        for name, run in runs:
            us, save_us, digest, counts = run.finish()
            results[name].append((us, save_us))
            digests[name].add(digest)
            print(f"  repeat {r + 1} {name}: engine {us:.2f} µs/reading, state saves "
                  f"{save_us:.2f}  {counts}  digest {digest}", flush=True)
    _report(f"{n:,} readings ({LIGHTS:,} lights, {METERS} meters, every "
            f"{INTERVAL_MS // 1000} s, motion on 10 %), {repeats} repeats, first {warmup:,} "
            "readings warm-up; µs of engine-thread CPU a reading, medians:", results, digests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("trees", nargs="*", help="BEFORE AFTER (two-tree mode), or with "
                    "--absolute one TREE (default .) or two, interleaved")
    ap.add_argument("--absolute", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=0,
                    help="readings a batch for on_readings (0: on_reading only)")
    ap.add_argument("--readings", type=int, default=250_000)
    ap.add_argument("--lamp-monitor", action="store_true",
                    help="turn the lamp monitor on (trees that have it), lights on cabinets")
    args = ap.parse_args()
    global LAMP_MONITOR
    LAMP_MONITOR = args.lamp_monitor
    if args.absolute:
        if len(args.trees) > 2:
            ap.error("--absolute takes one tree or two")
        absolute(args.trees or ["."], args.repeats, args.batch, args.readings)
    elif len(args.trees) == 2:
        compare(*args.trees, args.batch)
    else:
        ap.error("give BEFORE AFTER, or --absolute [TREE]")


if __name__ == "__main__":
    main()
