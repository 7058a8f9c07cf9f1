"""The adapters service against the real Mosquitto: native vendor messages in, contract
messages out (and back), dead letters, registry changes without a restart, broker ACLs."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import orjson
import pytest

from adapters import AdapterConfig, AdapterService, load_profiles, read_dead_letters
from citygrid import mqtt
from citygrid.fleet import FleetDevice
from citygrid.registry import Registry
from citygrid.settings import MqttUrl, Settings
from tests.helpers import REPO, Collector, Publisher, secured_broker, wait_until

VENDORS = REPO / "tests/data/vendors"
TASMOTA_SENSOR = (VENDORS / "tasmota/tele-SENSOR-energy.json").read_bytes().strip()
PROFILES = load_profiles()


def plug(uid: str, n: int = 1) -> FleetDevice:
    return FleetDevice(f"m-{n}", "meter", uid, 55.69, 12.54, account_id="acc-1",
                       tariff="household-flat", device_profile="tasmota-energy",
                       native_id=f"plug-{uid}-{n}")


def lamp(uid: str) -> FleetDevice:
    return FleetDevice("sl-1", "streetlight", uid, 55.69, 12.55, rated_w=40.0,
                       device_profile="zigbee2mqtt-light", native_id=f"lamp-{uid}")


def discard_session(url: str, client_id: str) -> None:
    """End a persistent session the test made, so the shared broker queues nothing for it."""
    client = mqtt.make_client(MqttUrl.parse(url), client_id)
    mqtt.connect(client, MqttUrl.parse(url), clean_start=True, session_expiry_s=0)
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


class Service:
    """An AdapterService over a data directory, as `citygrid adapters run` runs it."""

    def __init__(self, url: str, data: Path, client_id: str):
        self.url, self.data, self.client_id = url, data, client_id
        self.service: AdapterService | None = None

    def start(self) -> AdapterService:
        settings = Settings(mqtt_url=self.url, data_dir=str(self.data))
        self.service = AdapterService(settings, profiles=PROFILES, registry_dir=self.data,
                                      config=AdapterConfig(client_id=self.client_id,
                                                           registry_poll_s=0.2))
        self.service.start(timeout_s=10)
        return self.service

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None


@pytest.fixture
def city(mosquitto, tmp_path, uid):
    data = tmp_path / "data"
    registry = Registry(data)
    registry.upsert_many([plug(uid), lamp(uid)])
    service = Service(mosquitto.url, data, f"adapters-{uid}")
    publisher = Publisher(mosquitto.url, f"dev-{uid}")
    yield registry, service, publisher
    service.stop()
    publisher.close()
    registry.close()
    discard_session(mosquitto.url, f"adapters-{uid}")


def test_a_tasmota_reading_becomes_a_contract_reading_and_is_acknowledged(mosquitto, city, uid):
    registry, service, publisher = city
    contract = Collector(mosquitto.url, f"city/v1/{uid}/+/+/telemetry")
    service.start()
    publisher.send(f"tele/plug-{uid}-1/SENSOR", TASMOTA_SENSOR).wait_for_publish(5)
    wait_until(lambda: contract.messages, 5, message="the contract reading")
    topic, payload, _ = contract.messages[0]
    assert topic == f"city/v1/{uid}/meter/m-1/telemetry"
    reading = orjson.loads(payload)
    assert reading["energy_kwh"] == 1.956 and reading["power_w"] == 9
    assert reading["voltage_v"] == 231 and reading["seq"] == reading["ts"]
    wait_until(lambda: service.service.stats()["unacked"] == 0, 5, message="the native ack")
    # Acknowledged: a second run of the service (same persistent session) is not sent it again.
    service.stop()
    service.start()
    time.sleep(1.0)
    assert len(contract.messages) == 1
    assert service.service.stats().get("messages", 0) == 0
    contract.close()


def test_what_cannot_be_mapped_is_dead_lettered_with_its_reason(mosquitto, city, uid, tmp_path):
    registry, service, publisher = city
    contract = Collector(mosquitto.url, f"city/v1/{uid}/+/+/telemetry")
    service.start()
    publisher.send(f"tele/stranger-{uid}/SENSOR", TASMOTA_SENSOR)
    publisher.send(f"tele/plug-{uid}-1/SENSOR", b"{not json")
    publisher.send(f"tele/plug-{uid}-1/SENSOR",
                   orjson.dumps({"Time": "2026-11-30T18:00:00", "ENERGY": {"Power": 3}}))
    data = tmp_path / "data"

    def letters():
        found = {d.reason: d for d in read_dead_letters(data) if uid in d.topic}
        return found if len(found) == 3 else None

    found = wait_until(letters, 5, message="three dead letters")
    assert found["unknown_device"].topic == f"tele/stranger-{uid}/SENSOR"
    assert f"stranger-{uid}" in found["unknown_device"].detail
    assert found["unknown_device"].payload == TASMOTA_SENSOR
    assert "missing_field" in found and "not_json" in found
    wait_until(lambda: service.service.stats()["unacked"] == 0, 5, message="the acks")
    assert contract.messages == []
    contract.close()


def test_a_contract_command_becomes_the_native_command_and_the_state_report_its_ack(
        mosquitto, city, uid):
    registry, service, publisher = city
    native = Collector(mosquitto.url, f"zigbee2mqtt/lamp-{uid}/set")
    acks = Collector(mosquitto.url, f"city/v1/{uid}/+/+/ack")
    service.start()
    command = {"id": f"c-{uid}", "ts": int(time.time() * 1000), "brightness_pct": 40,
               "reason": "rule:dark-baseline"}
    publisher.send(f"city/v1/{uid}/streetlight/sl-1/cmd", command)
    wait_until(lambda: native.messages, 5, message="the native command")
    assert orjson.loads(native.messages[0][1]) == {"state": "ON", "brightness": 102}
    # A report at another level confirms nothing; the one at the commanded level does.
    publisher.send(f"zigbee2mqtt/lamp-{uid}", {"state": "ON", "brightness": 215})
    publisher.send(f"zigbee2mqtt/lamp-{uid}", {"state": "ON", "brightness": 102})
    wait_until(lambda: acks.messages, 5, message="the contract ack")
    topic, payload, _ = acks.messages[0]
    assert topic == f"city/v1/{uid}/streetlight/sl-1/ack"
    ack = orjson.loads(payload)
    assert ack["id"] == f"c-{uid}" and ack["ok"] is True
    assert abs(ack["brightness_pct"] - 40) <= 1
    time.sleep(0.3)
    assert len(acks.messages) == 1  # a later report acks nothing more
    native.close()
    acks.close()


def test_a_device_registered_while_it_runs_is_picked_up_without_a_restart(mosquitto, city,
                                                                           uid):
    registry, service, publisher = city
    contract = Collector(mosquitto.url, f"city/v1/{uid}/+/+/telemetry")
    running = service.start()
    t0 = time.monotonic()
    registry.upsert(plug(uid, 2))
    wait_until(lambda: running.route("m-2"), 5, every_s=0.05, message="the new device")
    assert time.monotonic() - t0 < 5
    publisher.send(f"tele/plug-{uid}-2/SENSOR", TASMOTA_SENSOR)
    wait_until(lambda: contract.messages, 5, message="the new device's reading")
    assert contract.messages[0][0] == f"city/v1/{uid}/meter/m-2/telemetry"
    # The last zigbee2mqtt light goes: its topics and the streetlight commands are dropped.
    registry.set_status("sl-1", "revoked")
    wait_until(lambda: "zigbee2mqtt/+" not in running.subscriptions, 5,
               message="the unsubscription")
    assert running.wait_subscribed(5)
    contract.close()


# --------------------------------------------------------------------------- broker ACLs


@pytest.fixture
def secured(tmp_path, uid):
    from gateway.provisioning import Provisioner

    provisioner = Provisioner(tmp_path)
    with secured_broker(provisioner, tmp_path) as port:
        creds = {"plug": provisioner.provision(plug(uid)),
                 "other": provisioner.provision(plug(uid, 2)),
                 "adapters": provisioner.service_account("citygrid-adapters"),
                 "ingest": provisioner.service_account("citygrid-ingest")}
        yield provisioner, port, creds


def test_a_profiled_device_may_publish_its_own_native_topics_only(secured, uid, tmp_path):
    provisioner, port, creds = secured
    acl = provisioner.acl_file.read_text()
    assert f"user m-1\ntopic write tele/plug-{uid}-1/SENSOR\n" in acl
    url = creds["adapters"].url("127.0.0.1", port)
    adapters = Service(url, tmp_path, f"adapters-{uid}")
    running = adapters.start()  # its account may read the native topics, write the contract
    ingest = Collector(creds["ingest"].url("127.0.0.1", port), "city/v1/+/+/+/telemetry")
    device = Publisher(creds["plug"].url("127.0.0.1", port), "m-1")
    device.send(f"tele/plug-{uid}-1/SENSOR", TASMOTA_SENSOR).wait_for_publish(5)
    device.send(f"tele/plug-{uid}-2/SENSOR", TASMOTA_SENSOR).wait_for_publish(5)  # forged
    wait_until(lambda: ingest.messages, 5, message="the allowed reading")
    time.sleep(0.5)
    assert [t for t, _, _ in ingest.messages] == [f"city/v1/{uid}/meter/m-1/telemetry"]
    assert running.stats().get("messages") == 1  # the broker never passed the forged one on
    with contextlib.suppress(Exception):
        device.close()
        ingest.close()
    adapters.stop()
