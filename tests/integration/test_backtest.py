"""`citygrid rules backtest` over stored history, on every store backend."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import pytest

from citygrid.city import COPENHAGEN
from citygrid.store import Point
from rules.backtest import backtest
from rules.loader import DEFAULT_RULES
from tests.helpers import REPO, rules_fleet

EVENING = int(datetime(2026, 11, 27, 21, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)


def night_of_readings(uid: str, hours: int = 3) -> list[Point]:
    points = []
    for minute in range(hours * 60):
        for n, device in enumerate(("sl-1", "sl-2", "sl-3")):
            motion = device == "sl-1" and minute % 30 == 0
            points.append(Point("streetlight", {"device_id": device, "district": uid},
                                {"seq": minute + 1, "brightness_pct": 100.0, "power_w": 54.5,
                                 "energy_wh": float(minute), "lux": 0.5, "motion": motion},
                                EVENING + minute * 60_000 + n * 1000))
    return points


def test_backtest_reports_commands_and_energy_against_all_night_full(store, uid):
    store.write(night_of_readings(uid))
    report = backtest(store, DEFAULT_RULES, rules_fleet(uid), COPENHAGEN, EVENING,
                      EVENING + 3 * 3_600_000)
    assert report["readings"] == 3 * 3 * 60
    # 6 motions at sl-1, each lifting sl-1 and sl-2 to 100 % and back to 30 %; the first one
    # comes with the first reading, so sl-1 and sl-2 go straight to 100 %; sl-3 gets 30 %.
    assert report["commands_by_reason"] == {"rule:dark-baseline": 1 + 6 * 2,
                                            "rule:motion-boost": 6 * 2}
    # 100 % all night would be 3 lights × 54.5 W × 3 h; the rules keep them near 30 %.
    assert report["baseline_kwh"] == pytest.approx(3 * 54.5 * 3 / 1000, rel=0.02)
    assert 55 < report["saved_pct"] < 70
    assert report["co2_avoided_kg"] == pytest.approx(
        (report["baseline_kwh"] - report["energy_kwh"]) * 150 / 1000)


def test_backtest_command_prints_a_report(influx_store, uid, tmp_path):
    influx_store.write(night_of_readings(uid, hours=1))
    rules_fleet(uid).dump(tmp_path / "fleet.geojson")
    result = subprocess.run(
        [sys.executable, "-m", "cityctl", "rules", "backtest", "--from",
         "2026-11-27T21:00:00+01:00", "--to", "2026-11-27T22:00:00+01:00", "--influx-url",
         influx_store.url, "--influx-db", influx_store.database, "--fleet",
         str(tmp_path / "fleet.geojson")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert "replayed 180 readings" in result.stdout
    assert "rule:motion-boost" in result.stdout and "% saved" in result.stdout
    assert "100.0%" in result.stderr  # the progress bar finished
