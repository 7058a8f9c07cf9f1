"""The engine's fast paths give what the plain ones give: compiled conditions what the
node-by-node closures evaluate, the neighbour index what the fleet's neighbours are,
arbitration what max() picks, a batch of readings what they do one by one."""

from __future__ import annotations

import random
from datetime import datetime

import pytest

from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from rules.actions.set_light import NeighbourIndex
from rules.arbitration import RANK, LightState, Wish
from rules.context import Context
from rules.engine import RuleEngine
from rules.expr import EvalError, ExprError, compile_expression, interpret
from rules.loader import DEFAULT_RULES, load, parse_text
from simulators.fleetgen import generate

TZ = COPENHAGEN.tz
NIGHT = int(datetime(2026, 11, 27, 22, 0, tzinfo=TZ).timestamp() * 1000)
DEVICE = FleetDevice("sl-1", "streetlight", "norrebro", 55.696, 12.544, rated_w=50.0,
                     street="norrebro-s01")


class Null:
    def command(self, *a): pass
    def publish(self, *a): pass
    def alert(self, *a): pass
    def points(self, *a): pass


# --------------------------------------------------------------------------- expressions

FIELDS = ["lux", "motion", "power_w", "name", "missing", "zero", "flag", "items"]
ATOMS = [
    *[f"reading.{f}" for f in FIELDS], "device.id", "device.district", "device.rated_w",
    "device.street", "device.kind", "device.max_power_w", "device.feature", "device.colour",
    "light.level", "light.colour", "sun.elevation", "sun.azimuth", "local.hour",
    "local.minute", "local.weekday", "local.second", "meter.unbilled_kwh",
    "avg_over('lux', '5m')", "min_over('lux', '1m')", "max_over('power_w', '90s')",
    "count_over('lux', '1h')", "0", "1", "2.5", "-4", "-0.5", "1e999", "'abc'", "''", "None",
    "true", "false", "100",
]


def random_expression(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(ATOMS)
    kind = rng.randrange(8)
    sub = lambda: random_expression(rng, depth + 1)  # noqa: E731
    if kind == 0:
        return f"({sub()} {rng.choice(['and', 'or'])} {sub()}" + (
            f" {rng.choice(['and', 'or'])} {sub()})" if rng.random() < 0.4 else ")")
    if kind == 1:
        return f"(not {sub()})"
    if kind == 2:
        return f"(-{sub()})"
    if kind == 3:
        return f"({sub()} {rng.choice(['+', '-', '*', '/', '%'])} {sub()})"
    if kind in (4, 5):
        ops = ["<", "<=", ">", ">=", "==", "!="]
        chain = f"{sub()} {rng.choice(ops)} {sub()}"
        while rng.random() < 0.35:
            chain += f" {rng.choice(ops)} {sub()}"
        return f"({chain})"
    if kind == 6:
        return f"({sub()} if {sub()} else {sub()})"
    fn = rng.choice(["abs", "min", "max", "round"])
    return f"{fn}({', '.join(sub() for _ in range(rng.randrange(0, 3)))})"


def contexts(engine: RuleEngine) -> list[Context]:
    """Readings of every sort, with and without a device, light state, history."""
    readings = [
        {"lux": 0.4, "motion": True, "power_w": 3.0, "name": "x", "zero": 0, "flag": False,
         "items": [1, 2]},
        {"lux": 80, "motion": False, "power_w": None, "name": "", "zero": 0.0, "flag": True},
        {"lux": "dim", "power_w": 15, "items": {"a": 1}},
        {},
    ]
    for i, r in enumerate(readings):
        engine.on_reading("sl-1", {k: v for k, v in r.items() if k != "name"}, NIGHT + i * 1000)
    ctxs = [Context(engine, NIGHT + 5000), Context(engine, NIGHT + 5000, DEVICE),
            Context(engine, NIGHT + 12 * 3_600_000)]
    for r in readings:  # no light state: light.level is the reading's
        ctxs.append(Context(engine, NIGHT + 5000, DEVICE, {**r, "brightness_pct": 30.0}))
    engine.lights["sl-1"] = LightState("sl-1", level=55.0)
    for r in readings:
        ctxs.append(Context(engine, NIGHT + 5000, DEVICE, r))
        ctxs.append(Context(engine, NIGHT + 5000, None, r))
    engine.lights["sl-1"] = LightState("sl-1")  # commanded nothing yet
    ctxs.append(Context(engine, NIGHT + 6000, DEVICE, {"brightness_pct": 30.0}))
    ctxs.append(Context(engine, NIGHT + 6000, DEVICE, {}))
    return ctxs


def outcome(fn, ctx):
    try:
        value = fn(ctx)
    except EvalError as e:
        return ("error", str(e))
    return ("value", type(value).__name__, repr(value))


def test_compiled_expressions_evaluate_as_the_closures_do():
    engine = RuleEngine(parse_text("rules: []"), Fleet([DEVICE]), COPENHAGEN, Null())
    engine.window_spans = {"lux": 3600.0, "power_w": 90.0}  # history for the window functions
    ctxs = contexts(engine)
    rng = random.Random(11)
    compared = 0
    for _ in range(1500):
        text = random_expression(rng)
        try:
            compiled = compile_expression(text)
        except ExprError:
            continue
        reference = interpret(text)

        def closures(ctx, reference=reference, text=text):
            try:
                return reference(ctx)
            except (TypeError, ZeroDivisionError, ValueError) as e:
                raise EvalError(f"{text!r}: {e}") from None

        for ctx in ctxs:
            assert outcome(compiled, ctx) == outcome(closures, ctx), (text, ctx.reading)
            compared += 1
    assert compared > 10_000


@pytest.mark.parametrize("text", [
    "reading.motion and sun.elevation < -4 and reading.lux <= 50",
    "light.level > 0 and reading.power_w < 0.1 * device.rated_w",
    "1 < local.hour < 5", "reading.lux < reading.missing < 3", "-'a' < 3",
    "(" * 40 + "reading.lux" + ")" * 40 + " < 2", "1 / reading.zero > 0",
])
def test_known_shapes(text):
    engine = RuleEngine(parse_text("rules: []"), Fleet([DEVICE]), COPENHAGEN, Null())
    for ctx in contexts(engine):
        reference = interpret(text)

        def closures(c, reference=reference):
            try:
                return reference(c)
            except (TypeError, ZeroDivisionError, ValueError) as e:
                raise EvalError(f"{text!r}: {e}") from None

        assert outcome(compile_expression(text), ctx) == outcome(closures, ctx)


def test_an_expression_too_deep_for_the_compiler_falls_back_to_the_closures():
    text = "-" * 250 + "reading.lux > 1"  # 250 nested negations: past compile()'s nesting
    e = compile_expression(text)
    assert e.evaluate.__code__.co_filename.endswith("expr.py")  # the closures, not generated
    engine = RuleEngine(parse_text("rules: []"), Fleet([DEVICE]), COPENHAGEN, Null())
    assert e(Context(engine, NIGHT, DEVICE, {"lux": 2})) is True
    with pytest.raises(EvalError, match="bad operand type"):
        e(Context(engine, NIGHT, DEVICE, {"lux": "x"}))
    assert e.names == frozenset({"reading.lux"})
    assert compile_expression("-" * 50 + "reading.lux > 1").evaluate.__code__.co_filename \
        .startswith("<rule expression")


# --------------------------------------------------------------------------- neighbours


@pytest.mark.parametrize("radius", [25.0, 60.0, 150.0, 1000.0])
def test_the_neighbour_index_finds_what_the_fleet_does(radius):
    fleet = generate(COPENHAGEN, 3000, 20, seed=9)
    index = NeighbourIndex(fleet, radius)
    rng = random.Random(int(radius))
    devices = list(fleet)
    for d in rng.sample(devices, 300) + [d for d in devices if d.kind == "meter"][:5]:
        want = [x for x in fleet.neighbours(d.device_id, radius) if x.kind == "streetlight"]
        assert set(index.neighbours(d)) == set(want)


def test_the_neighbour_index_of_an_odd_fleet_asks_the_fleet():
    polar = Fleet([FleetDevice(f"sl-{i}", "streetlight", "north", 85 + i * 0.0002, 10.0,
                               rated_w=40.0) for i in range(20)])
    index = NeighbourIndex(polar, 60.0)
    for d in polar:
        assert index.neighbours(d) == [x for x in polar.neighbours(d.device_id, 60.0)]


# --------------------------------------------------------------------------- arbitration


def reference_decide(state: LightState, now: int, default: float, floor: float | None):
    alive = [w for w in state.wishes.values() if w.alive(now)]
    winner = max(alive, key=lambda w: (RANK[w.cls], w.level), default=None)
    level, reason = (default, "default") if winner is None else (winner.level, winner.reason)
    if floor is not None and level < floor and (winner is None or winner.cls != "override"):
        return floor, "safety:night-floor", winner, True
    return level, reason, winner, False


def test_decide_and_expire_as_before():
    rng = random.Random(3)
    for _ in range(3000):
        state = LightState("sl-1")
        for i in range(rng.randrange(0, 6)):
            w = Wish(f"k{i}", rng.choice(list(RANK)), rng.choice([0, 20, 30, 30, 100]),
                     f"r{i}", rng.choice([None, 100, 200, 300]), 0)
            state.wishes[w.key] = w
        now = rng.choice([50, 100, 150, 200, 300, 400])
        floor = rng.choice([None, 20.0])
        d = state.decide(now, 0.0, floor)
        assert (d.level, d.reason, d.winner, d.floored) == reference_decide(state, now, 0.0,
                                                                            floor)
        dead = {k for k, w in state.wishes.items() if not w.alive(now)}
        left = {k for k in state.wishes} - dead
        assert state.expire(now) == bool(dead)
        assert set(state.wishes) == left


# --------------------------------------------------------------------------- the engine


def test_the_floor_is_evaluated_once_a_second_with_the_same_answer():
    ruleset = parse_text("settings: {safety_floor: {level: 20, when: "
                         "'sun.elevation < -4 or local.minute == 7'}}\nrules: []")
    engine = RuleEngine(ruleset, Fleet([DEVICE]), COPENHAGEN, Null())
    rng = random.Random(5)
    day = NIGHT - 12 * 3_600_000
    for ts in sorted(rng.randrange(day, day + 86_400_000) for _ in range(3000)):
        for t in (ts, ts - 1, ts + 999, ts - 60_000):  # late ones too
            assert engine.floor_active(t) == bool(ruleset.floor_when(Context(engine, t)))


def test_a_batch_does_what_its_readings_do_one_by_one():
    fleet = generate(COPENHAGEN, 400, 10, seed=2)
    ruleset = load(DEFAULT_RULES)

    class Box(Null):
        def __init__(self):
            self.out = []

        def command(self, device, payload, expiry_s):
            self.out.append(("command", device.device_id, payload))

        def alert(self, alert, raised):
            self.out.append(("alert", alert.key, raised, alert.message))

        def points(self, points):
            self.out.append(("points", [(p.measurement, p.tags, p.fields, p.ts_ms)
                                        for p in points]))

    rng = random.Random(8)
    ids = [d.device_id for d in fleet] + ["nobody"]
    readings = []
    for i in range(12_000):
        d = rng.choice(ids)
        fields = {"seq": i, "brightness_pct": 30.0, "power_w": rng.choice([0.5, 12.0]),
                  "lux": rng.choice([0.3, 80]), "motion": rng.random() < 0.1,
                  "no2_ugm3": rng.choice([40, 250])}
        if d.startswith("m-"):
            fields = {"seq": i, "energy_kwh": 100 + i / 100}
        ts = NIGHT + i * 50 - rng.choice([0, 0, 0, 3000])  # now and then a late one
        readings.append((d, fields, ts))
    one, many = Box(), Box()
    single = RuleEngine(ruleset, fleet, COPENHAGEN, one)
    batched = RuleEngine(ruleset, fleet, COPENHAGEN, many)
    for r in readings:
        single.on_reading(*r)
    for i in range(0, len(readings), 97):
        batched.on_readings(readings[i:i + 97])
    assert many.out == one.out
    assert batched.snapshot() == single.snapshot()
    assert {k: vars(h) for k, h in batched.health.items()} == \
        {k: vars(h) for k, h in single.health.items()}


def test_a_failing_reading_in_a_batch_is_logged_and_the_others_go_on(caplog):
    fleet = Fleet([DEVICE])

    class Boom(Null):
        def __init__(self):
            self.commands = 0

        def command(self, device, payload, expiry_s):
            self.commands += 1
            if self.commands == 1:
                raise RuntimeError("broker gone")

    box = Boom()
    engine = RuleEngine(load(DEFAULT_RULES), fleet, COPENHAGEN, box)
    light = {"seq": 1, "brightness_pct": 30.0, "power_w": 15.0, "lux": 0.4}
    engine.on_readings([("sl-1", {**light, "motion": False}, NIGHT),
                        ("sl-1", {**light, "motion": True}, NIGHT + 1000)])
    assert "rule evaluation failed" in caplog.text
    assert box.commands == 2
    with pytest.raises(RuntimeError):  # one at a time, the caller sees it
        box.commands = 0
        RuleEngine(load(DEFAULT_RULES), fleet, COPENHAGEN, box).on_reading(
            "sl-1", light, NIGHT)
