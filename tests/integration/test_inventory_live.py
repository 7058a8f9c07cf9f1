"""One live inventory: a registry change reaches a running rule engine and billing within 5 s,
without a restart — added, moved to another district, revoked."""

from __future__ import annotations

import time

import orjson
import pytest

from billing import load_config
from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from citygrid.fleet import FleetDevice
from citygrid.registry import Catalogue, Registry
from citygrid.settings import Settings
from rules.loader import DEFAULT_RULES
from rules.runner import RuleRunner, RunnerConfig
from tests.helpers import NIGHT, Collector, Publisher, light_reading, wait_until

FOLLOWS_WITHIN_S = 5.0


@pytest.fixture
def city(mosquitto, uid, tmp_path):
    data = tmp_path / "data"
    registry = Registry(data, Catalogue(tariffs=frozenset(load_config().tariffs)))
    registry.upsert(FleetDevice("sl-1", "streetlight", uid, 55.696000, 12.544, rated_w=50))
    runner = RuleRunner(
        Settings(mqtt_url=mosquitto.url, data_dir=str(data)), registry.fleet(), COPENHAGEN,
        None, RunnerConfig(DEFAULT_RULES, "city/v1/+/+/+/telemetry", client_id=f"rules-{uid}"),
        inventory=Registry(data))
    runner.start()
    commands = Collector(mosquitto.url, "city/v1/+/streetlight/+/cmd")
    settlements = Collector(mosquitto.url, f"city/v1/{uid}/meter/+/settlement")
    pub = Publisher(mosquitto.url, f"pub-{uid}")
    yield registry, runner, commands, settlements, pub
    pub.close()
    commands.close()
    settlements.close()
    runner.stop()
    registry.close()


def to(commands: Collector, device_id: str) -> list[tuple[str, dict]]:
    return [(Topic.parse(t).district, orjson.loads(p)) for t, p, _ in commands.messages
            if Topic.parse(t).device_id == device_id]


def follows(runner: RuleRunner, predicate) -> None:
    started = time.monotonic()
    wait_until(lambda: predicate(runner.fleet), timeout_s=FOLLOWS_WITHIN_S + 1,
               message="the engine follows the registry")
    assert time.monotonic() - started <= FOLLOWS_WITHIN_S


def test_added_moved_and_revoked_lights_are_followed_without_a_restart(city, uid):
    registry, runner, commands, _, pub = city
    other = uid + "b"
    # Added while the engine runs: its first reading at night gets it the baseline.
    registry.upsert(FleetDevice("sl-2", "streetlight", uid, 55.696252, 12.544, rated_w=50))
    follows(runner, lambda f: "sl-2" in f.by_id)
    pub.send(str(Topic(uid, "streetlight", "sl-2")), light_reading(1, NIGHT))
    wait_until(lambda: to(commands, "sl-2"), message="a command to the new light")
    assert to(commands, "sl-2")[0][1]["brightness_pct"] == 30.0
    # Neighbours: motion at sl-1 boosts the new light 28 m away.
    pub.send(str(Topic(uid, "streetlight", "sl-1")), light_reading(1, NIGHT + 1_000, motion=True))
    wait_until(lambda: any(c["brightness_pct"] == 100.0 for _, c in to(commands, "sl-2")),
               message="the new light is a neighbour")
    # Moved to another district: its commands go to its new topic.
    registry.edit("sl-2", district=other, lat=55.70, lon=12.60)
    follows(runner, lambda f: f.by_id["sl-2"].district == other)
    n = len(to(commands, "sl-2"))
    pub.send(str(Topic(uid, "streetlight", "sl-1")), light_reading(2, NIGHT + 200_000, motion=True))
    pub.send(str(Topic(other, "streetlight", "sl-2")), light_reading(2, NIGHT + 200_000))
    wait_until(lambda: len(to(commands, "sl-2")) > n, message="a command after the move")
    assert {d for d, _ in to(commands, "sl-2")[n:]} == {other}
    assert all(c["brightness_pct"] != 100.0 for _, c in to(commands, "sl-2")[n:]), \
        "2 km away, it is no longer sl-1's neighbour"
    # Revoked: never commanded again.
    registry.set_status("sl-2", "revoked")
    follows(runner, lambda f: "sl-2" not in f.by_id)
    n = len(to(commands, "sl-2"))
    pub.send(str(Topic(other, "streetlight", "sl-2")),
             light_reading(3, NIGHT + 400_000, motion=True))
    pub.send(str(Topic(uid, "streetlight", "sl-1")), light_reading(3, NIGHT + 400_000))
    wait_until(lambda: runner.engine.last_seen.get("sl-1") == NIGHT + 400_000)
    time.sleep(0.5)
    assert len(to(commands, "sl-2")) == n


def test_a_meter_added_while_billing_runs_is_billed(city, uid):
    registry, runner, _, settlements, pub = city
    registry.upsert(FleetDevice("m-1", "meter", uid, 55.66, 12.5, account_id=f"acc-{uid}",
                                tariff="business-flat", max_power_w=17250.0))
    follows(runner, lambda f: "m-1" in f.by_id)
    topic = str(Topic(uid, "meter", "m-1"))
    pub.send(topic, {"ts": NIGHT, "seq": 1, "energy_kwh": 100.0, "power_w": 500.0})
    pub.send(topic, {"ts": NIGHT + 3_600_000, "seq": 2, "energy_kwh": 111.0, "power_w": 500.0})
    wait_until(lambda: settlements.messages, message="the new meter's settlement")
    [(_, body, _)] = settlements.messages
    assert orjson.loads(body)["kwh"] == "11.000000"


def test_rules_run_starts_from_a_filled_registry_without_a_fleet_file(mosquitto, uid, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    data = tmp_path / "data"
    registry = Registry(data)
    registry.upsert(FleetDevice("sl-1", "streetlight", uid, 55.696, 12.544, rated_w=50))
    registry.upsert(FleetDevice("sl-2", "streetlight", uid, 55.697, 12.544, rated_w=50))
    env = {k: v for k, v in os.environ.items() if k != "CITYGRID_FLEET"}
    log = tmp_path / "rules.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "cityctl", "rules", "run", "--mqtt-url",
                              mosquitto.url, "--data-dir", str(data), "--client-id",
                              f"rules-{uid}", "--topic", f"city/v1/{uid}/+/+/telemetry"],
                             env={**env, "PYTHONPATH": str(REPO)}, stdout=f,
                             stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "rules running" in log.read_text() or p.poll() is not None,
                   message="the engine started")
        assert p.poll() is None, log.read_text()
        assert "2 devices" in log.read_text()
    finally:
        p.terminate()
        p.wait(20)


def test_the_simulator_simulates_the_registrys_contract_devices(mosquitto, uid, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    data = tmp_path / "data"
    registry = Registry(data)
    registry.upsert(FleetDevice("sl-1", "streetlight", uid, 55.696, 12.544, rated_w=50))
    registry.upsert(FleetDevice("m-1", "meter", uid, 55.697, 12.544, account_id="a",
                                tariff="business-flat"))
    registry.upsert(FleetDevice("plug-1", "meter", uid, 55.697, 12.545, account_id="a",
                                tariff="business-flat", device_profile="tasmota-energy",
                                native_id="plug-1"))
    telemetry = Collector(mosquitto.url, f"city/v1/{uid}/+/+/telemetry")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cityctl", "simulate", "--registry", "--data-dir", str(data),
             "--mqtt-url", mosquitto.url, "--duration", "3m", "--interval", "60s",
             "--speed", "600"], env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: {Topic.parse(t).device_id for t, _, _ in telemetry.messages}
                   == {"sl-1", "m-1"}, message="readings from the registry's devices")
    finally:
        telemetry.close()
    assert not any("plug-1" in t for t, _, _ in telemetry.messages)


def test_partitions_share_the_districts_and_see_one_join(mosquitto, uid, tmp_path):
    """`rules run --partition i/2` twice: each light commanded by one engine only; a
    district added to the registry that falls in a partition makes that engine start again
    with it (rules/cli.py does the restart)."""
    from citygrid.partition import Partition

    names = iter(f"{uid}{n}" for n in range(100))
    d0 = next(d for d in names if Partition(0, 2).owns(d))
    d1 = next(d for d in names if Partition(1, 2).owns(d))
    d0_later = next(d for d in names if Partition(0, 2).owns(d))
    data = tmp_path / "data"
    registry = Registry(data, Catalogue(tariffs=frozenset(load_config().tariffs)))
    registry.upsert(FleetDevice("sl-a", "streetlight", d0, 55.696, 12.544, rated_w=50))
    registry.upsert(FleetDevice("sl-b", "streetlight", d1, 55.796, 12.644, rated_w=50))
    runners = [RuleRunner(Settings(mqtt_url=mosquitto.url, data_dir=str(data)),
                          registry.fleet(), COPENHAGEN, None,
                          RunnerConfig(DEFAULT_RULES, client_id=f"rules-{uid}-p{i}",
                                       worker=f"p{i}of2", partition=Partition(i, 2)),
                          inventory=Registry(data)) for i in range(2)]
    assert [r.owned for r in runners] == [frozenset({d0}), frozenset({d1})]
    commands = Collector(mosquitto.url, "city/v1/+/streetlight/+/cmd")
    pub = Publisher(mosquitto.url, f"pub-{uid}")
    for r in runners:
        r.start()
    try:
        pub.send(str(Topic(d0, "streetlight", "sl-a")), light_reading(1, NIGHT))
        pub.send(str(Topic(d1, "streetlight", "sl-b")), light_reading(1, NIGHT))
        wait_until(lambda: to(commands, "sl-a") and to(commands, "sl-b"))
        time.sleep(0.5)
        assert len(to(commands, "sl-a")) == len(to(commands, "sl-b")) == 1  # one engine each
        registry.upsert(FleetDevice("sl-c", "streetlight", d0_later, 55.6, 12.5, rated_w=50))
        wait_until(runners[0].repartition.is_set, FOLLOWS_WITHIN_S + 1,
                   message="partition 0 sees its new district")
        wait_until(lambda: "sl-c" in runners[1].fleet.by_id, FOLLOWS_WITHIN_S + 1)
        assert not runners[1].repartition.is_set()  # not its district
    finally:
        pub.close()
        commands.close()
        for r in runners:
            r.stop()
        registry.close()
