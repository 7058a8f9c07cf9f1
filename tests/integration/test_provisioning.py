"""Per-device credentials and ACLs, proven against the real Mosquitto with the generated files.

A denied publish may still be acknowledged (MQTT 3.1.1, and Mosquitto's choice under 5):
what proves the ACL is what a subscriber receives.
"""

from __future__ import annotations

import subprocess
import threading
import time

import orjson
import pytest

from billing import HEAD_TOPIC
from citygrid import mqtt
from citygrid.fleet import FleetDevice
from citygrid.settings import MqttUrl
from gateway.provisioning import Provisioner, check_password, hash_password
from tests.helpers import REPO, secured_broker, wait_until

LIGHT_A = FleetDevice("sl-a", "streetlight", "norrebro", 55.69, 12.54, rated_w=50.0)
LIGHT_B = FleetDevice("sl-b", "streetlight", "norrebro", 55.69, 12.55, rated_w=50.0)


@pytest.fixture
def secured(tmp_path):
    registry = Provisioner(tmp_path)
    with secured_broker(registry, tmp_path) as port:
        creds = {"a": registry.provision(LIGHT_A), "b": registry.provision(LIGHT_B),
                 "ingest": registry.service_account("citygrid-ingest"),
                 "rules": registry.service_account("citygrid-rules")}
        yield registry, port, creds


class Client:
    def __init__(self, port: int, creds=None, client_id: str = ""):
        url = MqttUrl.parse(creds.url("127.0.0.1", port) if creds else
                            f"mqtt://127.0.0.1:{port}")
        self.client = mqtt.make_client(url, client_id)
        self.connack = threading.Event()
        self.refused = None
        self.messages: list[tuple[str, bytes]] = []

        def on_connect(c, u, flags, rc, props):
            self.refused = rc if rc.is_failure else False
            self.connack.set()

        self.client.on_connect = on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        mqtt.connect(self.client, url)
        self.client.loop_start()
        assert self.connack.wait(5)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_hashes_are_mosquitto_passwd_format():
    h = hash_password("secret", salt=b"0123456789ab")
    assert h.startswith("$7$101$MDEyMzQ1Njc4OWFi$") and check_password("secret", h)
    assert not check_password("wrong", h)


def test_a_device_publishes_only_its_own_topics_and_reads_only_its_own_commands(secured):
    registry, port, creds = secured
    platform = Client(port, creds["ingest"], "ingest")
    platform.subscribe("city/v1/+/+/+/telemetry")
    a, b = Client(port, creds["a"], "a"), Client(port, creds["b"], "b")
    assert not a.refused and not b.refused
    b.subscribe("city/v1/norrebro/streetlight/sl-b/cmd")
    a.subscribe("city/v1/norrebro/streetlight/sl-b/cmd")  # not allowed: receives nothing
    reading = orjson.dumps({"ts": 1790000000000, "seq": 1, "brightness_pct": 30, "power_w": 16,
                            "energy_wh": 1, "lux": 1, "motion": False})
    a.client.publish("city/v1/norrebro/streetlight/sl-a/telemetry", reading, qos=1)
    a.client.publish("city/v1/norrebro/streetlight/sl-b/telemetry", b"forged", qos=1)
    a.client.publish("city/v1/valby/streetlight/sl-a/telemetry", b"wrong district", qos=1)
    rules = Client(port, creds["rules"], "rules")
    rules.client.publish("city/v1/norrebro/streetlight/sl-b/cmd", b'{"id":"c1"}', qos=1)
    wait_until(lambda: platform.messages and b.messages, message="the allowed messages")
    time.sleep(0.5)
    assert platform.messages == [("city/v1/norrebro/streetlight/sl-a/telemetry", reading)]
    assert b.messages == [("city/v1/norrebro/streetlight/sl-b/cmd", b'{"id":"c1"}')]
    assert a.messages == []
    for c in (platform, a, b, rules):
        c.close()


def test_the_rules_service_publishes_the_ledger_anchor_and_a_device_cannot_forge_it(secured):
    registry, port, creds = secured
    rules = Client(port, creds["rules"], "rules")
    rules.client.publish(HEAD_TOPIC, b'{"head":"real"}', qos=1, retain=True).wait_for_publish(5)
    a = Client(port, creds["a"], "a")  # after the rules: a forgery allowed would replace it
    a.client.publish(HEAD_TOPIC, b'{"head":"forged"}', qos=1, retain=True).wait_for_publish(5)
    auditor = Client(port, registry.service_account("citygrid-gateway"), "gateway")
    auditor.subscribe(HEAD_TOPIC)  # after both: what it gets is the retained one
    wait_until(lambda: auditor.messages, message="the retained anchor")
    time.sleep(0.3)
    assert auditor.messages == [(HEAD_TOPIC, b'{"head":"real"}')]
    for c in (a, rules, auditor):
        c.close()


def test_the_auditor_account_reads_the_ledger_head_and_nothing_else(secured):
    registry, port, creds = secured
    auditor_creds = registry.service_account("citygrid-auditor")
    rules = Client(port, creds["rules"], "rules")
    rules.client.publish(HEAD_TOPIC, b'{"head":"real"}', qos=1, retain=True).wait_for_publish(5)
    auditor = Client(port, auditor_creds, "auditor")
    auditor.subscribe(HEAD_TOPIC)
    auditor.subscribe("city/v1/#")  # granted or not, the ACL lets nothing else through
    wait_until(lambda: auditor.messages, message="the retained anchor")
    a = Client(port, creds["a"], "a")
    a.client.publish("city/v1/norrebro/streetlight/sl-a/telemetry", b"{}", qos=1
                     ).wait_for_publish(5)
    # It cannot write the head either: a forgery through its account replaces nothing.
    auditor.client.publish(HEAD_TOPIC, b'{"head":"forged"}', qos=1, retain=True
                           ).wait_for_publish(5)
    time.sleep(0.5)
    # (the retained head once per matching subscription; never the reading, never a forgery)
    assert set(auditor.messages) == {(HEAD_TOPIC, b'{"head":"real"}')}
    later = Client(port, registry.service_account("citygrid-gateway"), "gateway")
    later.subscribe(HEAD_TOPIC)
    wait_until(lambda: later.messages, message="the retained anchor, again")
    assert later.messages == [(HEAD_TOPIC, b'{"head":"real"}')]
    for c in (rules, auditor, a, later):
        c.close()


def test_revoked_and_anonymous_clients_cannot_connect_and_new_devices_need_no_restart(secured):
    registry, port, creds = secured
    anonymous = Client(port, None, "anon")
    assert anonymous.refused, "anonymous access must be refused"
    wrong = Client(port, type(creds["a"])("sl-a", "not-the-password"), "a2")
    assert wrong.refused
    registry.revoke("sl-b")  # SIGHUP: the broker rereads its files
    time.sleep(0.5)
    b = Client(port, creds["b"], "b-again")
    assert b.refused, "a revoked device must not connect"
    c_creds = registry.provision(FleetDevice("m-c", "meter", "valby", 55.66, 12.5,
                                             account_id="acc", tariff="business-flat"))
    time.sleep(0.5)
    c = Client(port, c_creds, "c")
    assert not c.refused, "a newly provisioned device connects without a broker restart"
    for client in (anonymous, wrong, b, c):
        client.close()


def test_devices_cli_prints_credentials_once_and_refuses_bad_ids(tmp_path):
    import os
    import sys


    def run(*args):
        return subprocess.run([sys.executable, "-m", "cityctl", *args, "--data-dir",
                               str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    added = run("devices", "add", "sl-x", "--kind", "streetlight", "--district", "norrebro",
                "--lat", "55.7", "--lon", "12.5", "--rated-w", "50")
    assert added.returncode == 0 and "username: sl-x" in added.stdout
    password = added.stdout.split("password: ")[1].split()[0]
    stored = (tmp_path / "mosquitto" / "passwords").read_text()
    assert stored.startswith("sl-x:$7$101$") and password not in stored
    assert "provisioned" in run("devices", "list").stdout
    bad = run("devices", "add", "sl+x", "--kind", "streetlight", "--district", "norrebro",
              "--lat", "55.7", "--lon", "12.5")
    assert bad.returncode == 2 and "device_id 'sl+x'" in bad.stderr
    assert run("devices", "revoke", "sl-x").returncode == 0
    assert "sl-x" not in (tmp_path / "mosquitto" / "passwords").read_text()
    assert run("devices", "revoke", "nobody").returncode == 2


def test_the_service_accounts_may_probe_their_shared_subscription_group(secured):
    """`--group` sends a probe through the group at start-up: the generated ACL lets the
    ingest and rules accounts do it, and a device's account is refused it."""
    from citygrid import wire

    registry, port, creds = secured
    for name in ("ingest", "rules"):
        wire.probe_shared(MqttUrl.parse(creds[name].url("127.0.0.1", port)), "g",
                          f"{name}-probe-test", timeout_s=5)  # raises if nothing came through
    with pytest.raises(wire.MqttError):  # a device may not: no message comes through
        wire.probe_shared(MqttUrl.parse(creds["a"].url("127.0.0.1", port)), "g", "sl-a",
                          timeout_s=2)
