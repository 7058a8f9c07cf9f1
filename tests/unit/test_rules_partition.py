"""Partitioned rule engines: N engines, each owning some districts and fed its own devices'
readings and those of the foreign border devices it needs (RuleEngine.foreign_inputs), act
as one engine over the whole city — the same commands, alerts, settlements and energy
points, split between them.

The condition (rules/engine.py, set_partition): every engine sees the same event time. The
tests give it three ways: the timestamps of the readings an engine does not take handed to
``advance``; the whole stream (a foreign reading that reaches none of its lights only moves
its time); and a city whose devices all report at the same instants, where each engine's own
readings carry every instant and nothing else is needed. Without it — the realistic case of
workers fed only their own topics — each light still gets the same commands in the same
order, those of timers (holds running out, `for:`, absences) at most one own reading later.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from datetime import datetime

import pytest

from billing import BillingStore, load_config
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.partition import Partition
from rules.engine import RuleEngine, crossing_rules, foreign_inputs, partition_caveats
from rules.loader import DEFAULT_RULES, load, parse_text
from rules.snapshot import Snapshot

TZ = COPENHAGEN.tz
NIGHT = int(datetime(2026, 11, 27, 22, 0, tzinfo=TZ).timestamp() * 1000)
# 28 m apart: within 60 m are lights 28, 40 (diagonally) and 56 m off, not 63 or 84 m — no
# distance near a radius the rules use (35, 45, 60 m).
STEP_LAT, STEP_LON = 28 / 111_195, 28 / (111_195 * math.cos(math.radians(55.70)))
DISTRICTS = ("aaa", "bbb", "ccc", "ddd")


def grid_fleet() -> Fleet:
    """12 × 8 lights 28 m apart, three districts of four columns side by side (so many have
    neighbours within 60 m across a border), one far-off light of a fourth, and meters."""
    devices = []
    for col in range(12):
        for row in range(8):
            devices.append(FleetDevice(
                f"sl-{col:02d}{row:02d}", "streetlight", DISTRICTS[col // 4],
                55.70 + row * STEP_LAT, 12.55 + col * STEP_LON, rated_w=40.0 + col))
    devices.append(FleetDevice("sl-far", "streetlight", "ddd", 55.80, 12.40, rated_w=50.0))
    for i, district in enumerate(DISTRICTS * 2):
        devices.append(FleetDevice(f"m-{i:02d}", "meter", district, 55.69, 12.55 + i * 0.001,
                                   account_id=f"acc-{i:02d}", tariff="business-flat",
                                   profile="business", max_power_w=200_000.0))
    return Fleet(devices)


MORE_RULES = """\
version: 1
settings:
  safety_floor: {level: 20, when: "sun.elevation < -4"}
rules:
  - id: motion-boost
    when: {reading: {kind: streetlight}}
    if: "reading.motion and sun.elevation < -4"
    then:
      - set_light: {level: 100, priority: sensor, hold: 60s, scope: neighbours, radius_m: 60}
  - id: sustained
    description: a crossing rule with for and hysteresis, held while active
    when: {reading: {kind: streetlight, district: [aaa, bbb, ccc]}}
    if: "reading.motion_count >= 3"
    clear_if: "reading.motion_count == 0"
    for: 30s
    then:
      - set_light: {level: 85, priority: safety, scope: neighbours, radius_m: 45}
      - alert: {message: "sustained traffic at {device.id}", per: district}
      - publish: {topic: "city/v1/{device.district}/rules/sustained",
                  payload: {"at": "{device.id}"}}
  - id: silent
    description: a crossing absence
    when: {absent: {for: 2m, select: {kind: streetlight}}}
    then:
      - set_light: {level: 60, priority: safety, scope: neighbours, radius_m: 35}
      - alert: {severity: major, message: "{device.id} is silent"}
  - id: smog
    when: {reading: {kind: streetlight}}
    if: "avg_over('no2_ugm3', '1m') > 200"
    for: 1m
    then:
      - set_light: {level: 90, priority: safety, scope: district}
      - alert: {message: "NO2 {reading.no2_ugm3} in {device.district}", per: district}
  - id: evening
    when: {schedule: {from: "22:04", to: "22:09", select: {district: [bbb, ccc]}}}
    then:
      - set_light: {level: 70, priority: program}
      - alert: {message: "evening programme"}
      - publish: {topic: "city/v1/rules/evening", payload: "on"}
  - id: lamp
    when: {reading: {kind: streetlight}}
    if: "light.level > 0 and reading.power_w < 0.1 * device.rated_w"
    for: 2m
    then:
      - alert: {severity: major, message: "lamp {device.id}: {reading.power_w} W"}
  - id: settle
    when: {reading: {kind: meter}}
    if: "meter.unbilled_kwh >= 10"
    then:
      - settle: {}
"""


def stream(fleet: Fleet, *, minutes: int = 14, synchronized: bool = False,
           seed: int = 4) -> list[tuple[str, dict, int]]:
    """Every device every 10 s (each at its own phase, or all at once), in time order:
    motion on 12 % of the light readings, bursts of traffic, three lights silent for a
    while (one on a border), smog in bbb, two failed lamps, meters drawing 150 kW."""
    rng = random.Random(seed)
    devices = list(fleet)
    phase = {d.device_id: 0 if synchronized else rng.randrange(10_000) for d in devices}
    devices.sort(key=lambda d: phase[d.device_id])
    silent = {"sl-0303": (4, 8), "sl-0404": (3, 9), "sl-1002": (5, 7)}
    failed = {"sl-0105", "sl-0906"}
    register = {d.device_id: 1000.0 + i for i, d in enumerate(devices) if d.kind == "meter"}
    out = []
    for k in range(minutes * 6):
        for d in devices:
            ts = NIGHT + k * 10_000 + phase[d.device_id]
            minute = (ts - NIGHT) / 60_000
            gap = silent.get(d.device_id)
            if gap and gap[0] <= minute < gap[1]:
                continue
            if d.kind == "meter":
                register[d.device_id] += 150_000 * 10 / 3_600_000  # kWh in 10 s
                out.append((d.device_id, {"seq": k, "energy_kwh": round(register[d.device_id], 4),
                                          "power_w": 150_000.0}, ts))
                continue
            burst = 6 <= minute < 9 and d.device_id.startswith(("sl-03", "sl-04", "sl-07"))
            count = rng.randint(3, 5) if burst and rng.random() < 0.9 else (
                1 if rng.random() < 0.12 else 0)
            smoggy = d.district == "bbb" and minute >= 3
            out.append((d.device_id, {
                "seq": k, "brightness_pct": 30.0,
                "power_w": 0.5 if d.device_id in failed else 14.0,
                "energy_wh": 1000.0 + k, "lux": 0.4, "motion": count > 0, "motion_count": count,
                "no2_ugm3": round(rng.gauss(240 if smoggy else 40, 5), 1)}, ts))
    return out


class Recorder:
    def __init__(self) -> None:
        self.commands: list[tuple] = []
        self.alerts: list[tuple] = []
        self.published: list[tuple] = []
        self.lighting: list[tuple] = []
        self.unacked: list[tuple[str, str]] = []

    def command(self, device, payload, expiry_s):
        self.commands.append((device.device_id, payload["brightness_pct"], payload["reason"],
                              payload["ts"], payload.get("hold_s")))
        self.unacked.append((device.device_id, payload["id"]))

    def publish(self, topic, payload, qos, retain):
        body = json.loads(payload) if payload.startswith(b"{") else payload.decode()
        if isinstance(body, dict) and "prev_hash" in body:  # a settlement: its place in the
            body = {k: v for k, v in body.items() if k not in ("seq", "prev_hash", "hash")}
        self.published.append((topic, json.dumps(body, sort_keys=True)))  # ledger aside

    def alert(self, alert, raised):
        # A command id ends in the engine's own count of commands ("sl-1-<ts>-<n>"): N
        # engines number theirs apart, so a missing-ack message is compared without it.
        message = re.sub(r"(for command \S+-\d+)-\d+$", r"\1", alert.message)
        self.alerts.append((alert.key, raised, alert.since_ms if raised else alert.cleared_ms,
                            alert.severity, alert.scope, message))

    def points(self, points):
        self.lighting += [(p.tags["district"], p.ts_ms, tuple(sorted(p.fields.items())))
                          for p in points if p.measurement == "citygrid_lighting"]


DEAF = {"sl-0202", "sl-0707"}  # lights that never acknowledge: missing-ack alerts


class City:
    """One engine, or N owning the districts round robin (as `rules run --workers N`)."""

    def __init__(self, ruleset, fleet: Fleet, workers: int, tmp_path, name: str,
                 hashed: bool = False):
        self.fleet = fleet
        districts = sorted({d.district for d in fleet})
        self.owned = [None] if workers == 0 else [frozenset(districts[i::workers])
                                                  for i in range(workers)]
        if hashed:  # `rules run --partition i/N`: by the districts' stable hash
            self.owned = [frozenset(d for d in districts if Partition(i, workers).owns(d))
                          for i in range(workers)]
        self.billing = BillingStore(tmp_path / f"{name}-billing.sqlite", load_config(None),
                                    fleet, TZ)  # shared by the workers, as in data_dir
        self.boxes = [Recorder() for _ in self.owned]
        self.engines = [RuleEngine(ruleset, fleet, COPENHAGEN, box, billing=self.billing,
                                   owned_districts=owned)
                        for box, owned in zip(self.boxes, self.owned, strict=True)]
        self.inputs = [None if owned is None else
                       {d.device_id for d in fleet if d.district in owned} | e.foreign_inputs()
                       for e, owned in zip(self.engines, self.owned, strict=True)]

    def feed(self, batch: list, time: str) -> None:
        """One socket read each: an engine's own and foreign-input readings; the others'
        timestamps by ``time``: "ticks" (advance), "all" (the readings too), "none"."""
        for engine, inputs in zip(self.engines, self.inputs, strict=True):
            if inputs is None or time == "all":
                engine.on_readings(batch)
                continue
            mine: list = []
            for r in batch:
                if r[0] in inputs:
                    mine.append(r)
                elif time == "ticks":
                    if mine:
                        engine.on_readings(mine)
                        mine = []
                    engine.advance(r[2])
            if mine:
                engine.on_readings(mine)

    def acknowledge(self) -> None:
        for engine, box in zip(self.engines, self.boxes, strict=True):
            acks, box.unacked = box.unacked, []
            for device_id, cmd_id in acks:
                if device_id not in DEAF:
                    engine.on_ack(device_id, {"id": cmd_id, "ok": True})

    def override(self, device_id: str, level: float, until_s: float) -> None:
        for engine in self.engines:  # the runner routes an override to its light's owner
            if engine.owns(self.fleet.by_id[device_id]):
                now = engine.watermark
                engine.set_override(device_id, level, now, now + int(until_s * 1000))

    def run(self, readings: list, time: str, *, restart_at: int | None = None,
            ruleset=None) -> None:
        saved = [Snapshot() for _ in self.engines]
        by_second: dict[int, list] = defaultdict(list)
        for r in readings:
            by_second[(r[2] - NIGHT) // 1000].append(r)
        for second in sorted(by_second):
            self.feed(by_second[second], time)
            self.acknowledge()
            if second == 400:
                self.override("sl-0500", 5.0, 90)
            for engine, snap in zip(self.engines, saved, strict=True):
                s = engine.snapshot()
                snap.lights.update(s.lights)
                snap.instances.update(s.instances)
                snap.alerts.update(s.alerts)
                snap.watermark = s.watermark
            if second == restart_at:  # every engine stops and comes back from its state
                self.engines = [self._again(ruleset, e, snap)
                                for e, snap in zip(self.engines, saved, strict=True)]

    def _again(self, ruleset, engine: RuleEngine, snap: Snapshot) -> RuleEngine:
        fresh = RuleEngine(ruleset, self.fleet, COPENHAGEN, engine.outbox, billing=self.billing,
                           owned_districts=engine.owned_districts)
        fresh.restore(snap)
        return fresh

    def finish(self, until_ms: int) -> None:
        for engine in self.engines:
            engine.advance(until_ms)

    # what came out, all engines together
    def commands(self) -> list:
        return sorted(c for box in self.boxes for c in box.commands)

    def alerts(self) -> list:
        return sorted(a for box in self.boxes for a in box.alerts)

    def published(self) -> list:
        return sorted(p for box in self.boxes for p in box.published)

    def lighting(self) -> list:
        return sorted(p for box in self.boxes for p in box.lighting)

    def health(self) -> dict:
        total: dict = defaultdict(Counter)
        for engine in self.engines:
            for rule_id, h in engine.health.items():
                total[rule_id].update(evaluations=h.evaluations, fired=h.fired, errors=h.errors)
        return {k: dict(v) for k, v in total.items()}

    def levels(self) -> dict:
        return {d: s.level for e in self.engines for d, s in e.lights.items()}


RULESETS = {"copenhagen": lambda: load(DEFAULT_RULES), "more": lambda: parse_text(MORE_RULES)}


def _same(one: City, many: City) -> None:
    assert many.commands() == one.commands()
    assert many.alerts() == one.alerts()
    assert many.published() == one.published()  # settlements, publishes (ledger order aside)
    assert many.lighting() == one.lighting()
    assert many.health() == one.health()
    assert many.levels() == one.levels()


@pytest.mark.parametrize("rules", sorted(RULESETS))
@pytest.mark.parametrize("workers, time, hashed", [(2, "ticks", False), (3, "ticks", False),
                                                   (3, "all", False), (3, "ticks", True)])
def test_partitioned_engines_act_as_one(tmp_path, rules, workers, time, hashed):
    ruleset = RULESETS[rules]()
    fleet = grid_fleet()
    readings = stream(fleet)
    one = City(ruleset, fleet, 0, tmp_path, "one")
    many = City(ruleset, fleet, workers, tmp_path, "many", hashed=hashed)
    if hashed:  # every district owned once
        assert sorted(d for o in many.owned for d in o) == sorted({d.district for d in fleet})
    for city in (one, many):
        city.run(readings, time)
        city.finish(readings[-1][2] + 300_000)
    kinds = Counter(c[2] for c in one.commands())
    assert kinds["rule:motion-boost"] > 50  # a busy night
    if rules == "more":
        assert kinds["rule:sustained"] and kinds["rule:silent"] and kinds["rule:smog"] and \
            kinds["rule:evening"]
        assert {a[0].split("@")[0] for a in one.alerts()} >= {
            "sustained", "silent", "smog", "evening", "lamp", "missing-ack"}
    assert any('"meter": "m-' in p[1] for p in one.published())  # meters settled
    # Border lights across districts took part (the fleet is built for it).
    assert all(inputs for inputs, owned in zip(many.inputs, many.owned, strict=True) if owned)
    _same(one, many)


@pytest.mark.parametrize("rules", sorted(RULESETS))
def test_devices_reporting_together_need_no_other_time(tmp_path, rules):
    """All devices at the same instants: each engine's own readings carry every instant, so
    its own and foreign-input readings alone give exactly the one engine's output."""
    ruleset = RULESETS[rules]()
    fleet = grid_fleet()
    readings = stream(fleet, synchronized=True)
    one = City(ruleset, fleet, 0, tmp_path, "one")
    many = City(ruleset, fleet, 3, tmp_path, "many")
    for city in (one, many):
        city.run(readings, "none")
        city.finish(readings[-1][2] + 300_000)
    _same(one, many)


@pytest.mark.parametrize("rules", sorted(RULESETS))
def test_restarted_from_their_state_they_still_act_as_one(tmp_path, rules):
    ruleset = RULESETS[rules]()
    fleet = grid_fleet()
    readings = stream(fleet)
    one = City(ruleset, fleet, 0, tmp_path, "one")
    many = City(ruleset, fleet, 3, tmp_path, "many")
    for city in (one, many):
        city.run(readings, "ticks", restart_at=330, ruleset=ruleset)
        city.finish(readings[-1][2] + 300_000)
    assert many.commands() == one.commands()
    assert many.alerts() == one.alerts()
    assert many.published() == one.published()
    assert many.lighting() == one.lighting()
    assert many.health() == one.health()
    assert many.levels() == one.levels()


def test_fed_only_their_own_topics_each_light_gets_the_same_commands(tmp_path):
    """No shared event time: the commands a reading causes come at the same time; those of a
    timer (a hold running out) when the engine's next own reading moves its time past it, an
    operator's override at the engine's own (earlier) watermark."""
    ruleset = load(DEFAULT_RULES)
    fleet = grid_fleet()
    readings = stream(fleet)
    one = City(ruleset, fleet, 0, tmp_path, "one")
    many = City(ruleset, fleet, 3, tmp_path, "many")
    for city in (one, many):
        city.run(readings, "none")
        city.finish(readings[-1][2] + 300_000)
    per_light: dict[str, list] = defaultdict(list)
    for c in sorted(one.commands(), key=lambda c: (c[0], c[3])):
        per_light[c[0]].append(c)
    got: dict[str, list] = defaultdict(list)
    for c in sorted(many.commands(), key=lambda c: (c[0], c[3])):
        got[c[0]].append(c)
    assert set(got) == set(per_light)
    for light, want in per_light.items():
        assert [(c[1], c[2]) for c in got[light]] == [(c[1], c[2]) for c in want], light
        for w, g in zip(want, got[light], strict=True):
            # A timer's command comes later, an override (stamped with the engine's own
            # watermark) earlier — by less than the interval between a device's readings.
            assert abs(g[3] - w[3]) <= 10_000, (light, w, g)
    assert many.published() == one.published()  # settlements come from readings
    assert many.lighting() == one.lighting()  # energy is reckoned by the readings' times


def test_foreign_inputs_are_the_border_lights_within_the_radius():
    ruleset = load(DEFAULT_RULES)
    fleet = grid_fleet()
    assert [r.id for r in crossing_rules(ruleset)] == ["motion-boost"]
    owned = frozenset({"bbb"})
    engine = RuleEngine(ruleset, fleet, COPENHAGEN, Recorder(), owned_districts=owned)
    inputs = engine.foreign_inputs()
    assert inputs == foreign_inputs(ruleset, fleet, owned)
    # Columns 4–7 are bbb; motion-boost reaches 60 m: two columns either side (28 m and 40 m
    # diagonally, 56 m straight), none further, no meter, not the far-off light.
    assert {i[3:5] for i in inputs} == {"02", "03", "08", "09"}
    assert all(fleet.by_id[i].kind == "streetlight" for i in inputs)
    by_col = Counter(i[3:5] for i in inputs)
    assert by_col["03"] == 8 and by_col["08"] == 8
    # An engine owning everything needs nothing more; one owning nothing near, nothing.
    assert RuleEngine(ruleset, fleet, COPENHAGEN, Recorder()).foreign_inputs() == frozenset()
    assert foreign_inputs(ruleset, fleet, {"ddd"}) == frozenset()
    # The rules decide: without the neighbour boost, nothing crosses.
    only_self = parse_text(MORE_RULES.replace("scope: neighbours, radius_m: 60", "scope: self")
                           .replace("scope: neighbours, radius_m: 45", "scope: self")
                           .replace("scope: neighbours, radius_m: 35", "scope: self"))
    assert crossing_rules(only_self) == []
    assert foreign_inputs(only_self, fleet, owned) == frozenset()


def test_a_foreign_reading_acts_only_on_own_lights(tmp_path):
    """Motion at a border light of aaa, in the engine owning bbb: its bbb neighbours go to
    100 %; the aaa light itself gets no command there, and no state is kept for it."""
    ruleset = load(DEFAULT_RULES)
    fleet = grid_fleet()
    box = Recorder()
    engine = RuleEngine(ruleset, fleet, COPENHAGEN, box, owned_districts={"bbb"},
                        track_acks=False)
    reading = {"seq": 1, "brightness_pct": 30.0, "power_w": 14.0, "lux": 0.4}
    engine.on_readings([("sl-0303", {**reading, "motion": True}, NIGHT),
                        ("sl-0000", {**reading, "motion": True}, NIGHT + 5)])  # far: time only
    assert {c[0] for c in box.commands} == {"sl-0402", "sl-0403", "sl-0404", "sl-0503"}
    assert all(c[1] == 100 and c[2] == "rule:motion-boost" for c in box.commands)
    assert set(engine.lights) == {c[0] for c in box.commands}
    assert engine.watermark == NIGHT + 5
    assert "sl-0000" not in engine.last_seen and "sl-0303" in engine.last_seen
    assert dict(engine.health) == {}  # a foreign reading counts in no rule's health
    assert [k for k in engine.instances] == [("motion-boost", "sl-0303")]
    # Its own light's reading: the full rules, its own command.
    engine.on_reading("sl-0600", {**reading, "motion": False}, NIGHT + 10)
    assert box.commands[-1][:3] == ("sl-0600", 30, "rule:dark-baseline")
    assert engine.health["dark-baseline"].evaluations == 1


def test_set_partition_hands_lights_over_without_commands():
    ruleset = load(DEFAULT_RULES)
    fleet = grid_fleet()
    box = Recorder()
    engine = RuleEngine(ruleset, fleet, COPENHAGEN, box, track_acks=False)
    reading = {"seq": 1, "brightness_pct": 30.0, "power_w": 14.0, "lux": 0.4, "motion": False}
    engine.on_readings([(d.device_id, reading, NIGHT + i) for i, d in enumerate(fleet)
                        if d.kind == "streetlight"])
    assert len(engine.lights) == 97
    sent = len(box.commands)
    engine.set_partition({"aaa"})
    assert len(box.commands) == sent
    assert {fleet.by_id[d].district for d in engine.lights} == {"aaa"}
    assert {fleet.by_id[k[1]].district for k in engine.instances} == {"aaa"}
    assert engine.foreign_inputs() == foreign_inputs(ruleset, fleet, {"aaa"})
    # A border light of bbb is still listened to (its reading, for its rules' timers); one
    # further in is no concern of this engine's any more.
    assert "sl-0400" in engine.foreign_inputs() and "sl-0400" in engine.last_reading
    assert "sl-0700" not in engine.last_reading and "sl-0700" not in engine.last_seen
    engine.set_override("sl-0500", 50, NIGHT + 1000)  # another engine's light: not here
    assert "sl-0500" not in engine.lights and len(box.commands) == sent
    snap = engine.snapshot()  # the lights handed over leave the saved state
    assert snap.lights["sl-0500"] is None
    engine.set_partition(None)
    assert engine.foreign_inputs() == frozenset()


def test_partition_caveats():
    fleet = grid_fleet()
    assert partition_caveats(load(DEFAULT_RULES), fleet) == []
    assert partition_caveats(parse_text(MORE_RULES), fleet) == []
    reads_level = MORE_RULES.replace('if: "reading.motion and sun.elevation < -4"',
                                     'if: "reading.motion and light.level < 100"')
    [caveat] = partition_caveats(parse_text(reads_level), fleet)
    assert "motion-boost" in caveat and "light.level" in caveat
    shared = Fleet([*[d for d in fleet if d.kind == "streetlight"],
                    FleetDevice("m-1", "meter", "aaa", 55.7, 12.5, account_id="acc",
                                tariff="business-flat"),
                    FleetDevice("m-2", "meter", "bbb", 55.7, 12.5, account_id="acc",
                                tariff="business-flat")])
    [caveat] = partition_caveats(load(DEFAULT_RULES), shared)
    assert "acc" in caveat
