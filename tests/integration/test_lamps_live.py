"""The lamp monitor in the real rule runner over the real Mosquitto: a control cabinet's lights
go silent, and the state (what the alert list and the status page read) holds exactly one
cabinet-supply-loss alert — no lamp alarms — until they are back."""

from __future__ import annotations

from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from citygrid.fleet import Fleet, FleetDevice
from rules import read_alerts, read_lamps
from rules.alerts import AlertState
from rules.runner import RuleRunner, RunnerConfig
from tests.helpers import NIGHT, light_reading, wait_until

RULES = """\
version: 1
settings:
  lamp_monitor:
    cabinet: {min_lights: 3, share: 0.5, silent_for: 3m}
rules: []
"""


def _fleet(uid: str) -> Fleet:
    return Fleet([FleetDevice(f"sl-{i}", "streetlight", uid, 55.696 + i * 0.0003, 12.544,
                              rated_w=55, lamp_type="led-55w", cabinet=f"cab-{uid}")
                  for i in range(1, 5)])


def test_a_cabinets_lights_go_silent_one_alarm_then_it_clears(settings, uid, tmp_path,
                                                               publisher):
    rules_path = tmp_path / "lamps.yaml"
    rules_path.write_text(RULES)
    fleet = _fleet(uid)
    runner = RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(
        rules_path, f"city/v1/{uid}/+/+/telemetry", client_id=f"rules-{uid}"))
    runner.start()
    seq = [0]

    def report(lights: list[str], start_s: int, end_s: int) -> None:
        """Each light burning at full power (what a led-55w should draw), every 10 s."""
        last = None
        for t in range(start_s, end_s, 10):
            for light in lights:
                seq[0] += 1
                last = publisher.send(str(Topic(uid, "streetlight", light)), light_reading(
                    seq[0], NIGHT + t * 1000, brightness_pct=100.0, power_w=59.9))
        last.wait_for_publish(10)

    everyone = ["sl-1", "sl-2", "sl-3", "sl-4"]
    data = settings.data_dir
    try:
        report(everyone, 0, 60)
        report(["sl-4"], 60, 300)  # sl-1 … sl-3 silent from +50 s: 3 minutes at +230 s
        key = f"cabinet-supply-loss@cab-{uid}"
        wait_until(lambda: read_alerts(data, active=True), message="the cabinet alarm saved")
        [alert] = read_alerts(data, active=True)
        assert (alert.key, alert.severity, alert.scope) == (key, "critical", f"cab-{uid}")
        assert alert.since_ms == NIGHT + 230_000
        assert "3 of its 4 lights are dark (3 silent)" in alert.message
        labels = runner.alert_labels(runner.engine.alerts[key])
        assert labels == {"cabinet": f"cab-{uid}", "district": uid}
        lamp_alert = AlertState("lamp-fault@sl-1", "lamp-fault", "major", "m", "sl-1", 0)
        assert runner.alert_labels(lamp_alert) == {"device_id": "sl-1", "district": uid,
                                                   "cabinet": f"cab-{uid}"}

        report(everyone, 300, 330)  # the supply is back
        wait_until(lambda: not read_alerts(data, active=True), message="the alarm cleared")
        assert [a.key for a in read_alerts(data)] == [key]  # one alert, ever: no lamp alarms
    finally:
        runner.stop()
    # Stopped, the runner saved all of the burning time: on from the first reading to the
    # last, 320 s (a silence under 15 minutes counts as the state before it, as the lighting
    # energy does).
    lamps = {r.device_id: r for r in read_lamps(data)}
    assert sorted(lamps) == everyone
    assert {round(r.burning_h * 3600) for r in lamps.values()} == {320}, lamps
