"""`citygrid rules backtest` with a lighting calendar: its steps fire at their event times
over stored history, on every store backend, and the report shows them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

from citygrid.city import COPENHAGEN
from citygrid.store import Point
from rules.backtest import backtest
from rules.loader import EXAMPLES
from tests.helpers import REPO, rules_fleet

CALENDAR = EXAMPLES / "calendar.yaml"
# A Wednesday: the standard program (on at sunset+10m, 50 % at 23:00, 20 % at 01:00).
EVENING = int(datetime(2026, 11, 25, 22, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)


def readings(uid: str, hours: float) -> list[Point]:
    return [Point("streetlight", {"device_id": device, "district": uid},
                  {"seq": minute + 1, "brightness_pct": 100.0, "power_w": 54.5,
                   "energy_wh": float(minute), "lux": 0.5, "motion": False},
                  EVENING + minute * 60_000 + n * 1000)
            for minute in range(int(hours * 60))
            for n, device in enumerate(("sl-1", "sl-2", "sl-3"))]


def test_backtest_fires_the_calendars_steps_at_their_event_times(store, uid):
    store.write(readings(uid, 3.5))  # 22:00 → 01:30
    report = backtest(store, CALENDAR, rules_fleet(uid), COPENHAGEN, EVENING,
                      EVENING + int(3.5 * 3_600_000))
    assert report["commands_by_reason"] == {"calendar:standard/standard": 3 * 3}
    steps = [(datetime.fromtimestamp(s["ts_ms"] / 1000, COPENHAGEN.tz).strftime("%H:%M"),
              s["level"], s["lights"]) for s in report["calendar_steps"]]
    assert steps == [("22:00", 100, 3), ("23:00", 50, 3), ("01:00", 20, 3)]
    # 1 h at 100 %, 2 h at 50 %, 0.5 h at 20 %: 2.1 of 3.5 hours' full light, 40 % saved
    assert 38 < report["saved_pct"] < 41


def test_backtest_command_prints_the_calendar_steps(influx_store, uid, tmp_path):
    influx_store.write(readings(uid, 1.5))
    rules_fleet(uid).dump(tmp_path / "fleet.geojson")
    result = subprocess.run(
        [sys.executable, "-m", "cityctl", "rules", "backtest", "--from",
         "2026-11-25T22:00:00+01:00", "--to", "2026-11-25T23:30:00+01:00", "--influx-url",
         influx_store.url, "--influx-db", influx_store.database, "--fleet",
         str(tmp_path / "fleet.geojson"), "--rules", str(CALENDAR)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert "calendar:standard/standard   6" in result.stdout
    assert "calendar steps: 2\n" in result.stdout
    assert "  2026-11-25 23:00  calendar:standard/standard                  50 %  on 3 lights" \
        in result.stdout
