"""The demo city's winter night: how much lighting energy the rules save against all-night-full.

The simulator's own devices (``simulators``: the fleet `citygrid up` generates, the same
seed, schedule, traffic, presence events and controllers) and a rule engine (``rules``) run
in one process in event time, no broker: every reading, periodic or a motion event, goes to
the engine in time order, and every command the engine issues is applied to its simulated
light at once (``StreetlightSim.command``), as the light would take it off the wire. Readings
from the meters play no part in the lighting and are left out.

The saving is the rule engine's own (``rules/energy.py``, measurement citygrid_lighting): the
power each reading reports, integrated between a light's readings, against the baseline of
every light at full power (rated × 1.08 + 0.5 W) whenever the safety floor is on (the sun
below −4°). It is printed overall and per district (the engine's points) and per road class
(the same sums, kept here by the light's road), for each rule file given.

    .venv/bin/python bench/demo_night.py                      # copenhagen.yaml vs demo-city.yaml
    .venv/bin/python bench/demo_night.py --streetlights 40 --interval 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from citygrid.city import city as city_profile  # noqa: E402
from citygrid.fleet import Fleet  # noqa: E402
from citygrid.settings import MqttUrl  # noqa: E402
from rules import load  # noqa: E402
from rules.energy import MAX_GAP_MS, STANDBY_W  # noqa: E402
from rules.engine import RuleEngine  # noqa: E402
from simulators import Engine, SimConfig, generate  # noqa: E402

EXAMPLES = ROOT / "rules" / "examples"
RULES = (EXAMPLES / "copenhagen.yaml", EXAMPLES / "demo-city.yaml")
STEP_MS = 1000  # event time advances a second at a time, or to what comes due next


class _Inbox:
    """Stands in for a device's connection: what its light publishes is kept here."""

    dropped = False

    def __init__(self, out: list, i: int):
        self.out, self.i = out, i

    def put(self, part: bytes, payloads: list[bytes]) -> None:
        self.out.extend((self.i, p) for p in payloads)

    def drop(self) -> None:
        pass

    def revive(self) -> None:
        pass


class _Outbox:
    """The rule engine's outbox: commands go straight to the simulated lights."""

    def __init__(self, sim: Engine):
        self.lights = {d.spec.device_id: d for d in sim.devices}
        self.commands = 0
        self.energy: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # by district

    def command(self, device, payload: dict, expiry_s: float) -> None:
        self.commands += 1
        self.lights[device.device_id].command(orjson.dumps(payload), payload["ts"])

    def publish(self, *args) -> None:
        pass

    def alert(self, *args) -> None:
        pass

    def points(self, points: list) -> None:
        for p in points:
            if p.measurement == "citygrid_lighting":
                used = self.energy[p.tags["district"]]
                used[0] += p.fields["energy_wh"]
                used[1] += p.fields["baseline_wh"]


def night(rules_path: Path, fleet: Fleet, city, start_ms: int, hours: float,
          interval_s: float, seed: int = 1) -> dict:
    """One night of ``fleet``'s lights under ``rules_path``: the saving, in %, overall, per
    district and per road class, with the readings, events and commands it took."""
    lights = Fleet(d for d in fleet if d.kind == "streetlight")
    sim = Engine(MqttUrl.parse("mqtt://127.0.0.1:1"), lights, city,
                 SimConfig(start_ms=start_ms, interval_s=interval_s, seed=seed,
                           mode="per-device"))
    out: list[tuple[int, bytes]] = []
    sim.connection_of = [_Inbox(out, i) for i in range(len(sim.devices))]
    outbox = _Outbox(sim)
    engine = RuleEngine(load(rules_path), lights, city, outbox, track_acks=False)
    loss = engine.ruleset.settings.lamp_loss
    by_road: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    last: dict[str, int] = {}
    ids = [d.spec.device_id for d in sim.devices]
    specs = lights.by_id
    end_ms = start_ms + int(hours * 3_600_000)
    readings = 0
    t0 = time.process_time()
    now = start_ms
    while now < end_ms:
        sim._publish_due_per_device(now)  # noqa: SLF001 (the engine's loop, without sockets)
        for i, payload in out:
            reading = orjson.loads(payload)
            ts = reading.pop("ts")
            device_id = ids[i]
            engine.on_reading(device_id, reading, ts)
            readings += 1
            prev = last.get(device_id)
            last[device_id] = ts
            if prev is not None and 0 < ts - prev <= MAX_GAP_MS:  # as rules/energy.py
                spec = specs[device_id]
                hours_ = (ts - prev) / 3_600_000
                road = by_road[spec.road or "(none)"]
                road[0] += reading["power_w"] * hours_
                road[1] += ((spec.rated_w or 0.0) * (1 + loss) + STANDBY_W) * hours_ \
                    if engine.floor_active(ts) else reading["power_w"] * hours_
        out.clear()
        engine.advance(now)
        # On by a second, or to the next thing due if that is later: a reading, an event, a
        # hold running out, a `for:` ending; at least once a minute (the energy's points).
        due = [sim.schedule.next_due or end_ms, now + 60_000]
        for heap in (sim.events, engine._expiries, engine._pending):  # noqa: SLF001
            if heap:
                due.append(int(heap[0][0]))
        now = max(now + STEP_MS, min(due))
    engine.advance(end_ms + 60_000)  # the last minute's points

    def saving(pairs) -> dict:
        used = sum(p[0] for p in pairs)
        baseline = sum(p[1] for p in pairs)
        return {"energy_kwh": round(used / 1000, 3), "baseline_kwh": round(baseline / 1000, 3),
                "saved_pct": round((1 - used / baseline) * 100, 1) if baseline else 0.0}

    roads = defaultdict(int)
    for d in lights:
        roads[d.road or "(none)"] += 1
    return {
        "rules": str(rules_path.relative_to(ROOT) if rules_path.is_relative_to(ROOT)
                     else rules_path),
        "lights": len(lights), "readings": readings,
        "motion_events": sim.stats["motion_events"], "commands": outbox.commands,
        "cpu_s": round(time.process_time() - t0, 1),
        "overall": saving(outbox.energy.values()),
        "districts": {k: saving([v]) for k, v in sorted(outbox.energy.items())},
        "roads": {k: {**saving([v]), "lights": roads[k]} for k, v in sorted(by_road.items())},
        "roads_overall": saving(by_road.values()),
    }


def _table(result: dict) -> str:
    rows = [f"{result['rules']}: {result['lights']} lights, {result['readings']:,} readings "
            f"({result['motion_events']:,} motion events), {result['commands']:,} commands, "
            f"{result['cpu_s']} s CPU",
            f"  overall        {result['overall']['saved_pct']:5.1f} % saved   "
            f"({result['overall']['energy_kwh']:.1f} of {result['overall']['baseline_kwh']:.1f}"
            " kWh)"]
    for name, s in result["districts"].items():
        rows.append(f"  {name:<14} {s['saved_pct']:5.1f} %")
    for name, s in result["roads"].items():
        rows.append(f"  road {name:<9} {s['saved_pct']:5.1f} %   ({s['lights']} lights)")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--city", default="copenhagen")
    ap.add_argument("--streetlights", type=int, default=300, help="as `citygrid up` (300)")
    ap.add_argument("--seed", type=int, default=1, help="the fleet's and the simulator's")
    ap.add_argument("--date", default="2026-12-01",
                    help="the evening the night begins (a weekday in December)")
    ap.add_argument("--from", dest="start", default="16:00")
    ap.add_argument("--hours", type=float, default=16.0, help="16:00–08:00: 16")
    ap.add_argument("--interval", type=float, default=60.0,
                    help="simulated s between a light's readings (`up`: 60)")
    ap.add_argument("--rules", type=Path, action="append",
                    help="rule files (default: copenhagen.yaml and demo-city.yaml)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    city = city_profile(args.city)
    fleet = generate(city, args.streetlights, 0, args.seed)
    hour, minute = map(int, args.start.split(":"))
    start = datetime.fromisoformat(args.date).replace(hour=hour, minute=minute, tzinfo=city.tz)
    print(f"{city.name}, {start:%a %Y-%m-%d %H:%M} + {args.hours:g} h, a reading every "
          f"{args.interval:g} s", flush=True)
    results = []
    for path in args.rules or RULES:
        result = night(path.resolve(), fleet, city, int(start.timestamp() * 1000), args.hours,
                       args.interval, args.seed)
        results.append(result)
        print(_table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"start": start.isoformat(), "hours": args.hours,
                                         "interval_s": args.interval,
                                         "end": (start + timedelta(hours=args.hours)).isoformat(),
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
