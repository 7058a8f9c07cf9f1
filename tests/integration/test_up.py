"""`citygrid up` as a user runs it: the whole city in one command, stopped with Ctrl-C,
started again where it stopped. Real Mosquitto (or the embedded broker), real processes."""

from __future__ import annotations

import re
import time

import httpx
import orjson
import paho.mqtt.client as paho
import psutil
import pytest

from billing.ledger import verify
from citygrid.settings import Settings
from citygrid.store import open_store
from tests.helpers import CityUp, Listener, need, wait_until

pytestmark = pytest.mark.integration




def _alive(processes) -> list:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_runs_the_city_stops_on_ctrl_c_and_resumes(tmp_path):
    need("mosquitto")
    data = tmp_path / "city"
    args = ("--broker", "mosquitto", "--streetlights", "60", "--meters", "40",
            "--speed", "300", "--interval", "120")
    up = CityUp(data, *args)
    listener = None
    try:
        ready = up.wait_for(r"(ready|NOT READY) in ([\d.]+) s", 60)
        assert ready[1] == "ready", up.text()
        assert float(ready[2]) <= 15.0, f"ready after {ready[2]} s (bound: 15 s)"
        assert "from 20" in up.text() and "T16:00" in up.text()  # yesterday's late afternoon
        listener = Listener(up.mqtt_url)
        services = {p.pid for p in up.descendants()}
        assert len(services) >= 5, "broker, ingest, rules, gateway and simulator"

        # The gateway answers with the token `up` printed in the status page's address.
        printed = re.search(r"#token=(\S+)", up.text())[1]
        node = up.mqtt_url.removeprefix("mqtt://")
        health = wait_until(lambda: (h := httpx.get(f"{up.url}/health", timeout=5).json())
                            ["feed_node"] == node and h, 10, message="the feed's node")
        assert health == {"ok": True, "broker": True, "store": True, "broker_node": node,
                          "broker_nodes": {node: True}, "feed_node": node}
        status = httpx.get(f"{up.url}/api/v1/status", timeout=10,
                           headers={"Authorization": f"Bearer {printed}"})
        assert status.status_code == 200 and status.json()["devices"] == {
            "streetlights": 60, "meters": 40}

        # Dusk comes, the rules command the lights, meters cross 10 kWh and are billed.
        wait_until(lambda: listener.commands, 90, message="a command from the rules")
        wait_until(lambda: listener.settlements, 120, message="a settlement")
        store = open_store(Settings(data_dir=str(data)))
        assert wait_until(lambda: store.count("streetlight") > 0 and store.count("meter") > 0,
                          30, message="readings in the store")
        reasons = {c["reason"] for c in listener.commands}
        assert reasons & {"rule:dark-baseline", "rule:motion-boost", "rule:daylight-off"}

        # The demo city's rules, and its faults injected by the simulator: a failed lamp
        # is lit yet draws only its standby power.
        assert re.search(r"rules +\S+demo-city\.yaml", up.text())
        faults = re.search(r"faults +(.+) \(after", up.text())[1].split(", ")
        assert {f.split(":")[0] for f in faults} == {"lamp_failure", "wrong_power",
                                                     "day_burner", "cabinet_outage"}
        [simulator] = [p for p in up.descendants() if "simulate" in p.cmdline()]
        argv = simulator.cmdline()
        assert [argv[k + 1] for k, a in enumerate(argv) if a == "--inject"] == faults
        failed = re.search(r"lamp_failure:(sl-\d+)@", up.text())[1]

        def failed_lamp_lit():
            point = store.latest("streetlight", device_id=failed).get(failed)
            return point is not None and point.fields["brightness_pct"] > 0 and \
                point.fields["power_w"] == 0.5

        wait_until(failed_lamp_lit, 60, message=f"{failed} lit but drawing nothing")

        # Ctrl-C: everything stops, nothing is left behind, state is kept.
        children = up.descendants()
        assert up.interrupt() == 0
        assert wait_until(lambda: not _alive(children), 20, message="no process left") is True
        assert "stopped; the city's state is kept" in up.text()
        listener.close()
        entries, _ = verify(data / "billing.sqlite")
        assert entries >= 1
        readings_before = store.count("streetlight") + store.count("meter")
        newest_before = max(p.ts_ms for kind in ("streetlight", "meter")
                            for p in store.latest(kind).values())

        # A second `up` goes on from where the first stopped: clock, registers, ledger.
        again = CityUp(data, *args)
        try:
            assert again.wait_for(r"(ready|NOT READY) in", 60)[1] == "ready"
            assert "from where it stopped" in again.text()
            wait_until(lambda: max(p.ts_ms for p in store.latest("meter").values())
                       > newest_before + 60_000, 60, message="new readings after the restart")
            # History kept, the simulated clock went on (no reading before the old newest
            # from the new run), and nobody was billed twice for the same interval.
            assert store.count("streetlight") + store.count("meter") > readings_before
            time.sleep(3)
            entries_after, _ = verify(data / "billing.sqlite")
            assert entries_after >= entries
            import sqlite3

            with sqlite3.connect(data / "billing.sqlite") as db:
                keys = [orjson.loads(e)["key"] for (e,) in db.execute("SELECT entry FROM ledger")]
                held = db.execute("SELECT count(*) FROM ledger").fetchone()[0]
            assert len(keys) == len(set(keys)) == held
            children = again.descendants()
            assert again.interrupt() == 0
            assert wait_until(lambda: not _alive(children), 20, message="no process left")
        finally:
            again.close()
        store.close()
    finally:
        if listener is not None:
            listener.close()
        up.close()


def test_up_embedded_broker_when_mosquitto_is_missing(tmp_path):
    """`--broker embedded` is what a machine without Mosquitto gets: MQTT 3.1.1, same city."""
    up = CityUp(tmp_path / "city", "--broker", "embedded", "--no-simulator",
                "--streetlights", "20", "--meters", "5")
    try:
        assert up.wait_for(r"(ready|NOT READY) in", 60)[1] == "ready"
        assert "embedded amqtt" in up.text()
        assert "mosquitto_pub" in up.text()  # --no-simulator shows how to send a reading
        line = re.search(r"-t (city/v1/\S+) -m '(.+)'", up.text())
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        client.connect("127.0.0.1", up.broker_port)
        client.loop_start()
        client.publish(line[1], line[2].encode(), qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        store = open_store(Settings(data_dir=str(tmp_path / "city")))
        assert wait_until(lambda: store.count("streetlight") == 1, 30,
                          message="the reading stored through the embedded broker")
        store.close()
        children = up.descendants()
        assert up.interrupt() == 0
        assert wait_until(lambda: not _alive(children), 20, message="no process left")
    finally:
        up.close()


def test_up_restarts_a_service_that_dies(tmp_path):
    need("mosquitto")
    up = CityUp(tmp_path / "city", "--broker", "mosquitto", "--no-simulator",
                "--streetlights", "10", "--meters", "2")
    try:
        assert up.wait_for(r"(ready|NOT READY) in", 60)[1] == "ready"
        rules = next(p for p in up.descendants() if "rules" in p.cmdline())
        rules.kill()
        up.wait_for(r"rules exited with -9; restarting", 30)
        up.wait_for(r"rules restarted \(restart #1\)", 30)
        assert wait_until(lambda: [p for p in up.descendants() if "rules" in p.cmdline()
                                   and p.pid != rules.pid], 10, message="a new rule engine")
        assert up.interrupt() == 0
    finally:
        up.close()
