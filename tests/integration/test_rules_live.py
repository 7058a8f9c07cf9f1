"""`citygrid rules run` against the real Mosquitto: readings in, commands out, state kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import orjson
import pytest

from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from citygrid.store.sqlite import SqliteStore
from rules.loader import DEFAULT_RULES
from tests.helpers import (
    NIGHT,
    REPO,
    Collector,
    light_reading,
    rules_fleet,
    run_in_thread,
    wait_until,
)


class RulesProcess:
    def __init__(self, mosquitto, uid, tmp_path, rules_path=DEFAULT_RULES):
        self.argv = [sys.executable, "-m", "cityctl", "rules", "run", "--mqtt-url",
                     mosquitto.url, "--data-dir", str(tmp_path / "data"), "--fleet",
                     str(tmp_path / "fleet.geojson"), "--rules", str(rules_path),
                     "--topic", f"city/v1/{uid}/+/+/telemetry", "--client-id", f"rules-{uid}"]
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = tmp_path / "rules.log"
        self.tmp_path = tmp_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        before = self.log.read_text() if self.log.exists() else ""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(lambda: self.log.read_text().count("rules running") >
                   before.count("rules running"), message="rules running")
        time.sleep(0.3)  # subscribed before the log line; let the SUBACK settle

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(20)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cityctl", "rules", *args,
                               "--data-dir", str(self.tmp_path / "data"), "--fleet",
                               str(self.tmp_path / "fleet.geojson")],
                              env=self.env, capture_output=True, text=True)


@pytest.fixture
def rules_env(mosquitto, uid, tmp_path, publisher):
    rules_fleet(uid).dump(tmp_path / "fleet.geojson")
    commands = Collector(mosquitto.url, f"city/v1/{uid}/streetlight/+/cmd")
    process = RulesProcess(mosquitto, uid, tmp_path)
    yield process, commands, publisher
    process.stop()
    commands.close()


def sent(commands: Collector) -> list[tuple[str, float, str]]:
    out = []
    for topic, payload, _ in commands.messages:
        body = orjson.loads(payload)
        out.append((Topic.parse(topic).device_id, body["brightness_pct"], body["reason"]))
    return out


def test_motion_commands_the_light_and_its_neighbours_then_the_baseline_returns(
        rules_env, uid):
    process, commands, pub = rules_env
    process.start()
    t = lambda d: str(Topic(uid, "streetlight", d))  # noqa: E731
    for d in ("sl-1", "sl-2", "sl-3"):
        pub.send(t(d), light_reading(1, NIGHT))
    wait_until(lambda: len(sent(commands)) == 3, message="three baseline commands")
    assert sorted(sent(commands)) == [(d, 30.0, "rule:dark-baseline")
                                      for d in ("sl-1", "sl-2", "sl-3")]
    pub.send(t("sl-1"), light_reading(2, NIGHT + 60_000, motion=True))
    wait_until(lambda: len(sent(commands)) == 5, message="motion commands")
    assert sorted(sent(commands)[3:]) == [("sl-1", 100.0, "rule:motion-boost"),
                                          ("sl-2", 100.0, "rule:motion-boost")]
    body = orjson.loads(commands.messages[3][1])
    assert body["hold_s"] == 120.0 and body["ts"] == NIGHT + 60_000
    # Event time: 130 s later by the readings' clock, the hold is over.
    pub.send(t("sl-3"), light_reading(2, NIGHT + 190_000))
    wait_until(lambda: len(sent(commands)) == 7, message="back to baseline")
    assert sorted(sent(commands)[5:]) == [("sl-1", 30.0, "rule:dark-baseline"),
                                          ("sl-2", 30.0, "rule:dark-baseline")]
    # Every command has its own id and an MQTT 5 message expiry (60 s in the example).
    assert len({orjson.loads(p)["id"] for _, p, _ in commands.messages}) == 7
    assert all(e is not None and 0 < e <= 60 for e in commands.expiries), commands.expiries


def test_a_hold_survives_killing_the_engine(rules_env, uid):
    process, commands, pub = rules_env
    t = lambda d: str(Topic(uid, "streetlight", d))  # noqa: E731
    process.start()
    pub.send(t("sl-1"), light_reading(1, NIGHT))
    pub.send(t("sl-1"), light_reading(2, NIGHT + 10_000, motion=True))
    wait_until(lambda: ("sl-1", 100.0, "rule:motion-boost") in sent(commands))
    time.sleep(0.6)  # the state is saved every 0.2 s
    process.stop(signal.SIGKILL)
    process.start()
    explained = process.cli("explain", "sl-1", "--json")
    assert orjson.loads(explained.stdout)["winner"]["reason"] == "rule:motion-boost"
    n = len(sent(commands))
    pub.send(t("sl-1"), light_reading(3, NIGHT + 60_000))  # still inside the hold
    time.sleep(1.0)
    assert len(sent(commands)) == n, "the restarted engine forgot the hold"
    pub.send(t("sl-1"), light_reading(4, NIGHT + 140_000))
    wait_until(lambda: ("sl-1", 30.0, "rule:dark-baseline") in sent(commands)[n:])
    text = process.cli("explain", "sl-1").stdout
    assert "sl-1 is at 30 % (rule:dark-baseline)" in text


def test_editing_the_rules_reloads_them_and_a_broken_file_is_refused(
        mosquitto, uid, tmp_path, publisher):
    rules_fleet(uid).dump(tmp_path / "fleet.geojson")
    rules = tmp_path / "city.yaml"
    rules.write_text(DEFAULT_RULES.read_text())
    commands = Collector(mosquitto.url, f"city/v1/{uid}/streetlight/+/cmd")
    process = RulesProcess(mosquitto, uid, tmp_path, rules)
    t = str(Topic(uid, "streetlight", "sl-1"))
    try:
        process.start()
        publisher.send(t, light_reading(1, NIGHT))
        wait_until(lambda: ("sl-1", 30.0, "rule:dark-baseline") in sent(commands))
        rules.write_text(DEFAULT_RULES.read_text().replace("level: 30", "level: 45"))
        wait_until(lambda: "rules reloaded" in process.log.read_text(), message="reload")
        publisher.send(t, light_reading(2, NIGHT + 60_000))
        wait_until(lambda: ("sl-1", 45.0, "rule:dark-baseline") in sent(commands))
        rules.write_text("rules:\n  - id: broken\n    when: {reading: {kind: toaster}}\n")
        wait_until(lambda: "rule file refused" in process.log.read_text(), message="refusal")
        status = process.cli("status", "--rules", str(rules))
        assert "LAST RELOAD REFUSED" in status.stdout or status.returncode != 0
        publisher.send(t, light_reading(3, NIGHT + 120_000, motion=True))  # old rules still run
        wait_until(lambda: ("sl-1", 100.0, "rule:motion-boost") in sent(commands))
        log = process.log.read_text()
        assert f"{rules}:3:" in log and "toaster" in log
    finally:
        process.stop()
        commands.close()


def test_lighting_energy_is_written_per_district(rules_env, uid, tmp_path):
    process, commands, pub = rules_env
    process.start()
    t = str(Topic(uid, "streetlight", "sl-1"))
    for i in range(4):
        pub.send(t, light_reading(i + 1, NIGHT + i * 60_000, power_w=16.7))
    wait_until(lambda: len(sent(commands)) >= 1)
    time.sleep(0.5)
    process.stop()
    store = SqliteStore(tmp_path / "data" / "telemetry.sqlite")
    points = store.latest("citygrid_lighting")
    assert points, "no citygrid_lighting points"
    [p] = points.values()
    assert p.tags == {"district": uid}
    assert p.fields["energy_wh"] == pytest.approx(16.7 / 60)
    assert p.fields["baseline_wh"] == pytest.approx((50 * 1.08 + 0.5) / 60)
    assert p.fields["co2_avoided_g"] == pytest.approx(p.fields["saved_wh"] / 1000 * 150)


def test_the_command_reaches_a_simulated_light(mosquitto, uid, tmp_path):
    """End to end: a per-device simulated light takes the rules' command and acks it."""
    from citygrid.settings import MqttUrl
    from simulators.engine import Engine, SimConfig

    fleet = rules_fleet(uid)
    fleet.dump(tmp_path / "fleet.geojson")
    seen = Collector(mosquitto.url, f"city/v1/{uid}/streetlight/+/+")
    process = RulesProcess(mosquitto, uid, tmp_path)
    process.start()
    sim = Engine(MqttUrl.parse(mosquitto.url), fleet, COPENHAGEN,
                 SimConfig(speed=1, interval_s=1, mode="per-device",
                           start_ms=NIGHT, seed=3))
    thread = run_in_thread(sim)
    try:
        def acked_30(device: str) -> bool:
            return any(t.endswith(f"/{device}/ack") and orjson.loads(p)["brightness_pct"] >= 30
                       for t, p, _ in seen.messages)

        wait_until(lambda: all(acked_30(d) for d in ("sl-1", "sl-2", "sl-3")), timeout_s=30,
                   message="every light acknowledged a rule command")
        readings = [orjson.loads(p) for t, p, _ in seen.messages if t.endswith("/telemetry")]
        wait_until(lambda: any(orjson.loads(p)["brightness_pct"] >= 30
                               for t, p, _ in seen.messages[-20:] if t.endswith("/telemetry")))
        assert readings
    finally:
        sim.stop()
        thread.join(10)
        process.stop()
        seen.close()
