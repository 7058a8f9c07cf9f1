"""Ledger anchoring through the real broker: the rule runner settles meters and anchors the
ledger's head, retained, where an outside party picks it up and checks it with the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

from billing import HEAD_TOPIC, read_anchor
from billing.ledger import verify
from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from citygrid.fleet import Fleet, FleetDevice
from citygrid.settings import Settings
from rules.loader import DEFAULT_RULES
from rules.runner import RuleRunner, RunnerConfig
from tests.helpers import REPO, Collector, wait_until

T = int(datetime(2026, 11, 26, 8, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)
HOUR = 3_600_000


def verify_cli(data_dir, head: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cityctl", "ledger", "verify", "--head", head,
                           "--data-dir", str(data_dir)], capture_output=True, text=True,
                          cwd=REPO)


def test_every_n_settlements_the_ledger_head_is_anchored_retained_and_verifies(
        mosquitto, uid, tmp_path, publisher):
    fleet = Fleet([FleetDevice("m-1", "meter", uid, 55.66, 12.5, account_id="acc-1",
                               tariff="business-flat", max_power_w=17250.0)])
    data = tmp_path / "data"
    settings = Settings(mqtt_url=mosquitto.url, data_dir=str(data), ledger_anchor_every=3)

    def start() -> RuleRunner:
        runner = RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(
            DEFAULT_RULES, f"city/v1/{uid}/+/+/telemetry", client_id=f"rules-{uid}"))
        runner.start()
        return runner

    runner = start()
    topic = str(Topic(uid, "meter", "m-1"))
    db, file = data / "billing.sqlite", data / "ledger-head.json"

    def settle(hours: range) -> None:
        # 11 kWh an hour: each reading takes the meter past the rules' 10 kWh and settles it.
        for h in hours:
            publisher.send(topic, {"ts": T + h * HOUR, "seq": h + 1,
                                   "energy_kwh": 100.0 + 11 * h, "power_w": 500.0})

    watcher = None
    try:
        settle(range(3))  # the first reading only starts the register: two settlements
        wait_until(lambda: verify(db)[0] == 2, message="two settlements")
        assert not file.exists()  # two entries: no anchor yet
        settle(range(3, 4))
        wait_until(lambda: file.exists(), message="the anchor file")
        first = read_anchor(file)
        entries, head = verify(db)
        assert first["entries"] == entries == 3 and first["head"] == head
        assert first["ledger"] == "citygrid" and isinstance(first["ts"], int)
        # An outside party that subscribes afterwards gets the anchor: it is retained.
        watcher = Collector(mosquitto.url, HEAD_TOPIC)
        wait_until(lambda: watcher.messages, message="the retained anchor")
        [(got_topic, payload, retained)] = watcher.messages
        assert got_topic == HEAD_TOPIC and retained and json.loads(payload) == first
        ok = verify_cli(data, first["head"])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"ledger ok: 3 entries, head {first['head']}" in ok.stdout

        settle(range(4, 7))  # three more: the next anchor, live to the watcher
        wait_until(lambda: len(watcher.messages) == 2, message="the second anchor")
        second = json.loads(watcher.messages[1][1])
        assert second == read_anchor(file)
        assert (second["entries"], second["head"]) == verify(db) == (6, second["head"])
        # The later ledger still holds the earlier anchor; a head it never had fails.
        later = verify_cli(data, first["head"])
        assert later.returncode == 0 and "ledger ok: 6 entries" in later.stdout
        bad = verify_cli(data, "f" * 64)
        assert bad.returncode == 1 and "is not in the ledger" in bad.stdout

        settle(range(7, 8))  # a seventh entry, not yet due; then a restart anchors it
        wait_until(lambda: verify(db)[0] == 7, message="the seventh settlement")
        runner.stop()
        assert len(watcher.messages) == 2 and read_anchor(file) == second
        runner = start()
        wait_until(lambda: len(watcher.messages) == 3, message="the anchor at start")
        third = json.loads(watcher.messages[2][1])
        assert third == read_anchor(file) and (third["entries"], third["head"]) == verify(db)
    finally:
        runner.stop()
        if watcher is not None:
            watcher.close()
        # The session's broker forgets the retained anchor.
        publisher.client.publish(HEAD_TOPIC, b"", qos=1, retain=True).wait_for_publish(5)
