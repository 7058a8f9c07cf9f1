"""`citygrid rules run --workers N` against the real Mosquitto: N engines, each owning a share of
the districts, give the lights the same commands and the meters the same settlements as one
engine over the same readings — a night with motion at the district borders and meters
crossing their settlement amount."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest

from citygrid import mqtt
from citygrid.contract import Topic
from citygrid.fleet import Fleet, FleetDevice
from citygrid.settings import Settings
from rules import read_health, read_lights
from tests.helpers import NIGHT, REPO, Publisher, light_reading, wait_until

pytestmark = pytest.mark.integration
LAMPS = 8  # per district, in one row 25 m apart, the districts one after the other
STEP_LON = 25 / 62_740  # 25 m of longitude at 55.7° N
SENTINEL = 3  # the lamp of each district whose motion closes the night (100 m from a border)
ROUNDS = 14  # every device reports once a round, ten minutes apart (the holds expire between)


def city(uid: str) -> Fleet:
    devices = []
    for k, district in enumerate(districts(uid)):
        for i in range(LAMPS):
            devices.append(FleetDevice(f"{district}-sl{i}", "streetlight", district, 55.696,
                                       12.544 + (k * LAMPS + i) * STEP_LON, rated_w=50))
        for i in range(2):
            devices.append(FleetDevice(f"{district}-m{i}", "meter", district, 55.70 + i * 0.001,
                                       12.544 + k * 0.01, account_id=f"acc-{district}-{i}",
                                       tariff="business-flat", max_power_w=17250.0))
    return Fleet(devices)


def districts(uid: str) -> list[str]:
    return [f"{uid}a", f"{uid}b", f"{uid}c"]


def night(uid: str) -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """The readings, in the order they are published, and each sentinel's timestamp."""
    rng = random.Random(7)
    lamps = [(d, f"{d}-sl{i}") for d in districts(uid) for i in range(LAMPS)]
    border = {f"{uid}a-sl{LAMPS - 1}", f"{uid}b-sl0", f"{uid}b-sl{LAMPS - 1}", f"{uid}c-sl0"}
    out: list[tuple[str, dict]] = []
    for r in range(ROUNDS):
        ts = NIGHT + r * 600_000
        for district, lamp in lamps:
            # Motion now and then, and at the borders every other round.
            motion = rng.random() < 0.2 or (lamp in border and r % 2 == 1)
            out.append((str(Topic(district, "streetlight", lamp)),
                        light_reading(r + 1, ts, motion=motion)))
            ts += 1
        for district in districts(uid):
            for i in range(2):  # 2.5 kWh a round (15 kW): a settlement every fourth round
                out.append((str(Topic(district, "meter", f"{district}-m{i}")),
                            {"ts": ts, "seq": r + 1, "energy_kwh": 100.0 + 2.5 * r + i,
                             "power_w": 15000.0}))
                ts += 1
    # The last round: every lamp without motion, then the sentinels' motion, last of all (no
    # other district's lamp is within their reach: no worker but their own sees them).
    ts = NIGHT + ROUNDS * 600_000
    for district, lamp in lamps:
        if not lamp.endswith(f"-sl{SENTINEL}"):
            out.append((str(Topic(district, "streetlight", lamp)),
                        light_reading(ROUNDS + 1, ts)))
            ts += 1
    sentinels = {}
    for district in districts(uid):
        lamp = f"{district}-sl{SENTINEL}"
        out.append((str(Topic(district, "streetlight", lamp)),
                    light_reading(ROUNDS + 1, ts, motion=True)))
        sentinels[lamp] = ts
        ts += 1
    return out, sentinels


class Outcome:
    """Commands and settlements, in the order one client receives them."""

    def __init__(self, url: str, uid: str):
        self.uid = uid
        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.client = mqtt.make_client(Settings(mqtt_url=url).mqtt)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.on_connect = lambda c, *a: c.subscribe(
            [("city/v1/+/streetlight/+/cmd", 1), ("city/v1/+/meter/+/settlement", 1)])
        self.client.on_message = self._on_message
        mqtt.connect(self.client, Settings(mqtt_url=url).mqtt)
        self.client.loop_start()
        assert done.wait(10)

    def _on_message(self, client, userdata, m) -> None:
        if Topic.parse(m.topic).district.startswith(self.uid):
            with self.lock:
                self.messages.append((m.topic, orjson.loads(m.payload)))

    def commands(self) -> Counter:
        with self.lock:
            return Counter((Topic.parse(t).device_id, b["brightness_pct"], b["reason"])
                           for t, b in self.messages if t.endswith("/cmd"))

    def settlements(self) -> Counter:
        with self.lock:
            return Counter((b["meter"], b["amount_minor"], b["period"])
                           for t, b in self.messages if t.endswith("/settlement"))

    def sentinels_seen(self, sentinels: dict[str, int]) -> bool:
        with self.lock:
            seen = {Topic.parse(t).device_id for t, b in self.messages if t.endswith("/cmd")
                    and sentinels.get(Topic.parse(t).device_id) == b["ts"]
                    and b["brightness_pct"] == 100.0}
        return seen == set(sentinels)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(mosquitto, uid: str, tmp_path: Path, workers: int):
    """The night through `rules run --workers N` (a fresh data directory): what it sent, its
    log, its saved lights and health."""
    data, log = tmp_path / f"data-{workers}", tmp_path / f"rules-{workers}.log"
    fleet_file = tmp_path / "fleet.geojson"
    city(uid).dump(fleet_file)
    outcome = Outcome(mosquitto.url, uid)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cityctl", "rules", "run", "--workers", str(workers),
             "--mqtt-url", mosquitto.url, "--data-dir", str(data), "--fleet", str(fleet_file),
             "--client-id", f"rules-{uid}-{workers}"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)
    publisher = Publisher(mosquitto.url, f"night-{uid}-{workers}")
    try:
        wait_until(lambda: log.read_text().count("rules running") == workers
                   or process.poll() is not None, 30, message=f"{workers} engines running")
        assert process.poll() is None, log.read_text()
        readings, sentinels = night(uid)
        publisher.send_all(readings)
        wait_until(lambda: outcome.sentinels_seen(sentinels), 30,
                   message="every district's last command")
    finally:
        publisher.close()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        outcome.close()
    assert code == 0, log.read_text()
    return outcome, log.read_text(), read_lights(data), read_health(data)


def test_two_and_three_workers_command_and_settle_as_one_engine(mosquitto, uid, tmp_path):
    one, _, lights, health = run(mosquitto, uid, tmp_path, 1)
    commands, settlements = one.commands(), one.settlements()
    a, b, c = districts(uid)
    # The night as one engine sees it: motion at a border boosts the lights across it,
    # every meter settles more than once.
    assert commands[(f"{b}-sl0", 100.0, "rule:motion-boost")] > 0
    assert commands[(f"{a}-sl{LAMPS - 1}", 30.0, "rule:dark-baseline")] > 0
    assert sum(settlements.values()) >= 12
    assert {m for m, _, _ in settlements} == {f"{d}-m{i}" for d in (a, b, c) for i in range(2)}

    for workers in (2, 3):
        many, text, many_lights, many_health = run(mosquitto, uid, tmp_path, workers)
        assert many.commands() == commands, workers
        assert many.settlements() == settlements, workers
        # Each worker logged its share: every n-th of the sorted districts.
        shares = re.findall(r"rules worker (\d)/(\d) \(\S+, pid \d+\) owns \d districts?: (.+)",
                            text)
        owned = {int(i): set(ds.split(", ")) for i, _, ds in shares}
        assert owned == {i: set(sorted((a, b, c))[i::workers]) for i in range(workers)}
        # What the state files say is the whole city's, as one engine's: each light as last
        # commanded, each rule's evaluations and firings summed over the workers.
        assert set(many_lights) == set(lights) and len(many_lights) == len(lights)
        assert {r: (h.evaluations, h.fired) for r, h in many_health.items()} == {
            r: (h.evaluations, h.fired) for r, h in health.items()}


def test_workers_follow_the_registry_and_a_dead_one_comes_back(mosquitto, uid, tmp_path):
    """A district added while they run gets an owner (the worker whose share changed starts
    again); a worker killed is started again and takes what arrived meanwhile (its session)."""
    from citygrid.registry import Registry

    a, b, c = districts(uid)
    fleet = Fleet([FleetDevice("sl-a", "streetlight", a, 55.696, 12.544, rated_w=50),
                   FleetDevice("sl-b", "streetlight", b, 55.696, 12.60, rated_w=50)])
    fleet.dump(tmp_path / "fleet.geojson")
    data, log = tmp_path / "data", tmp_path / "rules.log"
    outcome = Outcome(mosquitto.url, uid)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cityctl", "rules", "run", "--workers", "2",
             "--mqtt-url", mosquitto.url, "--data-dir", str(data), "--fleet",
             str(tmp_path / "fleet.geojson"), "--client-id", f"rules-{uid}"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)
    publisher = Publisher(mosquitto.url, f"pub-{uid}")
    registry = Registry(data)

    def commanded(device: str, ts: int) -> bool:
        with outcome.lock:
            return any(t.endswith(f"/{device}/cmd") and body["ts"] == ts
                       for t, body in outcome.messages)

    try:
        wait_until(lambda: log.read_text().count("rules running") == 2
                   or process.poll() is not None, 30, message="two engines running")
        assert process.poll() is None, log.read_text()
        # A third district: the registry gives it to worker 0 (a, c), worker 1 keeps b.
        registry.upsert(FleetDevice("sl-c", "streetlight", c, 55.696, 12.65, rated_w=50))
        wait_until(lambda: log.read_text().count("rules running") == 3, 30,
                   message="worker 0 started again with its new share")
        assert re.search(rf"rules worker 0/2 .* owns 2 districts: {a}, {c}", log.read_text())
        publisher.send(str(Topic(c, "streetlight", "sl-c")), light_reading(1, NIGHT))
        wait_until(lambda: commanded("sl-c", NIGHT), 20, message="the new district's command")
        # Worker 1 killed: a reading for its district waits in its session until it is back.
        worker = re.search(r"rules worker 1/2 \(\S+, pid (\d+)\)", log.read_text())[1]
        os.kill(int(worker), signal.SIGKILL)
        wait_until(lambda: "rules worker 1 exited with -9" in log.read_text(), 10,
                   message="the supervisor noticed")
        publisher.send(str(Topic(b, "streetlight", "sl-b")), light_reading(1, NIGHT + 1000))
        wait_until(lambda: commanded("sl-b", NIGHT + 1000), 30,
                   message="the restarted worker's command")
        assert process.poll() is None
    finally:
        registry.close()
        publisher.close()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        outcome.close()
    assert code == 0, log.read_text()


def test_the_districts_are_shared_out_stably_and_evenly():
    from rules.runner import partition

    assert partition(["c", "a", "d", "b", "e"], 2) == [("a", "c", "e"), ("b", "d")]
    assert partition(["e", "d", "c", "b", "a", "a"], 2) == partition("abcde", 2)
    assert partition(["a"], 3) == [("a",), (), ()]


def test_the_supervisor_gives_up_on_a_worker_that_keeps_dying(monkeypatch):
    """Restarted with backoff, and after five quick deaths in a row `rules run` ends (non-zero:
    cmd_run returns 1 when ``failed``)."""
    import argparse
    import time

    from rules import cli

    class Dead:
        pid, returncode = 1, 1

        def poll(self) -> int:
            return 1

    spawned: list[int] = []

    def spawn(w) -> None:
        spawned.append(w.index)
        w.process, w.started_at, w.next_start = Dead(), time.monotonic(), None

    workers = cli._Workers(argparse.Namespace(client_id="x", group=None), Settings())
    monkeypatch.setattr(workers, "_spawn", spawn)
    workers.assign([("a",), ("b",)], set())
    for _ in range(20):
        workers.check()
        if workers.failed:
            break
        for w in workers.workers:  # no waiting out the backoff here
            if w.next_start is not None:
                assert w.next_start - time.monotonic() <= 30
                w.next_start = 0.0
    assert workers.failed
    assert spawned.count(0) == cli.GIVE_UP_AFTER
