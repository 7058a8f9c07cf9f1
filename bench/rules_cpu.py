"""The rule engine's CPU per reading, two checkouts side by side in one process.

Both trees' engines get the same readings (Copenhagen rules, 3,000 lights, a night, motion on
5 % of readings), interleaved in chunks with the order alternating, and each tree's
engine-thread CPU is summed: load from elsewhere on a shared machine falls on both alike, so
their ratio is steadier than either figure.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/rules_cpu.py /tmp/before .
"""

import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def load_tree(root):
    for k in [k for k in sys.modules
              if k.split(".")[0] in ("rules", "citygrid", "billing", "simulators", "ingest",
                                     "gateway", "cityctl")]:
        del sys.modules[k]
    sys.path.insert(0, root)
    import rules
    assert rules.__file__.startswith(root), rules.__file__
    from citygrid.city import COPENHAGEN
    from rules.engine import RuleEngine
    from rules.loader import DEFAULT_RULES, load
    from rules.state import RuleStateStore
    from simulators.fleetgen import generate
    sys.path.remove(root)
    fleet = generate(COPENHAGEN, 3000, 0, seed=5)
    class Null:
        def command(self, *a): pass
        def publish(self, *a): pass
        def alert(self, *a): pass
        def points(self, *a): pass
    engine = RuleEngine(load(DEFAULT_RULES), fleet, COPENHAGEN, Null())
    store = RuleStateStore(Path(tempfile.mkdtemp()) / "rules.sqlite")
    t0 = int(datetime(2026, 11, 27, 22, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)
    return engine, store, t0, [d.device_id for d in fleet]

if len(sys.argv) != 3:
    sys.exit(__doc__)
trees = {"before": load_tree(str(Path(sys.argv[1]).resolve())),
         "after": load_tree(str(Path(sys.argv[2]).resolve()))}
rng = random.Random(5)
ids = trees["after"][3]
N = 120_000
readings = [(rng.choice(ids), {"seq": i, "brightness_pct": 30.0, "power_w": 16.7,
             "energy_wh": 1.0, "lux": 0.5, "motion": rng.random() < 0.05}) for i in range(N)]
cpu = {k: 0.0 for k in trees}
CHUNK = 3000
order = list(trees)
for c in range(0, N, CHUNK):
    order.reverse()  # alternate who goes first
    for name in order:
        engine, store, t0, _ = trees[name]
        c0 = time.thread_time()
        for i in range(c, c + CHUNK):
            d, r = readings[i]
            engine.on_reading(d, r, t0 + i * 2 // 3)
            if i % 300 == 0:
                store.save(engine)
        if c >= 6000:  # the first 6,000: warm-up (every light's baseline)
            cpu[name] += time.thread_time() - c0
for name, (engine, store, _, _) in trees.items():
    store.flush()
    store.close()
    print(f"{name}: {cpu[name] / (N - 6000) * 1e6:.2f} µs engine-thread CPU per reading, "
          f"commands {engine.commands_sent}")
