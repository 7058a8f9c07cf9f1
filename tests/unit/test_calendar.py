"""Lighting calendars: Danish holidays, programs and calendar entries in a rule file (refused
with file:line:column when wrong), the engine's calendar wishes at the steps' event times,
explain, `citygrid calendar show`, and the YAML rule tests."""

from __future__ import annotations

import json
from datetime import date, datetime

import pytest
import yaml

from cityctl.cli import main
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.holidays import easter, of_year, on
from rules.calendar import lighting_day, resolve
from rules.engine import RuleEngine
from rules.loader import DEFAULT_RULES, EXAMPLES, RuleFileError, load, parse_text
from rules.schedules import CityTime
from rules.state import RuleStateStore
from rules.testing import run_file
from tests.helpers import Box

TZ = COPENHAGEN.tz
CALENDAR = EXAMPLES / "calendar.yaml"


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


FLEET = Fleet([
    FleetDevice("sl-1", "streetlight", "norrebro", 55.696000, 12.544, rated_w=50,
                road="residential"),
    FleetDevice("sl-2", "streetlight", "norrebro", 55.696252, 12.544, rated_w=50,
                road="residential"),
    FleetDevice("sl-3", "streetlight", "norrebro", 55.698700, 12.544, rated_w=50, road="park"),
    FleetDevice("sl-4", "streetlight", "indre-by", 55.679800, 12.590, rated_w=50,
                road="arterial", cabinet="nyhavn-2"),
    FleetDevice("m-1", "meter", "norrebro", 55.6961, 12.5441, account_id="acc-1",
                tariff="residential"),
])

SMALL = """
settings: {safety_floor: {level: 20, when: "sun.elevation < -4"}}
programs:
  night:
    - {at: sunset, level: 100}
    - {at: "23:00", level: 50}
    - {at: "01:00", level: 10}
    - {at: sunrise, level: 0}
calendar:
  - name: parks
    select: {road: park}
    program: [{at: sunset, level: 60}, {at: sunrise, level: 0}]
  - name: all-night
    program: night
"""


def save_state(engine: RuleEngine, tmp_path) -> None:
    """The engine's state, saved as `rules run` saves it, in ``tmp_path/rules.sqlite``."""
    store = RuleStateStore(tmp_path / "rules.sqlite")
    store.save(engine)
    store.close()


def restarted(engine: RuleEngine, text: str, tmp_path) -> RuleEngine:
    """A new engine with the rules ``text``, from ``engine``'s saved state (a restart)."""
    from rules.state import engine_from_state

    save_state(engine, tmp_path)
    return engine_from_state(parse_text(text), FLEET, COPENHAGEN, tmp_path / "rules.sqlite")


def run_night(engine: RuleEngine, start_ms: int, hours: float, step_ms: int = 1000) -> None:
    for t in range(start_ms, start_ms + int(hours * 3_600_000) + 1, step_ms):
        engine.advance(t)


# --------------------------------------------------------------------------- holidays


@pytest.mark.parametrize("year, sunday", [(2024, date(2024, 3, 31)), (2025, date(2025, 4, 20)),
                                          (2026, date(2026, 4, 5)), (2027, date(2027, 3, 28)),
                                          (2000, date(2000, 4, 23)), (2038, date(2038, 4, 25))])
def test_easter_sunday_by_the_anonymous_gregorian_algorithm(year, sunday):
    assert easter(year) == sunday


def test_danish_holidays_of_2026():
    official = {d: h.title for d, h in of_year("dk", 2026).items() if h.official}
    assert official == {
        date(2026, 1, 1): "Nytårsdag", date(2026, 4, 2): "Skærtorsdag",
        date(2026, 4, 3): "Langfredag", date(2026, 4, 5): "Påskedag",
        date(2026, 4, 6): "2. påskedag", date(2026, 5, 14): "Kristi himmelfartsdag",
        date(2026, 5, 24): "Pinsedag", date(2026, 5, 25): "2. pinsedag",
        date(2026, 12, 25): "Juledag", date(2026, 12, 26): "2. juledag"}


def test_store_bededag_until_2023_only():
    assert on(date(2023, 5, 5), "dk").title == "Store bededag"  # Easter 2023-04-09 + 26 days
    assert on(date(2024, 4, 26), "dk") is None  # abolished from 2024
    assert "store-bededag" not in {h.name for h in of_year("dk", 2024).values()}


def test_customary_days_only_when_named():
    assert on(date(2026, 12, 24), "dk") is None
    assert on(date(2026, 6, 5), "dk") is None
    assert on(date(2026, 12, 24), "dk", frozenset({"juleaftensdag"})).title == "Juleaftensdag"
    assert on(date(2026, 6, 5), "dk", frozenset({"grundlovsdag"})).name == "grundlovsdag"
    assert on(date(2026, 12, 25), "dk", frozenset({"juleaftensdag"})) is None  # not named


# --------------------------------------------------------------------------- rule files


def problems_of(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as e:
        parse_text(text, "cal.yaml")
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize("text, where, says", [
    ("calendar:\n  - name: a\n    program: nope\n", "cal.yaml:3:14",
     "calendar[0] (a): unknown program 'nope' (there is no programs: section)"),
    ("programs:\n  p: [{at: sunset, level: 1}]\ncalendar:\n  - {name: a, program: q}\n",
     "cal.yaml:4:24", "unknown program 'q'; programs: p"),
    ("calendar:\n  - name: a\n    date: 2026-02-30\n    program: [{at: sunset, level: 1}]\n",
     "cal.yaml:3:11", "'2026-02-30': day is out of range for month"),
    ("calendar:\n  - name: a\n    dates: {from: 2026-12-23, to: 2026-11-20}\n"
     "    program: [{at: sunset, level: 1}]\n", "cal.yaml:3:12",
     "from 2026-12-23 is after to 2026-11-20: no day to match"),
    ("calendar:\n  - name: a\n    weekdays: []\n    program: [{at: sunset, level: 1}]\n",
     "cal.yaml:3:15", "calendar.0.weekdays: List should have at least 1 item"),
    ("calendar:\n  - name: a\n    weekdays: [fri, sun, funday]\n"
     "    program: [{at: sunset, level: 1}]\n", "cal.yaml:3:26", "got 'funday'"),
    ("calendar:\n  - name: a\n    holidays: {dk: [juledag, xmas]}\n"
     "    program: [{at: sunset, level: 1}]\n", "cal.yaml:3:15",
     "'xmas': not a holiday of dk; known: nytaarsdag"),
    ("calendar:\n  - name: a\n    holidays: {dk: []}\n    program: [{at: sunset, level: 1}]\n",
     "cal.yaml:3:15", "no holiday named for dk: nothing to match"),
    ("calendar:\n  - name: a\n    holidays: se\n    program: [{at: sunset, level: 1}]\n",
     "cal.yaml:3:15", "no holidays known for 'se'; known: dk"),
    ("calendar:\n  - name: a\n    select: {kind: meter}\n    program: [{at: sunset, level: 1}]\n",
     "cal.yaml:2:5", "this entry selects meters only"),
    ("calendar:\n  - name: a\n    date: 2026-12-24\n    weekdays: [fri]\n"
     "    program: [{at: sunset, level: 1}]\n", "cal.yaml:2:5",
     "give at most one of date, dates, weekdays, holidays (got date, weekdays)"),
    ("calendar:\n  - {name: a, program: [{at: sunset, level: 1}]}\n"
     "  - {name: a, program: [{at: sunset, level: 1}]}\n", "cal.yaml:3:12",
     "calendar[1]: entry name 'a' is used twice"),
    ("calendar:\n  - {name: a, program: [], colour: red}\n", "cal.yaml:2:28",
     "unknown key 'colour' in calendar.0"),
    ("programs:\n  p:\n    - {at: sunsett, level: 100}\n", "cal.yaml:3:12",
     "programs.p.0.at: 'sunsett' is not HH:MM or a sun event"),
    ("programs:\n  p:\n    - {at: 23:00, level: 100}\n", "cal.yaml:3:12",
     'write clock times in quotes, e.g. "23:00"'),
    ("programs:\n  p:\n    - {at: sunset, level: 120}\n", "cal.yaml:3:27",
     "programs.p.0.level: got 120"),
    ("programs:\n  p:\n    - {at: '01:00', level: 20}\n    - {at: '23:00', level: 50}\n",
     "cal.yaml:3:5", "'23:00' is listed after '01:00'"),
    ("programs:\n  p: []\n", "cal.yaml:2:6", "at least 1 item"),
])
def test_a_bad_calendar_is_refused_with_file_line_and_column(text, where, says):
    found = problems_of(text)
    assert any(p.startswith(where + ":") and says in p for p in found), found


def test_every_calendar_error_at_once_with_the_rules_errors():
    found = problems_of("calendar:\n  - {name: a, program: nope}\n"
                        "  - {name: b, date: '2026-13-01', program: nope}\n"
                        "rules:\n  - {id: r, when: {reading: {}}, if: 'x >', then: []}\n")
    assert len([p for p in found if "unknown program 'nope'" in p]) == 2
    assert any(p.startswith("cal.yaml:3:21: calendar.1.date") for p in found), found
    assert any(p.startswith("cal.yaml:5:") for p in found)  # the rule's errors too


def test_rules_check_refuses_a_bad_calendar(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("calendar:\n  - name: christmas\n    program: market\n")
    assert main(["rules", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3:14: calendar[0] (christmas): unknown program 'market'" in out
    assert main(["rules", "check", str(CALENDAR)]) == 0


def test_a_folder_of_rule_files_keeps_each_files_programs_and_refuses_an_entry_twice(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL)
    (tmp_path / "b.yaml").write_text("programs:\n  night: [{at: sunset, level: 5}]\n"
                                     "calendar:\n  - {name: extra, program: night}\n")
    ruleset = load(tmp_path)
    assert [e.name for e in ruleset.calendar.entries] == ["parks", "all-night", "extra"]
    assert ruleset.calendar.entries[1].program.steps[0].level == 100  # a.yaml's `night`
    assert ruleset.calendar.entries[2].program.steps[0].level == 5
    (tmp_path / "b.yaml").write_text("calendar:\n  - {name: parks, program: [{at: sunset, "
                                     "level: 5}]}\n")
    with pytest.raises(RuleFileError, match="calendar entry 'parks' is also in"):
        load(tmp_path)


def test_rule_files_without_a_calendar_cost_the_engine_nothing():
    ruleset = load(DEFAULT_RULES)
    assert not ruleset.calendar
    engine = RuleEngine(ruleset, FLEET, COPENHAGEN, Box(), track_acks=False)
    engine.advance(ms(2026, 11, 27, 22))  # one look, at the first event time
    assert engine.calendar.next_ms == float("inf")
    run_night(engine, ms(2026, 11, 27, 22), 0.1)
    assert all(not k.startswith("calendar") for s in engine.lights.values() for k in s.wishes)


def test_a_restart_without_the_calendar_withdraws_its_saved_wishes(tmp_path):
    engine, box = engine_for()
    start = ms(2026, 11, 27, 22)
    run_night(engine, start, 0.01)
    again = restarted(engine, "settings: {safety_floor: {level: 20}}\n", tmp_path)
    assert "calendar@sl-1" in again.lights["sl-1"].wishes
    again.outbox = box2 = Box()
    again.advance(start + 60_000)
    assert not again.lights["sl-1"].wishes
    assert sorted((d, level, reason) for d, level, reason, _ in box2.commands) == [
        (d, 20, "safety:night-floor") for d in ("sl-1", "sl-2", "sl-3", "sl-4")]


# --------------------------------------------------------------------------- time


def test_a_lighting_day_runs_noon_to_noon():
    assert lighting_day(datetime(2026, 12, 25, 3, 0, tzinfo=TZ)) == date(2026, 12, 24)
    assert lighting_day(datetime(2026, 12, 25, 11, 59, tzinfo=TZ)) == date(2026, 12, 24)
    assert lighting_day(datetime(2026, 12, 25, 12, 0, tzinfo=TZ)) == date(2026, 12, 25)


def times(day: date, text: str = SMALL, entry: int = 1) -> list[tuple[str, float]]:
    city_time = CityTime(COPENHAGEN)
    program = parse_text(text).calendar.entries[entry].program
    return [(s.local(city_time).strftime("%d %H:%M"), s.level)
            for s in resolve(program, day, city_time)]


def test_steps_cross_midnight_with_sun_times_resolved_to_the_minute():
    assert times(date(2026, 11, 27)) == [("27 15:47", 100), ("27 23:00", 50), ("28 01:00", 10),
                                         ("28 08:09", 0)]


def test_in_summer_a_step_after_the_nights_end_is_left_out_and_one_before_its_predecessor_waits():
    text = """
calendar:
  - name: x
    program: [{at: sunset+10m, level: 60}, {at: "22:00", level: 30}, {at: "05:30", level: 70},
              {at: sunrise-15m, level: 0}]
"""
    # sunset 21:58 (+10m: 22:08, after 22:00), sunrise 04:25 (−15m: 04:10, before 05:30)
    assert times(date(2026, 6, 20), text, 0) == [("20 22:08", 60), ("20 22:08", 30),
                                                ("21 04:10", 0)]
    assert times(date(2026, 12, 1), text, 0) == [("01 15:53", 60), ("01 22:00", 30),
                                                ("02 05:30", 70), ("02 08:01", 0)]


# --------------------------------------------------------------------------- the engine


def engine_for(text: str = SMALL, fleet: Fleet = FLEET, **kw) -> tuple[RuleEngine, Box]:
    box = Box()
    return RuleEngine(parse_text(text), fleet, COPENHAGEN, box, track_acks=False, **kw), box


def test_levels_change_at_the_steps_in_event_time_and_the_safety_floor_still_holds():
    engine, box = engine_for()
    run_night(engine, ms(2026, 11, 27, 12), 23, 10_000)
    sl1 = [(datetime.fromtimestamp(ts / 1000, TZ).strftime("%d %H:%M"), level, reason)
           for d, level, reason, ts in box.commands if d == "sl-1"]
    assert sl1 == [("27 12:00", 0, "calendar:all-night/night"),
                   ("27 15:47", 100, "calendar:all-night/night"),
                   ("27 23:00", 50, "calendar:all-night/night"),
                   ("28 01:00", 20, "safety:night-floor"),  # 10 %: lifted to the floor
                   ("28 07:41", 10, "calendar:all-night/night"),  # the floor's night is over
                   ("28 08:09", 0, "calendar:all-night/night")]
    sl3 = [(level, reason) for d, level, reason, _ in box.commands if d == "sl-3"]
    assert sl3 == [(0, "calendar:parks"), (60, "calendar:parks"), (0, "calendar:parks")]
    assert not [c for c in box.commands if c[0] == "m-1"]  # meters get no calendar


def test_the_calendar_runs_only_at_its_steps_and_wishes_only_on_lights_whose_level_changes():
    fleet = Fleet([FleetDevice(f"sl-{i}", "streetlight", "norrebro", 55.69 + i * 1e-4, 12.54,
                               rated_w=50, road="park" if i % 10 == 0 else "residential")
                   for i in range(200)])
    engine, _ = engine_for(fleet=fleet)
    runs, wished = [], []
    run, wish = engine.calendar.run, engine.wish

    def now_of(r):
        return datetime.fromtimestamp(r[-1] / 1000, TZ).strftime("%H:%M")

    def counted(device_id, w):
        wished.append((now_of(runs), device_id))
        wish(device_id, w)

    engine.calendar.run = lambda now: (runs.append(now), run(now))
    engine.wish = counted

    run_night(engine, ms(2026, 11, 27, 22), 11)  # 22:00 → 09:00, a second at a time
    # At the start, at 23:00, 01:00 and sunrise (08:09): nothing in between.
    assert [now_of([t]) for t in runs] == ["22:00", "23:00", "01:00", "08:09"]
    by_time: dict[str, int] = {}
    for when, _ in wished:
        by_time[when] = by_time.get(when, 0) + 1
    # The parks (20 lights) change only at sunrise; the other 180 at every step.
    assert by_time == {"22:00": 200, "23:00": 180, "01:00": 180, "08:09": 200}


def test_motion_and_an_override_beat_the_calendar():
    text = SMALL + """
rules:
  - id: motion-boost
    when: {reading: {kind: streetlight}}
    if: "reading.motion"
    then: [{set_light: {level: 90, priority: sensor, hold: 60s}}]
"""
    engine, box = engine_for(text)
    start = ms(2026, 11, 27, 22)
    engine.advance(start)
    engine.on_reading("sl-1", {"motion": True}, start + 1000)
    assert engine.lights["sl-1"].level == 90
    engine.set_override("sl-2", 5, start + 2000)
    run_night(engine, start + 3000, 1.5)  # past 23:00
    assert engine.lights["sl-1"].level == 50 and engine.lights["sl-1"].reason == \
        "calendar:all-night/night"
    assert engine.lights["sl-2"].level == 5  # an override wins, below the floor too
    engine.clear_override("sl-2", start + 2 * 3_600_000)
    assert engine.lights["sl-2"].level == 50


def test_a_reload_changes_the_calendar_at_once_and_without_one_its_wishes_go():
    engine, box = engine_for()
    start = ms(2026, 11, 27, 22)
    run_night(engine, start, 0.01)
    assert engine.lights["sl-1"].level == 100
    engine.set_rules(parse_text(SMALL.replace("level: 100", "level: 80")))
    run_night(engine, start + 60_000, 0.01)
    assert engine.lights["sl-1"].level == 80
    engine.set_rules(parse_text("settings: {safety_floor: {level: 20}}\n"))
    run_night(engine, start + 120_000, 0.01)
    assert engine.lights["sl-1"].level == 20 and engine.lights["sl-1"].reason == \
        "safety:night-floor"
    assert not any(engine.lights[d].wishes for d in ("sl-1", "sl-2", "sl-3", "sl-4"))


def test_a_restart_from_saved_state_issues_no_command_again(tmp_path):
    engine, box = engine_for()
    start = ms(2026, 11, 27, 22)
    run_night(engine, start, 0.01)
    again = restarted(engine, SMALL, tmp_path)
    again.outbox = box2 = Box()
    run_night(again, start + 60_000, 1.1, 10_000)
    assert sorted((d, level, datetime.fromtimestamp(ts / 1000, TZ).strftime("%H:%M"))
                  for d, level, _, ts in box2.commands) == [
        ("sl-1", 50, "23:00"), ("sl-2", 50, "23:00"), ("sl-4", 50, "23:00")]


def test_a_partitioned_engine_wishes_on_its_own_lights_only():
    engine, box = engine_for(owned_districts={"indre-by"})
    run_night(engine, ms(2026, 11, 27, 22), 0.01)
    assert {d for d, *_ in box.commands} == {"sl-4"}


def test_explain_names_the_entry_and_program_with_the_days_steps():
    engine, _ = engine_for()
    now = ms(2026, 11, 28, 0, 30)
    engine.advance(now)
    c = engine.explain("sl-1")["calendar"]
    assert c["entry"] == "all-night" and c["program"] == "night" and c["level"] == 50
    assert c["day"] == "2026-11-27" and c["holiday"] is None
    assert [(s["time"], s["level"], s["in_force"]) for s in c["steps"]] == [
        ("15:47", 100, False), ("23:00", 50, True), ("01:00", 10, False), ("08:09", 0, False)]
    assert engine.explain("sl-3")["calendar"]["reason"] == "calendar:parks"
    assert engine.explain("m-1")["calendar"] == {"day": "2026-11-27", "entry": None}


def test_rules_explain_prints_the_calendar(tmp_path, capsys, monkeypatch):
    engine, _ = engine_for(CALENDAR.read_text())
    engine.advance(ms(2026, 12, 25, 23, 0))
    save_state(engine, tmp_path)
    FLEET.dump(tmp_path / "fleet.geojson")
    monkeypatch.setenv("CITYGRID_DATA_DIR", str(tmp_path))
    assert main(["rules", "explain", "sl-1", "--rules", str(CALENDAR),
                 "--fleet", str(tmp_path / "fleet.geojson")]) == 0
    out = capsys.readouterr().out
    assert "sl-1 is at 100 % (calendar:public-holidays/holiday)" in out
    assert ("calendar: entry public-holidays, program holiday "
            "(calendar:public-holidays/holiday) on the lighting day 2026-12-25, Juledag: "
            "100 % now") in out
    assert "   → 15:51    100 %  (sunset+10m)\n     00:30     50 %  (00:30)\n" in out


# --------------------------------------------------------------------------- calendar show


def test_calendar_show_with_a_fleet_counts_the_lights_each_entry_wins(tmp_path, capsys):
    FLEET.dump(tmp_path / "fleet.geojson")
    assert main(["calendar", "show", "--date", "2026-12-04", "--rules", str(CALENDAR),
                 "--fleet", str(tmp_path / "fleet.geojson")]) == 0
    out = capsys.readouterr().out
    assert "lighting day 2026-12-04 (Friday): Fri 04 Dec 12:00 → Sat 05 Dec 12:00" in out
    assert """
christmas-market-nyhavn: program market — 1 light
  matches from 2026-11-20 to 2026-12-23; selects district indre-by, cabinet nyhavn-*
  Fri 15:40    100 %  (sunset)
  Fri 23:00     50 %  (23:00)
  Sat 01:00     20 %  (01:00)
  Sat 05:30     70 %  (05:30)
  Sat 08:06      0 %  (sunrise-15m)
""" in out
    assert "parks-and-footpaths: program paths — 1 light" in out
    assert "weekend: program weekend — 2 lights\n  matches on fri, sat;" in out
    assert "standard" not in out  # it wins no light on a Friday


def test_calendar_show_names_the_holiday_and_without_a_fleet_the_selections(tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("CITYGRID_DATA_DIR", str(tmp_path))  # no registry there
    monkeypatch.delenv("CITYGRID_FLEET", raising=False)
    monkeypatch.setenv("CITYGRID_RULES", str(CALENDAR))
    assert main(["calendar", "show", "--date", "2027-03-26"]) == 0  # Langfredag 2027
    out = capsys.readouterr().out
    assert "public-holidays: program holiday — all lights (those no entry above takes)\n" \
           "  matches on public holidays (dk): Langfredag\n  Fri 18:" in out
    assert "weekend" not in out  # every light is taken above it
    assert main(["calendar", "show", "--date", "2026-12-24"]) == 0
    assert "festive-eves: program festive" in capsys.readouterr().out.split("\n\n")[1]


def test_calendar_show_refuses_a_bad_date(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calendar", "show", "--date", "2026-12-32"])
    assert e.value.code == 2
    assert "'2026-12-32' is not a date like 2026-12-24" in capsys.readouterr().err


# --------------------------------------------------------------------------- rule tests


def test_the_calendar_example_rule_tests_pass():
    results = run_file(EXAMPLES / "calendar_test.yaml")
    assert len(results) >= 7
    assert [r.name for r in results if not r.ok] == []


def test_a_wrong_calendar_level_in_a_rule_test_fails(tmp_path):
    doc = yaml.safe_load((EXAMPLES / "calendar_test.yaml").read_text())
    doc["rules"] = str(CALENDAR)
    doc["tests"] = [t for t in doc["tests"] if t["name"].startswith("a Friday night")]
    doc["tests"][0]["expect"]["commands"][5]["level"] = 40  # 01:00: 50, not 40
    path = tmp_path / "wrong_test.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    [result] = run_file(path)
    assert not result.ok
    assert any("missing command: {at: 2h30m, device: sl-1, level: 40" in f
               for f in result.failures), result.failures
    assert any("unexpected command: {at: 9000.0, device: sl-1, level: 50.0, reason: "
               "calendar:weekend/weekend}" in f for f in result.failures)


def test_the_schema_documents_programs_and_calendar(capsys):
    assert main(["rules", "schema"]) == 0
    props = json.loads(capsys.readouterr().out)["properties"]
    assert {"programs", "calendar"} <= set(props)


def test_the_runner_refuses_a_bad_calendar_whole_and_the_running_one_goes_on(tmp_path):
    import os

    import orjson

    from citygrid.contract import Topic
    from citygrid.settings import Settings
    from rules.runner import RuleRunner, RunnerConfig
    from tests.helpers import light_reading

    rules = tmp_path / "city.yaml"
    rules.write_text(SMALL)
    night = ms(2026, 11, 27, 22)

    class Clock:
        def now_ms(self) -> int:
            return night

        def monotonic(self) -> float:
            return 0.0

    runner = RuleRunner(Settings(mqtt_url="mqtt://127.0.0.1:1", data_dir=str(tmp_path)), FLEET,
                        COPENHAGEN, None, RunnerConfig(rules), clock=Clock())
    try:
        topic = str(Topic("norrebro", "streetlight", "sl-1"))
        runner.handle(topic, orjson.dumps(light_reading(1, night)))
        assert runner.engine.lights["sl-1"].level == 100
        rules.write_text(SMALL.replace("program: night", "program: nightt"))
        os.utime(rules, (1, 1))
        assert runner.reload_if_changed() is False
        assert f"{rules}:14:14: calendar[1] (all-night): unknown program 'nightt'" in \
            runner.last_reload_error
        runner.handle(topic, orjson.dumps(light_reading(2, night + 60_000)))
        assert runner.engine.lights["sl-1"].reason == "calendar:all-night/night"
        rules.write_text(SMALL.replace("level: 100", "level: 90"))
        os.utime(rules, (2, 2))
        assert runner.reload_if_changed() is True
        runner.handle(topic, orjson.dumps(light_reading(3, night + 120_000)))
        assert runner.engine.lights["sl-1"].level == 90
    finally:
        runner.stop()
