"""Lamp types and the rule engine's lamp monitor — fake outbox, event time from the readings."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from citygrid import lamps
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice, check_device
from citygrid.registry import Catalogue, InvalidEntry, Registry
from citygrid.settings import Settings, SettingsError
from citygrid.yamlconf import ConfigError
from rules import read_lamps
from rules.engine import RuleEngine
from rules.lampmon import ALERTS
from rules.loader import DEFAULT_RULES, RuleFileError, parse_text
from rules.state import RuleStateStore
from tests.helpers import NIGHT, Box

DAY = int(datetime(2026, 11, 27, 12, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)
MIN = 60_000
ON = {"brightness_pct": 100.0, "power_w": 59.9}  # a healthy led-55w at full power
OFF = {"brightness_pct": 0.0, "power_w": 0.5}
MONITOR = "version: 1\nsettings:\n  lamp_monitor: {}\nrules: []\n"


def _light(i: int, cabinet: str | None = "cab-1", **kw) -> FleetDevice:
    return FleetDevice(f"sl-{i}", "streetlight", "norrebro", 55.696 + i * 0.0003, 12.544,
                       rated_w=55, lamp_type="led-55w", cabinet=cabinet, **kw)


# sl-1, sl-2 are led-55w lights on no cabinet, sl-5 names no lamp type (generic 40 W)…
FLEET = Fleet([_light(1, None), _light(2, None),
               FleetDevice("sl-5", "streetlight", "valby", 55.66, 12.50, rated_w=40)])
# … and here sl-1 … sl-4 are fed by cab-1.
CABINET_FLEET = Fleet([*(_light(i) for i in range(1, 5))])


def engine_for(text: str = MONITOR, fleet: Fleet = FLEET) -> tuple[RuleEngine, Box]:
    box = Box()
    return RuleEngine(parse_text(text), fleet, COPENHAGEN, box, track_acks=False), box


def feed(engine: RuleEngine, start: int, end: int, readings: dict[str, dict],
         every: int = 10_000) -> None:
    """Every light in ``readings`` reports its reading every ``every`` ms in [start, end)."""
    for ts in range(start, end, every):
        engine.on_readings([(d, dict(r), ts) for d, r in readings.items()])


def active(engine: RuleEngine) -> list[str]:
    return sorted(k for k, a in engine.alerts.items() if a.active)


def raised(box: Box) -> list[str]:
    return [key for key, up, _ in box.alerts if up]


# --------------------------------------------------------------------------- lamp types


class TestLampTypes:
    def test_the_embedded_types_match_the_simulators_physics(self):
        types = lamps.load()
        assert list(types) == ["led-30w", "led-40w", "led-55w", "led-90w", "led-110w",
                               "led-120w"]
        for w in (30, 40, 55, 90, 110, 120):
            t = types[f"led-{w}w"]
            assert t.wattage_w == w and t.standby_w == 0.5
            for level in (100, 50, 20, 3):
                assert t.expected_w(level) == pytest.approx(w * level / 100 * 1.08 + 0.5)
            assert t.expected_w(0) == 0.5

    def test_a_light_without_a_type_gets_a_generic_one_from_its_rated_power(self):
        t = lamps.load().for_device(FLEET.by_id["sl-5"])
        assert t.name == "generic-40w" and t.expected_w(100) == pytest.approx(43.7)
        assert (t.tolerance_pct, t.warmup_s, t.rated_life_h) == (15, 60, 100_000)

    def test_a_curve_is_linear_between_its_points_and_dims_no_lower_than_its_minimum(self):
        types = lamps.parse_text("""\
version: 1
lamp_types:
  sodium-100w:
    wattage_w: 100
    power_w: {0: 2, 50: 60, 100: 110}
    min_output_pct: 20
""", "t.yaml")
        t = types["sodium-100w"]
        assert t.expected_w(75) == pytest.approx(85) and t.expected_w(50) == 60
        assert t.expected_w(5) == t.expected_w(20) == pytest.approx(2 + 58 * 20 / 50)
        assert t.expected_w(0) == 2

    def test_a_bad_file_is_refused_whole_with_every_error_and_its_line(self):
        with pytest.raises(ConfigError) as e:
            lamps.parse_text("""\
version: 1
lamp_types:
  Bad-Name:
    wattage_w: 10
    power_w: {0: 0.5, 100: 11}
  dim:
    wattage_w: 0
    power_w: {0: 0.5, 50: 3}
    colour: red
  falling:
    wattage_w: 10
    power_w: {0: 5, 100: 3}
    tolerance_pct: -1
""", "bad.yaml")
        got = [str(p) for p in e.value.problems]
        assert got == [
            "bad.yaml:3:3: lamp type name 'Bad-Name' must match ^[a-z0-9][a-z0-9-]{0,63}$ "
            "(lower case, digits, dashes)",
            "bad.yaml:7:16: lamp_types.dim.wattage_w: got 0; Input should be greater than 0",
            "bad.yaml:8:14: lamp_types.dim.power_w: give the power at 0 (standby) and at "
            "100 %, e.g. {0: 0.5, 100: 59.9}; levels in between are optional",
            "bad.yaml:9:5: unknown key 'colour' in lamp_types.dim",
            "bad.yaml:12:14: lamp_types.falling.power_w: power must not fall as the level rises",
            "bad.yaml:13:20: lamp_types.falling.tolerance_pct: got -1; Input should be "
            "greater than 0",
        ]

    def test_not_yaml_not_a_mapping_or_unreadable_is_refused_saying_where(self, tmp_path):
        with pytest.raises(ConfigError, match=r"^x.yaml:3:1: not valid YAML"):
            lamps.parse_text("lamp_types:\n  a: [\n", "x.yaml")
        with pytest.raises(ConfigError, match="^x.yaml:1:1: a lamp types file is a mapping"):
            lamps.parse_text("- led\n", "x.yaml")
        with pytest.raises(ConfigError, match="cannot read"):
            lamps.load(tmp_path / "missing.yaml")

    def test_citygrid_lamp_types_replaces_the_embedded_file(self, tmp_path):
        path = tmp_path / "types.yaml"
        path.write_text("version: 1\nlamp_types:\n  own-70w:\n    wattage_w: 70\n"
                        "    power_w: {0: 0.3, 100: 75}\n")
        settings = Settings.from_env({"CITYGRID_LAMP_TYPES": str(path)})
        assert list(lamps.load(settings.lamp_types)) == ["own-70w"]
        with pytest.raises(SettingsError, match="CITYGRID_LAMP_TYPES"):
            Settings.from_env({"CITYGRID_LAMP_TYPES": str(tmp_path / "nope.yaml")})
        path.write_text("version: 1\nlamp_types:\n  own-70w:\n    wattage_w: -70\n"
                        "    power_w: {0: 0.3, 100: 75}\n")
        with pytest.raises(SettingsError, match=r"CITYGRID_LAMP_TYPES: not a lamp types file:\n"
                           r".*types.yaml:4:16: lamp_types.own-70w.wattage_w: got -70"):
            Settings.from_env({"CITYGRID_LAMP_TYPES": str(path)})

    def test_the_registry_refuses_a_lamp_type_it_does_not_know(self, tmp_path):
        known = frozenset(lamps.load())
        odd = FleetDevice("sl-9", "streetlight", "valby", 55.6, 12.5, rated_w=55,
                          lamp_type="led-56w")
        assert check_device(odd, lamp_types=known) == [
            "lamp_type: no lamp type 'led-56w' (known: led-110w, led-120w, led-30w, led-40w, "
            "led-55w, led-90w)"]
        assert check_device(odd) == []  # no catalogue: not checked
        registry = Registry(tmp_path, Catalogue(lamp_types=known))
        with pytest.raises(InvalidEntry, match="sl-9.*no lamp type 'led-56w'"):
            registry.upsert(odd)
        registry.upsert(_light(1))
        with pytest.raises(InvalidEntry, match="no lamp type 'halogen'"):
            registry.edit("sl-1", lamp_type="halogen")
        registry.close()


# --------------------------------------------------------------------------- the rule file


class TestSettings:
    def test_off_unless_the_rule_file_turns_it_on(self):
        engine, box = engine_for(DEFAULT_RULES.read_text())
        assert not engine.lamps.enabled
        feed(engine, NIGHT, NIGHT + 30 * MIN, {"sl-1": {"brightness_pct": 100.0,
                                                         "power_w": 0.0}})
        assert [k for k in engine.alerts if k.split("@")[0] in ALERTS] == []
        assert "lamp-failure@sl-1" in engine.alerts  # the shipped rule's own alert
        assert engine.lamps.lamps == {}

    def test_the_defaults_and_a_strict_schema(self):
        engine, _ = engine_for()
        limits = engine.lamps.limits
        assert (limits.failure_ms, limits.power_ms, limits.day_ms) == (2 * MIN, 5 * MIN,
                                                                       15 * MIN)
        assert (limits.switches, limits.within_ms) == (6, 30 * MIN)
        assert (limits.min_lights, limits.share, limits.silent_ms) == (3, 0.5, 3 * MIN)
        with pytest.raises(RuleFileError) as e:
            parse_text("version: 1\nsettings:\n  lamp_monitor:\n    failure_for: soon\n"
                       "    cabinet: {share: 2, lights: 3}\nrules: []\n", "r.yaml")
        got = [str(p) for p in e.value.problems]
        assert any(p.startswith("r.yaml:4:18:") and "'soon' is not a duration" in p
                   for p in got)
        assert any(p.startswith("r.yaml:5:22:") and "less than or equal to 1" in p
                   for p in got)
        assert any(p.startswith("r.yaml:5:25: unknown key 'lights'") for p in got)

    def test_turned_off_on_a_reload_its_alerts_clear(self):
        engine, _ = engine_for()
        feed(engine, NIGHT, NIGHT + 5 * MIN, {"sl-5": {"brightness_pct": 100.0,
                                                        "power_w": 0.5}})
        assert active(engine) == ["lamp-fault@sl-5"]
        engine.set_rules(parse_text("version: 1\nrules: []\n"))
        assert active(engine) == []


# --------------------------------------------------------------------------- the checks


class TestChecks:
    def test_a_failed_lamp_is_raised_once_after_failure_for_and_clears_when_it_burns(self):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + 2 * MIN, {"sl-1": ON})  # on and warm
        feed(engine, NIGHT + 2 * MIN, NIGHT + 4 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        assert raised(box) == []  # 1 min 50 s of failure
        feed(engine, NIGHT + 4 * MIN, NIGHT + 9 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        assert raised(box) == ["lamp-fault@sl-1"]  # once, at 2 min; no lamp-power beside it
        alert = engine.alerts["lamp-fault@sl-1"]
        assert alert.since_ms == NIGHT + 4 * MIN and alert.severity == "major"
        assert alert.message == ("sl-1 draws 0.5 W at 100 %; its led-55w should draw 59.9 W "
                                 "± 15 %: the lamp has failed")
        feed(engine, NIGHT + 9 * MIN, NIGHT + 10 * MIN, {"sl-1": ON})
        assert active(engine) == [] and box.alerts[-1][:2] == ("lamp-fault@sl-1", False)

    def test_the_warm_up_after_a_level_change_is_not_checked(self):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + MIN, {"sl-1": OFF})
        # Switched on at +1 min, failed from the start: its failure counts from +2 min.
        feed(engine, NIGHT + MIN, NIGHT + 4 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        assert raised(box) == []
        feed(engine, NIGHT + 4 * MIN, NIGHT + 4 * MIN + 10_000, {"sl-1": {**ON,
                                                                           "power_w": 0.5}})
        assert raised(box) == ["lamp-fault@sl-1"]
        assert engine.alerts["lamp-fault@sl-1"].since_ms == NIGHT + 4 * MIN

    def test_a_reading_that_says_lamp_failure_raises_it_even_off(self):
        engine, box = engine_for()
        feed(engine, DAY, DAY + 3 * MIN, {"sl-1": {**OFF, "fault": "lamp_failure"}})
        assert raised(box) == ["lamp-fault@sl-1"]
        assert engine.alerts["lamp-fault@sl-1"].message == (
            "sl-1 reports a lamp failure (fault: lamp_failure) while off; its led-55w should "
            "draw 59.9 W at 100 %")

    def test_too_little_power_for_the_level_is_raised_after_power_for(self):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + MIN, {"sl-1": {**ON, "brightness_pct": 50.0,
                                                   "power_w": 30.2}})
        low = {"brightness_pct": 50.0, "power_w": 22.0}  # 30.2 W ± 15 %: 25.7 … 34.7 W
        feed(engine, NIGHT + MIN, NIGHT + 6 * MIN, {"sl-1": low})
        assert raised(box) == []
        feed(engine, NIGHT + 6 * MIN, NIGHT + 7 * MIN, {"sl-1": low})
        assert raised(box) == ["lamp-power@sl-1"]
        alert = engine.alerts["lamp-power@sl-1"]
        assert alert.severity == "minor" and alert.message == (
            "sl-1 draws 22.0 W at 50 %, too little; its led-55w should draw 30.2 W ± 15 % "
            "(25.7–34.7 W)")
        feed(engine, NIGHT + 7 * MIN, NIGHT + 8 * MIN, {"sl-1": {"brightness_pct": 50.0,
                                                                  "power_w": 31.0}})
        assert active(engine) == []

    def test_too_much_power_and_the_generic_type(self):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + 8 * MIN, {"sl-5": {"brightness_pct": 100.0,
                                                        "power_w": 60.0}})
        assert raised(box) == ["lamp-power@sl-5"]
        assert "too much; its generic-40w should draw 43.7 W" in \
            engine.alerts["lamp-power@sl-5"].message

    def test_day_burning_when_nothing_asked_for_light(self):
        engine, box = engine_for()
        feed(engine, DAY, DAY + 15 * MIN, {"sl-1": ON})
        assert raised(box) == []
        feed(engine, DAY + 15 * MIN, DAY + 16 * MIN, {"sl-1": ON})
        assert raised(box) == ["day-burning@sl-1"]
        assert engine.alerts["day-burning@sl-1"].message.startswith(
            "sl-1 draws 59.9 W at 100 % by day (sun 13° up) though nothing asked for light")
        feed(engine, DAY + 16 * MIN, DAY + 17 * MIN, {"sl-1": OFF})
        assert active(engine) == []

    def test_no_day_burning_at_night_or_when_the_engine_asked_for_light(self):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + 30 * MIN, {"sl-1": ON})
        engine.set_override("sl-2", 100, DAY)
        feed(engine, DAY, DAY + 30 * MIN, {"sl-2": ON})
        assert raised(box) == []

    def test_cycling_is_raised_at_the_sixth_switch_on_and_clears_when_it_steadies(self):
        engine, box = engine_for()
        for k in range(6):  # on for 2 min, off for 2 min: a switch-on every 4 min
            feed(engine, NIGHT + 4 * k * MIN, NIGHT + (4 * k + 2) * MIN, {"sl-1": OFF})
            feed(engine, NIGHT + (4 * k + 2) * MIN, NIGHT + (4 * k + 4) * MIN, {"sl-1": ON})
            if k == 4:
                assert raised(box) == []  # five switch-ons
        assert raised(box) == ["lamp-cycling@sl-1"]
        assert engine.alerts["lamp-cycling@sl-1"].message == (
            "sl-1 switched on 6 times in 20 min; at most 5 expected within 30 min")
        feed(engine, NIGHT + 24 * MIN, NIGHT + 32 * MIN, {"sl-1": ON})
        assert "lamp-cycling@sl-1" in active(engine)  # six switch-ons within 30 min
        feed(engine, NIGHT + 32 * MIN, NIGHT + 33 * MIN, {"sl-1": ON})  # the first is out
        assert active(engine) == [] and raised(box) == ["lamp-cycling@sl-1"]


class TestCabinets:
    ALL = {f"sl-{i}": ON for i in range(1, 5)}

    def test_silent_lights_give_one_cabinet_alarm_and_it_clears_when_they_are_back(self):
        engine, box = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + 2 * MIN, self.ALL)
        # sl-1 … sl-3 go silent; sl-4 reports on (and moves event time).
        # Last heard at +1:50: silent for 3 minutes at +4:50.
        feed(engine, NIGHT + 2 * MIN, NIGHT + 4 * MIN + 50_000, {"sl-4": ON})
        assert raised(box) == []
        feed(engine, NIGHT + 4 * MIN + 50_000, NIGHT + 6 * MIN, {"sl-4": ON})
        assert raised(box) == ["cabinet-supply-loss@cab-1"]
        assert engine.alerts["cabinet-supply-loss@cab-1"].since_ms == NIGHT + 4 * MIN + 50_000
        alert = engine.alerts["cabinet-supply-loss@cab-1"]
        assert (alert.severity, alert.scope) == ("critical", "cab-1")
        assert alert.message == ("Cabinet cab-1 has lost its supply: 3 of its 4 lights are "
                                 "dark (3 silent); at most 2 or under 50 % should be")
        feed(engine, NIGHT + 6 * MIN, NIGHT + 7 * MIN, self.ALL)
        assert active(engine) == [] and raised(box) == ["cabinet-supply-loss@cab-1"]

    def test_lights_at_0_w_give_the_cabinet_alarm_and_no_lamp_alarms(self):
        engine, box = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + 2 * MIN, self.ALL)
        dead = {**ON, "power_w": 0.0}
        # Their nodes still report, their lamps get nothing: 0 W at 100 % for 20 minutes.
        feed(engine, NIGHT + 2 * MIN, NIGHT + 22 * MIN,
             {"sl-1": dead, "sl-2": dead, "sl-3": dead, "sl-4": ON})
        assert raised(box) == ["cabinet-supply-loss@cab-1"]
        assert "3 drawing ~0 W" in engine.alerts["cabinet-supply-loss@cab-1"].message

    def test_a_lamp_alarm_raised_before_the_cabinet_went_down_clears(self):
        engine, box = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + 2 * MIN, self.ALL)
        feed(engine, NIGHT + 2 * MIN, NIGHT + 5 * MIN, {**self.ALL, "sl-1": {**ON,
                                                                             "power_w": 0.5}})
        assert active(engine) == ["lamp-fault@sl-1"]
        feed(engine, NIGHT + 5 * MIN, NIGHT + 9 * MIN, {"sl-4": ON})
        assert active(engine) == ["cabinet-supply-loss@cab-1"]

    def test_after_a_restart_lights_not_heard_yet_are_silent_from_the_first_check(self,
                                                                                   tmp_path):
        engine, _ = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + MIN, self.ALL)
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.save(engine)
        store.close()
        again, box = engine_for(fleet=CABINET_FLEET)  # back an hour later
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.restore(again)
        store.close()
        feed(again, NIGHT + 61 * MIN, NIGHT + 63 * MIN, {"sl-4": ON})  # the others: not yet
        assert raised(box) == []
        feed(again, NIGHT + 63 * MIN, NIGHT + 64 * MIN + 10_000, {"sl-4": ON})
        assert raised(box) == ["cabinet-supply-loss@cab-1"]  # three minutes after the first

    def test_commands_a_dark_cabinets_lights_never_answered_are_its_alarm_not_theirs(self):
        """The lights of a cabinet without supply answer no command: their missing-ack alerts
        clear when the cabinet's alarm is raised, and no new one comes while it stands."""
        engine, box = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + MIN, self.ALL)
        for device_id in ("sl-1", "sl-2", "sl-3"):  # commands they will never acknowledge
            engine.acks.expect(device_id, f"{device_id}-cmd", NIGHT + MIN + 30_000)
        feed(engine, NIGHT + MIN, NIGHT + 2 * MIN, {"sl-4": ON})
        assert {k for k in raised(box) if k.startswith("missing-ack")} == {
            "missing-ack@sl-1", "missing-ack@sl-2", "missing-ack@sl-3"}
        feed(engine, NIGHT + 2 * MIN, NIGHT + 6 * MIN, {"sl-4": ON})
        active = {k for k, a in engine.alerts.items() if a.active}
        assert active == {"cabinet-supply-loss@cab-1"}
        engine.acks.expect("sl-1", "sl-1-cmd-2", NIGHT + 6 * MIN + 30_000)
        feed(engine, NIGHT + 6 * MIN, NIGHT + 8 * MIN, {"sl-4": ON})
        assert {k for k, a in engine.alerts.items() if a.active} == {
            "cabinet-supply-loss@cab-1"}

    def test_lights_never_heard_are_not_dark(self):
        """A new city whose devices have not reported yet has no cabinet alarms: a light is
        silent only once it was heard (here or before a restart)."""
        engine, box = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + 20 * MIN, {"sl-4": ON})
        assert raised(box) == []

    def test_fewer_than_min_lights_dark_is_no_cabinet_alarm(self):
        engine, box = engine_for(fleet=CABINET_FLEET)
        feed(engine, NIGHT, NIGHT + 2 * MIN, self.ALL)
        feed(engine, NIGHT + 2 * MIN, NIGHT + 12 * MIN, {"sl-3": ON, "sl-4": ON})
        assert raised(box) == []  # 2 of 4: half, but fewer than 3


# --------------------------------------------------------------------------- counters, state


class TestBurningHours:
    def test_burning_hours_and_switch_ons_count_lit_time_between_readings(self):
        engine, _ = engine_for()
        feed(engine, NIGHT, NIGHT + MIN, {"sl-1": OFF})
        feed(engine, NIGHT + MIN, NIGHT + 61 * MIN, {"sl-1": ON})  # one hour on
        feed(engine, NIGHT + 61 * MIN, NIGHT + 62 * MIN, {"sl-1": OFF})
        lamp = engine.lamps.lamps["sl-1"]
        assert lamp.burning_ms == 60 * MIN and lamp.switch_ons == 1
        # A gap over 15 minutes is not guessed; a failed lamp does not burn.
        engine.on_reading("sl-1", dict(ON), NIGHT + 62 * MIN)
        engine.on_reading("sl-1", dict(ON), NIGHT + 90 * MIN)
        feed(engine, NIGHT + 92 * MIN, NIGHT + 95 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        assert lamp.burning_ms == 60 * MIN + 2 * MIN and lamp.switch_ons == 2

    def test_readings_without_power_or_level_are_not_checked(self):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + 10 * MIN, {"sl-1": {"brightness_pct": 100.0,
                                                        "unmeasured": ["power_w"]},
                                               "sl-2": {"motion": True}})
        assert raised(box) == [] and engine.lamps.lamps == {}

    def test_counters_survive_a_restart_and_only_changes_are_saved(self, tmp_path):
        engine, _ = engine_for()
        feed(engine, NIGHT, NIGHT + MIN, {"sl-1": OFF, "sl-5": OFF})
        feed(engine, NIGHT + MIN, NIGHT + 31 * MIN, {"sl-1": ON, "sl-5": OFF})
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.save(engine)
        assert engine.snapshot().lamps == {}  # nothing changed since
        burnt = 30 * MIN - 10_000  # from the first reading on to the last
        assert engine.lamps.lamps["sl-1"].burning_ms == burnt
        engine.on_reading("sl-1", dict(ON), NIGHT + 31 * MIN - 5_000)
        assert engine.snapshot().lamps == {}  # 5 s more burning: saved each 5 minutes burnt
        feed(engine, NIGHT + 31 * MIN, NIGHT + 36 * MIN - 10_000, {"sl-1": ON})
        assert engine.lamps.dirty == set()
        engine.on_reading("sl-1", dict(ON), NIGHT + 36 * MIN - 10_000)
        assert engine.lamps.dirty == {"sl-1"}  # 5 minutes more burnt than saved
        engine.on_reading("sl-1", dict(ON), NIGHT + 36 * MIN)
        engine.lamps.settle()  # the engine stops: all of it
        burnt += 5 * MIN + 10_000
        store.save(engine)
        store.close()
        rows = {r.device_id: r for r in read_lamps(tmp_path)}
        assert rows["sl-1"].burning_h == burnt / 3_600_000 and rows["sl-1"].switch_ons == 1
        assert rows["sl-1"].remaining_life_h == 100_000 - burnt / 3_600_000
        assert (rows["sl-5"].lamp_type, rows["sl-5"].burning_h) == ("generic-40w", 0)
        again, _ = engine_for()
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.restore(again)
        feed(again, NIGHT + 50 * MIN, NIGHT + 52 * MIN, {"sl-1": ON})
        assert again.lamps.lamps["sl-1"].burning_ms == burnt + 11 * 10_000  # 11 intervals
        assert again.lamps.lamps["sl-1"].switch_ons == 1
        store.close()

    def test_a_restored_lamp_alarm_clears_when_the_lamp_burns_again(self, tmp_path):
        engine, _ = engine_for()
        feed(engine, NIGHT, NIGHT + 5 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.save(engine)
        store.close()
        again, box = engine_for()
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.restore(again)
        assert active(again) == ["lamp-fault@sl-1"]
        feed(again, NIGHT + 6 * MIN, NIGHT + 8 * MIN, {"sl-1": ON})
        assert active(again) == [] and box.alerts == [("lamp-fault@sl-1", False,
                                                       again.alerts["lamp-fault@sl-1"].message)]
        store.close()

    def test_a_replaced_lamp_starts_again_and_its_lamp_alarms_clear(self, tmp_path):
        engine, box = engine_for()
        feed(engine, NIGHT, NIGHT + MIN, {"sl-1": OFF})
        feed(engine, NIGHT + MIN, NIGHT + 20 * MIN, {"sl-1": ON})
        feed(engine, NIGHT + 20 * MIN, NIGHT + 25 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        assert active(engine) == ["lamp-fault@sl-1"]
        assert engine.lamp_replaced("sl-1", NIGHT + 26 * MIN)
        assert active(engine) == []
        lamp = engine.lamps.lamps["sl-1"]
        assert (lamp.burning_ms, lamp.switch_ons, lamp.replaced_ms) == (0, 0, NIGHT + 26 * MIN)
        store = RuleStateStore(tmp_path / "rules.sqlite")
        store.save(engine)
        store.close()
        [row] = [r for r in read_lamps(tmp_path) if r.device_id == "sl-1"]
        assert (row.burning_h, row.replaced_ms) == (0, NIGHT + 26 * MIN)
        # Still dark after the new lamp's warm-up: raised again, as a fresh failure.
        feed(engine, NIGHT + 26 * MIN, NIGHT + 30 * MIN, {"sl-1": {**ON, "power_w": 0.5}})
        assert active(engine) == ["lamp-fault@sl-1"]
        assert not engine.lamp_replaced("nope", NIGHT)


# --------------------------------------------------------------------------- the gateway


@pytest.fixture
def api(tmp_path):
    from gateway.app import create_app
    from gateway.tokens import create_token
    from tests.unit.test_gateway_fakes import FakeFeed, FakePublisher, FakeStore

    registry = Registry(tmp_path)
    registry.upsert_many(FLEET)
    engine, _ = engine_for()
    feed(engine, NIGHT, NIGHT + MIN, {"sl-1": OFF, "sl-2": OFF, "sl-5": OFF})
    feed(engine, NIGHT + MIN, NIGHT + 61 * MIN, {"sl-1": ON, "sl-2": OFF, "sl-5": ON})
    feed(engine, NIGHT + 61 * MIN, NIGHT + 91 * MIN, {"sl-1": ON, "sl-2": ON, "sl-5": OFF})
    for k in range(3):  # sl-2 switches on three more times
        feed(engine, NIGHT + (91 + 2 * k) * MIN, NIGHT + (92 + 2 * k) * MIN, {"sl-2": OFF})
        feed(engine, NIGHT + (92 + 2 * k) * MIN, NIGHT + (93 + 2 * k) * MIN, {"sl-2": ON})
    store = RuleStateStore(tmp_path / "rules.sqlite")
    store.save(engine)
    store.close()
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path))
    app = create_app(settings, store=FakeStore(), registry=registry, feed=FakeFeed({}),
                     publisher=FakePublisher())
    with TestClient(app) as client:
        yield client, {"Authorization": f"Bearer {create_token(tmp_path, 'viewer', 'v')}"}
    registry.close()


def test_the_lamps_route_sorts_limits_and_filters(api):
    client, viewer = api
    get = lambda **p: client.get("/api/v1/lamps", headers=viewer, params=p)  # noqa: E731
    lamps_ = get().json()
    assert [(r["device_id"], r["district"], r["switch_ons"]) for r in lamps_] == [
        ("sl-1", "norrebro", 1), ("sl-5", "valby", 1), ("sl-2", "norrebro", 4)]
    assert lamps_[0] == {"device_id": "sl-1", "district": "norrebro", "lamp_type": "led-55w",
                         "burning_h": 1.497, "switch_ons": 1, "remaining_life_h": 99998.503,
                         "replaced_ms": None}  # on from +1 min to +90:50
    assert lamps_[1]["lamp_type"] == "generic-40w" and lamps_[1]["burning_h"] == 1.0
    assert [r["device_id"] for r in get(sort="switch_ons").json()] == ["sl-2", "sl-1", "sl-5"]
    assert [r["device_id"] for r in get(sort="remaining_life_h", limit=2).json()] == [
        "sl-1", "sl-5"]
    assert [r["device_id"] for r in get(sort="device_id").json()] == ["sl-1", "sl-2", "sl-5"]
    assert [r["device_id"] for r in get(district="valby").json()] == ["sl-5"]
    bad = get(sort="colour")
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert client.get("/api/v1/lamps").status_code == 401
