"""The rule language, arbitration, timers, holds, schedules, reload and restart — fake clock."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import jsonschema
import orjson
import pytest
import yaml

from billing import Settlement, load_config
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from rules import PUBLISH_FILTERS
from rules.acl import acl_problems, publishable
from rules.actions import ACTIONS
from rules.arbitration import LightState, Wish
from rules.engine import RuleEngine
from rules.expr import ExprError, compile_expression
from rules.loader import DEFAULT_RULES, EXAMPLES, RuleFileError, parse_text, schema
from rules.model import Action
from rules.state import RuleStateStore
from rules.testing import run_file
from tests.helpers import REPO, Box, light_reading

TZ = COPENHAGEN.tz
NIGHT = int(datetime(2026, 11, 27, 22, 0, tzinfo=TZ).timestamp() * 1000)
FLEET = Fleet([
    FleetDevice("sl-1", "streetlight", "norrebro", 55.696000, 12.544, rated_w=50),
    FleetDevice("sl-2", "streetlight", "norrebro", 55.696252, 12.544, rated_w=50),
    FleetDevice("sl-3", "streetlight", "valby", 55.662, 12.503, rated_w=50),
])




def engine_for(text: str, *, acks: bool = False) -> tuple[RuleEngine, Box]:
    box = Box()
    return RuleEngine(parse_text(text), FLEET, COPENHAGEN, box, track_acks=acks), box


def light(**fields):
    return {"seq": 1, "brightness_pct": 30.0, "power_w": 15.0, "energy_wh": 1.0, "lux": 1.0,
            "motion": False, **fields}


# --------------------------------------------------------------------------- language


class TestExpressions:
    @pytest.mark.parametrize("text", [
        "reading.lux > 50 and not reading.motion",
        "avg_over('no2_ugm3', '15m') > 200",
        "abs(sun.elevation) < 6 or local.hour >= 23",
        "reading.power_w < 0.1 * device.rated_w",
        "1 < local.hour < 5",
    ])
    def test_allowed(self, text):
        assert compile_expression(text).source == text

    @pytest.mark.parametrize("text, fragment, offset", [
        ("__import__('os')", "unknown function '__import__'", 0),
        ("__import__('os').system('ls')", "only plain calls of", 0),
        ("reading.__class__", "no attribute '__class__'", 0),
        ("reading.lux.__class__", "attributes only of", 0),
        ("open('/etc/passwd')", "unknown function 'open'", 0),
        ("[x for x in reading]", "ListComp is not allowed", 0),
        ("reading['lux']", "Subscript is not allowed", 0),
        ("lambda: 1", "Lambda is not allowed", 0),
        ("reading.lux > 50 and luxx > 3", "unknown name 'luxx'", 21),
        ("reading > 3", "reading needs an attribute", 0),
        ("reading.lux >", "syntax error", None),
        ("avg_over(lux, 5)", 'avg_over("field", "duration")', 0),
        ("avg_over('lux', 'soon')", "not a duration", 16),
        ("2 ** 10", "arithmetic is + - * / % only", 0),
    ])
    def test_refused_with_position(self, text, fragment, offset):
        with pytest.raises(ExprError) as e:
            compile_expression(text)
        assert fragment in str(e.value)
        if offset is not None:
            assert e.value.offset == offset


class TestLoader:
    BAD = """\
version: 1
rules:
  - id: Bad Id
    when: {reading: {kind: toaster}}
    if: "reading.lux > 50 and __import__('os')"
    then:
      - set_light: {level: 150, priority: sensor}
      - alert: {message: "x", colour: red}
  - id: later
    when: {schedule: {from: "sunset+30m", to: "25:00"}}
    for: soon
    then: []
"""

    def test_every_error_at_once_with_line_and_column(self):
        with pytest.raises(RuleFileError) as e:
            parse_text(self.BAD, "bad.yaml")
        got = [str(p) for p in e.value.problems]
        assert got[0].startswith("bad.yaml:3:9: rules.0.id: got 'Bad Id'; String should match")
        assert any(p.startswith("bad.yaml:4:28: rules.0.when.reading.kind: got 'toaster'")
                   for p in got)
        assert any(p.startswith("bad.yaml:5:31:") and "__import__" in p for p in got)
        assert any(p.startswith("bad.yaml:7:28:") and "less than or equal to 100" in p
                   for p in got)
        assert any(p.startswith("bad.yaml:8:31: unknown key 'colour'") for p in got)
        assert any(p.startswith("bad.yaml:10:47:") and "'25:00' is not HH:MM" in p for p in got)
        assert any(p.startswith("bad.yaml:11:10:") and "'soon' is not a duration" in p
                   for p in got)
        assert any(p.startswith("bad.yaml:12:11:") and "at least 1 item" in p for p in got)
        assert len(got) == 8

    def test_not_yaml(self):
        with pytest.raises(RuleFileError) as e:
            parse_text("rules: [\n  - id: x\n", "broken.yaml")
        assert str(e.value.problems[0]).startswith("broken.yaml:2:3: not valid YAML")

    def test_check_command_exit_codes(self, tmp_path):
        bad = tmp_path / "bad.yaml"
        bad.write_text(self.BAD)
        run = [sys.executable, "-m", "cityctl", "rules", "check"]
        result = subprocess.run([*run, str(bad)], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 1
        assert f"{bad}:5:31:" in result.stdout and "8 errors" in result.stderr
        ok = subprocess.run([*run, str(DEFAULT_RULES)], capture_output=True, text=True,
                            cwd=REPO)
        assert ok.returncode == 0 and "ok: 6 rules" in ok.stdout

    def test_schema_validates_the_example_and_rejects_unknown_keys(self):
        doc = schema()
        example = yaml.safe_load(DEFAULT_RULES.read_text())
        jsonschema.validate(example, doc)
        example["rules"][0]["colour"] = "red"
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(example, doc)

    def test_duplicate_ids_refused(self):
        rule = "  - id: a\n    when: {reading: {}}\n    then: [{alert: {message: m}}]\n"
        with pytest.raises(RuleFileError) as e:
            parse_text("rules:\n" + rule + rule, "dup.yaml")
        assert "used twice" in str(e.value)


class TestPublishAcl:
    """A publish action outside the rules service's broker ACL is dropped by the broker, so
    `rules check` refuses it."""

    RULES = """\
rules:
  - id: tell
    when: {reading: {kind: streetlight}}
    if: "reading.motion"
    then:
      - publish: {topic: "city/v1/{device.district}/events", payload: "motion"}
      - publish: {topic: "city/v1/{device.district}/streetlight/{device.id}/cmd",
                  payload: {brightness_pct: 100}}
  - id: bill
    when: {reading: {kind: meter}}
    then:
      - publish:
          topic: city/v1/x/meter/m-1/settlements
          payload: "{meter.unbilled_kwh}"
"""

    def test_the_filters_are_the_rules_service_acl(self):
        assert PUBLISH_FILTERS == ("city/v1/+/+/+/cmd", "city/v1/+/+/+/settlement")

    @pytest.mark.parametrize("topic, ok", [
        ("city/v1/{device.district}/streetlight/{device.id}/cmd", True),
        ("city/v1/norrebro/meter/m-1/settlement", True),
        ("city/v1/{device.district}/{device.kind}/x-{device.id}/cmd", True),
        ("city/v1/{device.district}/events", False),
        ("city/v1/a/streetlight/sl-1/cmd/extra", False),
        ("city/v1/a/streetlight/sl-1/command", False),
        ("city/v1/a/streetlight/sl-1/{reading.channel}", True),  # it may render as "cmd"
        ("city/v1/a/streetlight/sl-1/{reading.channel}-cmd", False),
        ("other/v1/a/streetlight/sl-1/cmd", False),
    ])
    def test_which_topics_can_match(self, topic, ok):
        assert publishable(topic) is ok

    def test_check_reports_each_dropped_publish_with_its_location(self, tmp_path):
        path = tmp_path / "tell.yaml"
        path.write_text(self.RULES)
        parse_text(self.RULES)  # the file itself is valid: the engine would run it
        got = [str(p) for p in acl_problems(path)]
        assert len(got) == 2
        assert got[0].startswith(f"{path}:6:26: rules[0] (tell).then[0].publish.topic: "
                                 "'city/v1/{device.district}/events' is outside")
        assert "the broker will drop every message" in got[0]
        assert got[1].startswith(f"{path}:13:18: rules[1] (bill).then[0].publish.topic:")
        result = subprocess.run([sys.executable, "-m", "cityctl", "rules", "check", str(path)],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 1
        assert result.stdout.splitlines() == got and "2 errors" in result.stderr


# --------------------------------------------------------------------------- arbitration


class TestArbitration:
    def test_class_beats_level_and_level_breaks_ties(self):
        state = LightState("sl-1")
        state.wishes = {w.key: w for w in [
            Wish("a", "program", 90, "rule:a"), Wish("b", "sensor", 60, "rule:b"),
            Wish("c", "sensor", 80, "rule:c"), Wish("d", "default", 100, "default")]}
        decision = state.decide(0, 0, None)
        assert (decision.level, decision.reason) == (80, "rule:c")

    def test_override_beats_everything_and_the_floor(self):
        state = LightState("sl-1")
        state.wishes = {"s": Wish("s", "safety", 50, "rule:s"),
                        "o": Wish("o", "override", 5, "override:operator", expires_ms=1000)}
        assert state.decide(0, 0, floor=20).level == 5
        assert state.decide(1000, 0, floor=20).level == 50  # the override expired

    def test_floor_lifts_low_levels_at_night(self):
        state = LightState("sl-1")
        state.wishes = {"p": Wish("p", "program", 0, "rule:daylight-off")}
        decision = state.decide(0, 0, floor=20)
        assert (decision.level, decision.reason, decision.floored) == (
            20, "safety:night-floor", True)
        assert state.decide(0, 0, floor=None).level == 0


# --------------------------------------------------------------------------- engine


FOR_RULES = """
rules:
  - id: hot
    when: {reading: {kind: streetlight}}
    if: "reading.temp_c > 30"
    clear_if: "reading.temp_c < 25"
    for: 2m
    then: [{alert: {severity: major, message: "hot at {device.id}: {reading.temp_c}"}}]
"""


class TestEngine:
    def test_for_must_hold_that_long(self):
        engine, box = engine_for(FOR_RULES)
        engine.on_reading("sl-1", light(temp_c=31), NIGHT)
        engine.on_reading("sl-1", light(temp_c=29), NIGHT + 60_000)  # broke the streak
        engine.on_reading("sl-1", light(temp_c=31), NIGHT + 90_000)
        engine.on_reading("sl-1", light(temp_c=32), NIGHT + 180_000)
        assert box.alerts == []
        engine.advance(NIGHT + 210_000)  # 120 s since 90 s: fires on time, with no reading
        assert box.alerts == [("hot@sl-1", True, "hot at sl-1: 32")]

    def test_hysteresis_keeps_it_active_between_the_thresholds(self):
        engine, box = engine_for(FOR_RULES.replace("for: 2m", "for: 0s"))
        for i, t in enumerate([31, 28, 26, 29, 24, 28]):
            engine.on_reading("sl-1", light(temp_c=t), NIGHT + i * 60_000)
        assert [(raised, msg) for _, raised, msg in box.alerts] == [
            (True, "hot at sl-1: 31"), (False, "hot at sl-1: 31")]
        assert engine.alerts["hot@sl-1"].cleared_ms == NIGHT + 4 * 60_000

    def test_window_functions(self):
        engine, box = engine_for("""
rules:
  - id: noisy
    when: {reading: {kind: streetlight}}
    if: "avg_over('no2_ugm3', '10m') > 100 and count_over('no2_ugm3', '10m') >= 3"
    then: [{alert: {message: "avg high"}}]
""")
        for i, v in enumerate([50, 200, 90]):  # avg 113 over 3 readings
            engine.on_reading("sl-1", light(no2_ugm3=v), NIGHT + i * 60_000)
        assert [a[1] for a in box.alerts] == [True]
        engine.on_reading("sl-1", light(no2_ugm3=10), NIGHT + 11 * 60_000)  # 200 left the window
        assert [a[1] for a in box.alerts] == [True, False]

    def test_schedule_by_sun_event_in_the_city_timezone(self):
        engine, box = engine_for("""
rules:
  - id: evening
    when: {schedule: {from: "sunset+30m", to: "23:00", select: {district: norrebro}}}
    then: [{set_light: {level: 70, priority: program}}]
""")
        # 28 Nov 2026: Copenhagen sunset 15:45, so the window opens 16:15.
        day = datetime(2026, 11, 28, 16, 0, tzinfo=TZ)
        start = int(day.timestamp() * 1000)
        for minute in range(0, 25):
            engine.advance(start + minute * 60_000)
        opened = {c[3] for c in box.commands if c[1] == 70}
        assert {c[0] for c in box.commands if c[1] == 70} == {"sl-1", "sl-2"}  # not valby
        opened_at = datetime.fromtimestamp(min(opened) / 1000, TZ)
        assert (opened_at.hour, opened_at.minute) in ((16, 14), (16, 15), (16, 16))
        engine.advance(int(datetime(2026, 11, 28, 23, 0, 1, tzinfo=TZ).timestamp() * 1000))
        assert box.commands[-1][1:3] == (0, "default")  # no floor configured here

    def test_absence_raises_and_a_reading_clears(self):
        engine, box = engine_for("""
rules:
  - id: silent
    when: {absent: {for: 10m, select: {kind: streetlight}}}
    then: [{alert: {message: "no reading from {device.id}"}}]
""")
        engine.on_reading("sl-1", light(), NIGHT)
        engine.advance(NIGHT + 9 * 60_000)
        assert box.alerts == []
        engine.advance(NIGHT + 10 * 60_000)
        assert sorted(a[0] for a in box.alerts) == ["silent@sl-1", "silent@sl-2", "silent@sl-3"]
        engine.on_reading("sl-1", light(), NIGHT + 11 * 60_000)
        assert box.alerts[-1] == ("silent@sl-1", False, "no reading from sl-1")

    def test_a_failing_rule_does_not_stop_the_others(self):
        engine, box = engine_for("""
rules:
  - id: broken
    when: {reading: {kind: streetlight}}
    if: "device.colour == 'red'"
    then: [{alert: {message: never}}]
  - id: works
    when: {reading: {kind: streetlight}}
    then: [{set_light: {level: 55}}]
""")
        engine.on_reading("sl-1", light(), NIGHT)
        assert box.commands[-1][1:3] == (55, "rule:works")
        health = engine.health["broken"]
        assert health.errors == 1 and "colour" in health.last_error
        assert engine.health["works"].fired == 1

    def test_operator_override_wins_until_it_expires(self):
        engine, box = engine_for(DEFAULT_RULES.read_text())
        engine.on_reading("sl-1", light(motion=True), NIGHT)
        engine.set_override("sl-1", 5, NIGHT + 1000, until_ms=NIGHT + 60_000)
        assert box.commands[-1][1:3] == (5, "override:operator")
        explained = engine.explain("sl-1", NIGHT + 2000)
        assert explained["winner"]["class"] == "override"
        assert [w["class"] for w in explained["wishes"]] == ["override", "sensor", "program"]
        engine.advance(NIGHT + 60_000)
        assert box.commands[-1][1:3] == (100, "rule:motion-boost")

    def test_missing_acknowledgement_raises_an_alert(self):
        engine, box = engine_for(DEFAULT_RULES.read_text(), acks=True)
        engine.on_reading("sl-1", light(), NIGHT)
        engine.on_reading("sl-2", light(), NIGHT)
        cmd_id = next(iter(engine.pending_acks.values()))[0]
        engine.on_ack("sl-1", {"id": cmd_id if cmd_id.startswith("sl-1") else
                               engine.pending_acks["sl-1"][0], "ok": True})
        engine.advance(NIGHT + 31_000)
        assert [(k, r) for k, r, _ in box.alerts] == [("missing-ack@sl-2", True)]

    def test_publish_action_and_lighting_energy(self):
        engine, box = engine_for("""
settings: {co2_g_per_kwh: 200}
rules:
  - id: tell
    when: {reading: {kind: streetlight}}
    if: "reading.motion"
    then: [{publish: {topic: "city/v1/{device.district}/events", payload: {who: "{device.id}"}}}]
""")
        engine.on_reading("sl-1", light(motion=True, power_w=20.0), NIGHT)
        engine.on_reading("sl-1", light(power_w=20.0), NIGHT + 60_000)
        engine.advance(NIGHT + 120_000)
        assert box.published == [("city/v1/norrebro/events", b'{"who": "sl-1"}')]
        [p] = [p for p in box.pts if p.measurement == "citygrid_lighting"]
        assert p.tags == {"district": "norrebro"}
        report = [p for p in box.pts if p.measurement == "citygrid_rules" and not p.tags]
        assert report and report[-1].fields["commands_total"] == engine.commands_sent
        assert "overdue_minor" not in report[-1].fields  # only the leading runner's look sets it
        engine.overdue = (2, 12_345)
        engine.advance(NIGHT + 180_000)
        report = [p for p in box.pts if p.measurement == "citygrid_rules" and not p.tags]
        assert (report[-1].fields["overdue_accounts"], report[-1].fields["overdue_minor"]) == \
            (2, 12_345)
        per_rule = [p for p in box.pts if p.tags.get("rule") == "tell"]
        assert per_rule[-1].fields["fired"] == 1
        assert p.fields["energy_wh"] == pytest.approx(20 / 60)
        assert p.fields["baseline_wh"] == pytest.approx((50 * 1.08 + 0.5) / 60)
        assert p.fields["co2_avoided_g"] == pytest.approx(p.fields["saved_wh"] / 1000 * 200)


    def test_every_action_of_the_rule_file_is_a_registered_class(self):
        assert set(ACTIONS) == set(Action.model_fields)
        engine, _ = engine_for(FOR_RULES)
        assert {name: type(a).__module__ for name, a in engine.actions.items()} == {
            name: f"rules.actions.{name}" for name in ACTIONS}

    def test_a_fake_billing_store_serves_meter_conditions_and_settle(self):
        class FakeBilling:  # the engine's Billing protocol, without a ledger
            config = load_config()

            def __init__(self):
                self.kwh, self.settled = 0.0, []

            def on_reading(self, meter_id, ts_ms, energy_kwh, export_kwh=None):
                self.kwh = energy_kwh - 100
                return [("spike", "jumped")] if energy_kwh > 150 else []

            def unbilled(self, meter_id):
                return {"kwh": self.kwh, "amount": self.kwh * 2.5, "oldest_period": None}

            def price_now(self, tariff, ts_ms):
                return 2.5

            def unpriced(self, meter_id, kind="energy"):
                return 0

            def settle(self, meter_id, now_ms, *, ended_periods_only=False):
                self.settled.append((meter_id, now_ms, ended_periods_only))
                entry = {"account": "acc-1", "tariff": "business-flat", "kwh": f"{self.kwh}",
                         "amount_minor": 100, "balance_after_minor": 500, "currency": "DKK"}
                return [Settlement(entry, "h1", low_balance=True)]

        fleet = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.5, account_id="acc-1",
                                   tariff="business-flat")])
        box, billing = Box(), FakeBilling()
        engine = RuleEngine(parse_text("""
rules:
  - id: bill
    when: {reading: {kind: meter}}
    if: "meter.unbilled_kwh >= 10"
    then: [{settle: {periods: ended}}]
"""), fleet, COPENHAGEN, box, billing=billing)
        engine.on_reading("m-1", {"seq": 1, "energy_kwh": 105.0}, NIGHT)
        assert billing.settled == []
        engine.on_reading("m-1", {"seq": 2, "energy_kwh": 160.0}, NIGHT + 60_000)
        assert billing.settled == [("m-1", NIGHT + 60_000, True)]
        [(topic, payload)] = box.published
        assert topic == "city/v1/valby/meter/m-1/settlement"
        assert json.loads(payload)["hash"] == "h1"
        assert [(k, raised) for k, raised, _ in box.alerts] == [
            ("billing-spike@m-1", True), ("low-balance@acc-1", True)]
        engine.advance(NIGHT + 120_000)
        assert {p.measurement for p in box.pts} >= {"citygrid_billing", "citygrid_tariff"}

    def test_snapshot_hands_out_each_change_once_and_restore_takes_it_back(self):
        engine, _ = engine_for(DEFAULT_RULES.read_text() + FOR_RULES.split("rules:")[1])
        engine.on_reading("sl-1", light(), NIGHT)
        engine.on_reading("sl-1", light(motion=True, temp_c=31), NIGHT + 10_000)
        snap = engine.snapshot()
        assert set(snap.lights) == {"sl-1", "sl-2"} and snap.watermark == NIGHT + 10_000
        assert snap.instances[("hot", "sl-1")].pending_since == NIGHT + 10_000
        json.dumps([snap.lights, list(snap.instances.values()), snap.alerts])  # plain data
        again = engine.snapshot()
        assert (again.lights, again.instances, again.alerts) == ({}, {}, {})
        fresh, box = engine_for(DEFAULT_RULES.read_text() + FOR_RULES.split("rules:")[1])
        fresh.restore(snap)
        assert fresh.explain("sl-1")["winner"]["reason"] == "rule:motion-boost"
        fresh.advance(NIGHT + 130_000)  # the hold's expiry and the `for:` timer run on
        assert ("sl-1", 30, "rule:dark-baseline", NIGHT + 130_000) in box.commands
        assert [(k, raised) for k, raised, _ in box.alerts] == [("hot@sl-1", True)]


class TestReloadAndRestart:
    def test_unchanged_rules_keep_their_state_changed_ones_start_over(self):
        text = DEFAULT_RULES.read_text()
        engine, box = engine_for(text)
        engine.on_reading("sl-1", light(power_w=0.5), NIGHT)  # lamp-failure pending
        engine.on_reading("sl-1", light(motion=True), NIGHT + 60_000)
        assert ("lamp-failure", "sl-1") not in engine.instances  # the motion reading had power
        engine.on_reading("sl-1", light(power_w=0.5), NIGHT + 70_000)
        assert engine.instances[("lamp-failure", "sl-1")].pending_since == NIGHT + 70_000
        engine.set_rules(parse_text(text.replace("level: 30", "level: 40")))
        # dark-baseline changed: its wish is gone; motion-boost and lamp-failure kept theirs.
        assert ("lamp-failure", "sl-1") in engine.instances
        assert "rule:motion-boost@sl-1" in engine.lights["sl-1"].wishes
        assert "rule:dark-baseline@sl-1" not in engine.lights["sl-1"].wishes
        engine.on_reading("sl-1", light(), NIGHT + 200_000)
        assert box.commands[-1][1:3] == (40, "rule:dark-baseline")

    def test_a_hold_survives_a_restart(self, tmp_path):
        engine, box = engine_for(DEFAULT_RULES.read_text())
        store = RuleStateStore(tmp_path / "rules.sqlite")
        engine.on_reading("sl-1", light(), NIGHT)
        engine.on_reading("sl-1", light(motion=True), NIGHT + 10_000)
        store.save(engine)
        store.close()
        # A new process: same rules, state from the database.
        again, box2 = engine_for(DEFAULT_RULES.read_text())
        store2 = RuleStateStore(tmp_path / "rules.sqlite")
        store2.restore(again)
        assert again.explain("sl-1")["winner"]["reason"] == "rule:motion-boost"
        again.on_reading("sl-1", light(), NIGHT + 60_000)
        assert box2.commands == []  # still held: nothing to say
        again.advance(NIGHT + 130_000)
        # sl-2 was held as a neighbour; it never reported, so no baseline: the floor.
        assert sorted(box2.commands) == [("sl-1", 30, "rule:dark-baseline", NIGHT + 130_000),
                                         ("sl-2", 20, "safety:night-floor", NIGHT + 130_000)]

    def test_explaining_from_saved_state_reads_and_never_writes(self, tmp_path, monkeypatch):
        from citygrid import statedb
        from rules.state import engine_from_state

        engine, _ = engine_for(DEFAULT_RULES.read_text())
        path = tmp_path / "rules.sqlite"
        store = RuleStateStore(path)
        engine.on_reading("sl-1", light(), NIGHT)
        engine.on_reading("sl-1", light(motion=True), NIGHT + 10_000)
        store.save(engine)
        store.close()
        before = path.read_bytes()

        def read_write(*_):
            raise AssertionError("a reader opened the rule state read-write")

        monkeypatch.setattr(statedb, "connect", read_write)
        seen = engine_from_state(parse_text(DEFAULT_RULES.read_text()), FLEET, COPENHAGEN, path)
        assert seen.explain("sl-1")["winner"]["reason"] == "rule:motion-boost"
        assert path.read_bytes() == before  # (SQLite's -shm/-wal are its readers' business)
        missing = tmp_path / "elsewhere" / "rules.sqlite"
        assert engine_from_state(parse_text(DEFAULT_RULES.read_text()), FLEET, COPENHAGEN,
                                 missing).explain("sl-1")["wishes"] == []
        assert not missing.parent.exists()  # no state yet: nothing created


def test_the_runner_takes_its_mqtt_client_and_clock_from_its_caller(tmp_path):
    from citygrid import wire
    from citygrid.contract import Topic, topic_filter
    from citygrid.settings import Settings
    from rules.runner import RuleRunner, RunnerConfig

    made = []

    def make_client(url, client_id, **options):
        made.append((client_id, options))
        return wire.Client(url, client_id, **options)

    class Clock:
        ms = NIGHT - 3_600_000

        def now_ms(self) -> int:
            return self.ms

        def monotonic(self) -> float:
            return 0.0

    clock = Clock()
    runner = RuleRunner(Settings(mqtt_url="mqtt://127.0.0.1:1", data_dir=str(tmp_path)), FLEET,
                        COPENHAGEN, None, RunnerConfig(DEFAULT_RULES), make_client=make_client,
                        clock=clock)
    try:
        # One connection, readings in and commands out, in a persistent session.
        [(client_id, options)] = made
        assert client_id == "citygrid-rules"
        assert options["clean_start"] is False and options["session_expiry_s"] > 0
        assert options["subscriptions"] == [
            (topic_filter(), 1), (topic_filter("ack", kind="streetlight"), 1),
            (topic_filter("override", kind="streetlight"), 1)]
        topic = str(Topic("norrebro", "streetlight", "sl-1"))
        runner.handle(topic, orjson.dumps(light_reading(1, NIGHT)))
        assert "sl-1" not in runner.engine.lights  # an hour ahead of the runner's clock
        clock.ms = NIGHT
        runner.handle(topic, orjson.dumps(light_reading(1, NIGHT)))
        assert runner.engine.lights["sl-1"].level == 30
    finally:
        runner.stop()


def test_the_example_rule_tests_pass():
    results = run_file(EXAMPLES / "copenhagen_test.yaml")
    assert len(results) >= 9
    assert [r.name for r in results if not r.ok] == []


def test_a_failing_rule_test_prints_a_diff(tmp_path):
    doc = yaml.safe_load((EXAMPLES / "copenhagen_test.yaml").read_text())
    doc["rules"] = str(EXAMPLES / "copenhagen.yaml")
    doc["tests"] = [doc["tests"][0]]
    doc["tests"][0]["expect"]["commands"][0]["level"] = 35
    path = tmp_path / "wrong_test.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    result = subprocess.run([sys.executable, "-m", "cityctl", "rules", "test", str(path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "0 passed, 1 failed" in result.stdout
    assert "missing command: {at: 0s, device: sl-1, level: 35" in result.stdout
    assert "unexpected command: {at: 0.0, device: sl-1, level: 30.0" in result.stdout


def test_schema_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "cityctl", "rules", "schema"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert json.loads(out)["title"] == "CityGrid rule file"


def test_a_light_without_sensors_raises_no_alarm_and_no_rule_errors():
    """A zigbee bulb (`unmeasured`: lux, motion, power, energy): the Copenhagen rules neither
    switch it off on a lux they do not have nor call it a failed lamp; by the sun it gets the
    night's baseline."""
    from citygrid.contract import decode_readings
    from rules.loader import DEFAULT_RULES, load

    box = Box()
    engine = RuleEngine(load(DEFAULT_RULES), FLEET, COPENHAGEN, box, track_acks=False)
    payload = (b'{"ts":%d,"seq":1,"brightness_pct":100,'
               b'"unmeasured":["lux","motion","power_w","energy_wh"]}' % NIGHT)
    (reading,) = decode_readings("streetlight", payload, now_ms=NIGHT)
    engine.on_reading("sl-1", reading.fields(), NIGHT)
    assert not any(h.errors for h in engine.health.values())
    assert not engine.alerts
    (command,) = [c for c in box.commands if c[0] == "sl-1"]
    assert command[1:3] == (30.0, "rule:dark-baseline")
