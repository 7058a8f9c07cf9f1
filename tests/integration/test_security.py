"""Security against the real processes: TLS with a CA made here (and client certificates),
token guessing slowed down, no secret in any log. (Per-device credentials and ACLs:
test_provisioning.py; roles on every route and schemathesis: test_gateway_*.py; ledger
tampering: tests/unit/test_billing.py.)"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cityctl.localservices import Mosquitto, free_port
from citygrid import mqtt
from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store.sqlite import SqliteStore
from gateway.tokens import create_token
from ingest.service import IngestConfig, IngestService
from simulators.fleetgen import generate
from tests.helpers import REPO, light, need, wait_until

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=CityGrid test {name}", cwd=d)


def make_cert(d: Path, ca: str, name: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    need("mosquitto")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    make_cert(d, "ca", "client", "sl-00001", "extendedKeyUsage=clientAuth")
    tls, mutual = free_port(), free_port()
    broker = Mosquitto(d / "broker", extra_conf=(
        f"listener {tls} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n"
        f"keyfile {d}/server.key\ntls_version tlsv1.2\n"
        f"listener {mutual} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n"
        f"keyfile {d}/server.key\ntls_version tlsv1.2\nrequire_certificate true\n"))
    broker.start()
    try:
        yield d, tls, mutual
    finally:
        broker.stop()


def connects(settings: Settings) -> bool:
    """A full MQTT handshake over TLS, and a QoS 1 publish acknowledged."""
    client = mqtt.make_client(settings.mqtt, "")
    try:
        mqtt.connect(client, settings.mqtt)
    except (ssl.SSLError, OSError):
        return False
    client.loop_start()
    try:
        ok = wait_until(client.is_connected, 5, message="CONNACK") is True
        info = client.publish("city/v1/tls/streetlight/sl-1/status", b"online", qos=1)
        info.wait_for_publish(5)
        return ok and info.is_published()
    except AssertionError:
        return False
    finally:
        client.loop_stop()
        client.disconnect()


def test_mqtts_with_the_right_ca_connects_and_a_wrong_ca_is_refused(tls_broker):
    d, tls, _ = tls_broker
    assert connects(Settings(mqtt_url=f"mqtts://localhost:{tls}", mqtt_ca=str(d / "ca.pem")))
    assert not connects(Settings(mqtt_url=f"mqtts://localhost:{tls}",
                                 mqtt_ca=str(d / "other-ca.pem")))
    assert not connects(Settings(mqtt_url=f"mqtts://localhost:{tls}"))  # system CAs: unknown


def test_client_certificates_when_the_listener_requires_them(tls_broker):
    d, _, mutual = tls_broker
    url = f"mqtts://localhost:{mutual}"
    assert not connects(Settings(mqtt_url=url, mqtt_ca=str(d / "ca.pem")))
    assert connects(Settings(mqtt_url=url, mqtt_ca=str(d / "ca.pem"),
                             mqtt_cert=str(d / "client.pem"), mqtt_key=str(d / "client.key")))


def test_ingest_over_mqtts_stores_what_devices_send(tls_broker, tmp_path):
    d, tls, _ = tls_broker
    settings = Settings(mqtt_url=f"mqtts://localhost:{tls}", mqtt_ca=str(d / "ca.pem"),
                        data_dir=str(tmp_path))
    store = SqliteStore(tmp_path / "t.sqlite")
    service = IngestService(settings, store, IngestConfig(client_id="tls-ingest",
                                                          flush_interval_s=0.05))
    service.start()
    device = mqtt.make_client(settings.mqtt, "tls-device")
    mqtt.connect(device, settings.mqtt)
    device.loop_start()
    try:
        import orjson

        ts = int(time.time() * 1000) - 1000
        device.publish(str(Topic("tls", "streetlight", "sl-1")), orjson.dumps(light(ts, 1)),
                       qos=1).wait_for_publish(5)
        wait_until(lambda: store.count("streetlight") == 1, 15, message="the reading stored")
    finally:
        device.loop_stop()
        device.disconnect()
        service.stop()
        store.close()


def test_a_bad_tls_setting_is_named():
    from citygrid.settings import SettingsError

    with pytest.raises(SettingsError, match="CITYGRID_MQTT_CA"):
        Settings(mqtt_url="mqtts://localhost:8883", mqtt_ca="/nowhere/ca.pem")
    with pytest.raises(SettingsError, match="CITYGRID_MQTT_KEY"):
        Settings(mqtt_url="mqtts://localhost:8883", mqtt_cert=__file__)


# --------------------------------------------------------------------------- gateway


@pytest.fixture
def gateway(mosquitto, tmp_path):
    """`citygrid gateway` as its own process, its log in a file."""
    registry = Registry(tmp_path)
    registry.import_fleet(generate(COPENHAGEN, 4, 1, seed=2))
    tokens = {r: create_token(tmp_path, r, f"test-{r}") for r in ("viewer", "admin")}
    registry.close()
    port = free_port()
    log = tmp_path / "gateway.log"
    secret = "influx-secret-p4ss"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CITYGRID_INFLUX_USER": "citygrid",
           "CITYGRID_INFLUX_PASSWORD": secret}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cityctl", "gateway", "--port", str(port), "--mqtt-url",
             mosquitto.url, "--data-dir", str(tmp_path), "--log-level", "DEBUG"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 20, message="the gateway")
        yield url, tokens, log, secret
    finally:
        process.terminate()
        process.wait(20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_guessing_tokens_is_slowed_down(gateway):
    url, tokens, _, _ = gateway
    statuses = [httpx.get(f"{url}/api/v1/devices", timeout=5,
                          headers={"Authorization": f"Bearer cg_guess{i}"}).status_code
                for i in range(12)]
    assert statuses[:10] == [401] * 10
    assert statuses[10:] == [429, 429]
    r = httpx.get(f"{url}/api/v1/devices", timeout=5,
                  headers={"Authorization": f"Bearer {tokens['viewer']}"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.headers["content-type"] == "application/problem+json"
    assert "try again" in r.json()["detail"]
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # health stays open


def test_no_secret_reaches_the_logs(gateway):
    url, tokens, log, influx_secret = gateway
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    created = httpx.post(f"{url}/api/v1/devices", headers=admin, timeout=10, json={
        "device_id": "sl-secret", "kind": "streetlight", "district": "valby", "lat": 55.66,
        "lon": 12.5, "rated_w": 40}).json()
    password = created["mqtt_password"]
    for path in ("/api/v1/devices", "/api/v1/devices/sl-secret", "/api/v1/billing/ledger",
                 "/api/v1/status", "/api/v1/nowhere"):
        httpx.get(f"{url}{path}", headers=admin, timeout=10)
    httpx.get(f"{url}/api/v1/devices", headers={"Authorization": "Bearer cg_wrong-1"}, timeout=5)
    time.sleep(0.5)
    text = log.read_text(errors="replace")
    assert len(text) > 100  # it did log (startup, DEBUG)
    for secret in (tokens["admin"], tokens["viewer"], password, influx_secret, "cg_wrong-1"):
        assert secret not in text, f"a secret in the gateway log: {secret[:6]}…"
    assert not re.search(r"Bearer \S", text)
