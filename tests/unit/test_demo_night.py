"""The demo city's tuning, guarded: its rules save 40–75 % of a winter night's lighting energy
(bench/demo_night.py on a part of the fleet `citygrid up` makes), and the rule tests pass."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import datetime

from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet
from simulators import generate
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("demo_night", REPO / "bench" / "demo_night.py")
demo_night = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_night)


def test_the_demo_rules_save_40_to_75_percent_of_a_winter_night():
    # A district of the `up` fleet (34 lights: arterials, residential streets, a park),
    # 16:00–08:00, a reading every 2 minutes.
    fleet = Fleet(d for d in generate(COPENHAGEN, 300, 0) if d.district == "amager")
    start = datetime(2026, 12, 1, 16, 0, tzinfo=COPENHAGEN.tz)
    result = demo_night.night(REPO / "rules" / "examples" / "demo-city.yaml", fleet, COPENHAGEN,
                              int(start.timestamp() * 1000), 16, 120)
    assert result["motion_events"] > 1000 and result["commands"] > 1000
    assert 40 <= result["overall"]["saved_pct"] <= 75, result["overall"]
    # The engine's own figure and the one kept here by road class are the same sums.
    assert abs(result["roads_overall"]["saved_pct"] - result["overall"]["saved_pct"]) < 0.5
    roads = result["roads"]
    assert set(roads) == {"arterial", "residential", "park"}
    # Busy streets are kept brighter than quiet ones; every class saves something.
    assert 20 <= roads["arterial"]["saved_pct"] < roads["residential"]["saved_pct"] \
        < roads["park"]["saved_pct"] <= 90


def test_the_demo_rule_tests_pass():
    out = subprocess.run([sys.executable, "-m", "cityctl", "rules", "test",
                          "rules/examples/demo-city_test.yaml"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "9 passed, 0 failed" in out.stdout
