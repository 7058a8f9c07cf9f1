"""Ingest against the real Mosquitto and InfluxDB: what a user would check is what is stored."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import orjson
import pytest

from cityctl.localservices import Influxd, free_port
from citygrid import contract
from citygrid.store import Point
from citygrid.store.influx import InfluxStore
from ingest.service import IngestConfig, IngestService
from tests.helpers import REPO, Publisher, light, meter, need, wait_until

T0 = int(time.time() * 1000) - 3_600_000


@contextlib.contextmanager
def running_ingest(settings, store, uid, **config):
    config.setdefault("topic", f"city/v1/{uid}/+/+/telemetry")
    config.setdefault("client_id", f"ingest-{uid}")
    config.setdefault("flush_interval_s", 0.05)
    service = IngestService(settings, store, IngestConfig(**config))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def topic(uid: str, kind: str, device: str) -> str:
    return str(contract.Topic(uid, kind, device))


def stored_seqs(store: InfluxStore, measurement: str) -> list[tuple[str, int]]:
    """Every stored (device, seq), duplicates included if there were any."""
    out = []
    for s in store.query(f'SELECT "seq" FROM "{measurement}" GROUP BY "device_id"'):
        out += [(s["tags"]["device_id"], v) for _, v in s["values"]]
    return sorted(out)


def test_duplicates_and_out_of_order_store_exactly_the_distinct_points(
        settings, influx_store, publisher, uid):
    readings = [(topic(uid, "streetlight", f"sl-{d}"), light(T0 + s * 1000, s))
                for d in range(5) for s in range(200)]
    resent = random.Random(1).sample(readings, 300)  # redelivery, retries
    messages = readings + resent
    random.Random(2).shuffle(messages)  # out of order
    with running_ingest(settings, influx_store, uid):
        publisher.send_all(messages)
        wait_until(lambda: influx_store.count("streetlight") >= 1000, message="1000 points")
        time.sleep(0.5)  # anything extra would have arrived by now
    assert stored_seqs(influx_store, "streetlight") == sorted(
        (f"sl-{d}", s) for d in range(5) for s in range(200))
    latest = influx_store.latest("streetlight", device_id="sl-3")["sl-3"]
    assert latest.ts_ms == T0 + 199_000
    assert latest.tags == {"device_id": "sl-3", "district": uid}


def test_garbage_is_dead_lettered_per_reason_and_valid_readings_all_stored(
        settings, influx_store, publisher, uid):
    valid = [(topic(uid, "meter", f"m-{i % 7}"), meter(T0 + i * 1000, i)) for i in range(300)]
    senml = [(topic(uid, "meter", "m-senml"), [
        {"bt": (T0 + i * 1000) / 1000, "n": "seq", "v": i}, {"n": "energy_kwh", "v": 1.0 * i},
        {"n": "power_w", "v": 10}]) for i in range(20)]
    garbage = {
        contract.NOT_JSON: [(topic(uid, "meter", "m-1"), b"not json at all")] * 3,
        contract.NON_FINITE: [(topic(uid, "meter", "m-1"),
                               b'{"ts":%d,"seq":1,"energy_kwh":NaN,"power_w":1}' % T0)] * 2,
        contract.OUT_OF_RANGE: [(topic(uid, "meter", "m-1"), meter(T0, 1, power_w=-5))] * 4,
        contract.WRONG_TYPE: [(topic(uid, "meter", "m-1"), meter(T0, 1, energy_kwh="7"))],
        contract.MISSING_FIELD: [(topic(uid, "meter", "m-1"), {"ts": T0, "seq": 1})] * 2,
        contract.UNKNOWN_KIND: [(f"city/v1/{uid}/toaster/t-1/telemetry", meter(T0, 1))] * 3,
        contract.BAD_TOPIC: [(f"city/v1/{uid}/meter/m-1/telemetry/extra", meter(T0, 1)),
                             (f"city/v1/{uid}/meter/m-1/status", {"online": True})],
        contract.OVERSIZE: [(topic(uid, "meter", "m-1"), b"{" + b" " * 20_000 + b"}")],
        contract.BAD_SENML: [(topic(uid, "meter", "m-1"), b"[]")],
    }
    messages = valid + senml + [m for ms in garbage.values() for m in ms]
    random.Random(3).shuffle(messages)
    # Bad-topic messages must reach ingest: subscribe to everything under this district.
    with running_ingest(settings, influx_store, uid, topic=f"city/v1/{uid}/#") as service:
        publisher.send_all(messages)
        expected = {reason: len(ms) for reason, ms in garbage.items()}
        wait_until(lambda: service.dead_letter_counts() == expected,
                   message=f"dead letters {expected}")
        wait_until(lambda: influx_store.count("meter") >= 320, message="320 points")
        latest = service.dead_letters.latest(100)
    assert influx_store.count("meter") == 320
    assert stored_seqs(influx_store, "meter") == sorted(
        [(f"m-{i % 7}", i) for i in range(300)] + [("m-senml", i) for i in range(20)])
    by_reason = {d.reason: d for d in latest}
    assert "energy_kwh" in by_reason[contract.NON_FINITE].detail
    assert "power_w" in by_reason[contract.OUT_OF_RANGE].detail
    assert by_reason[contract.UNKNOWN_KIND].topic == f"city/v1/{uid}/toaster/t-1/telemetry"
    assert by_reason[contract.NOT_JSON].payload == b"not json at all"


def test_store_400_is_dead_lettered_with_the_servers_message(
        settings, influx_store, publisher, uid):
    # A field of the wrong type already in a shard makes InfluxDB refuse new points there.
    # Field types are fixed per shard (7 days by default): a month back is another shard.
    old = T0 - 30 * 86_400_000
    influx_store.write([Point("meter", {"device_id": "m-1", "district": uid},
                              {"power_w": "text"}, old - 1)])
    messages = [(topic(uid, "meter", "m-1"), meter(old + i, i)) for i in range(5)]
    messages += [(topic(uid, "meter", "m-2"), meter(T0 + i, i)) for i in range(5)]
    with running_ingest(settings, influx_store, uid) as service:
        publisher.send_all(messages)
        wait_until(lambda: service.dead_letter_counts()[contract.STORE_REJECTED] == 5,
                   message="5 store_rejected dead letters")
        wait_until(lambda: influx_store.count("meter", device_id="m-2") == 5)
        letter = service.dead_letters.latest(1)[0]
    assert "field type conflict" in letter.detail
    assert letter.payload.startswith(b"meter,device_id=m-1")


def test_influxdb_down_for_10_seconds_loses_nothing(settings, publisher, uid, tmp_path):
    server = Influxd(tmp_path / "influx")
    server.start()
    store = InfluxStore(server.url, "city", timeout_s=2)
    n = 6000
    messages = [(topic(uid, "streetlight", f"sl-{i % 20}"), light(T0 + i * 100, i))
                for i in range(n)]
    try:
        with running_ingest(settings, store, uid, retry_window_s=1.0) as service:
            sender = threading.Thread(target=publisher.send_all, args=(messages, 400.0))
            sender.start()  # 15 s of traffic
            wait_until(lambda: store.count("streetlight") > 500, message="first points")
            server.stop()
            time.sleep(10)
            assert service.metrics.spool_depth > 0, "the outage should have spooled readings"
            server.start()
            sender.join()
            wait_until(lambda: store.count("streetlight") == n, timeout_s=60,
                       message=f"{n} points after recovery")
            wait_until(lambda: service.spool.depth() == 0, message="spool drained")
            assert service.metrics.spool_drained > 0
            assert sum(service.dead_letter_counts().values()) == 0
        assert len(stored_seqs(store, "streetlight")) == n
    finally:
        server.stop()


def _spawn_ingest(settings, store, uid, data_dir) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(data_dir / "ingest.log", "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "cityctl", "ingest", "--mqtt-url", settings.mqtt_url,
         "--influx-url", store.url, "--influx-db", store.database, "--data-dir", str(data_dir),
         "--client-id", f"ingest-{uid}", "--topic", f"city/v1/{uid}/+/+/telemetry",
         "--batch-size", "500", "--flush-interval", "0.05"],
        env=env, stdout=log, stderr=subprocess.STDOUT)


def test_ingest_killed_mid_stream_loses_nothing_and_duplicates_nothing(
        settings, influx_store, publisher, uid, tmp_path):
    n = 8000
    messages = [(topic(uid, "meter", f"m-{i % 40}"), meter(T0 + i * 10, i)) for i in range(n)]
    process = _spawn_ingest(settings, influx_store, uid, tmp_path)
    try:
        wait_until(lambda: "subscribed" in (tmp_path / "ingest.log").read_text(),
                   message="ingest subscribed")
        sender = threading.Thread(target=publisher.send_all, args=(messages, 1000.0))
        sender.start()
        wait_until(lambda: influx_store.count("meter") > 1500, message="some points stored")
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = influx_store.count("meter")
        time.sleep(1.0)
        process = _spawn_ingest(settings, influx_store, uid, tmp_path)
        sender.join()
        wait_until(lambda: influx_store.count("meter") == n, timeout_s=60,
                   message=f"{n} points after restart")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert killed_at < n, "the kill should have landed mid-stream"
    assert stored_seqs(influx_store, "meter") == sorted((f"m-{i % 40}", i) for i in range(n))
    log = (tmp_path / "ingest.log").read_text()
    assert process.returncode == 0, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


def test_readings_sent_while_ingest_is_stopped_are_stored_after_restart(
        settings, influx_store, publisher, uid):
    before = [(topic(uid, "meter", "m-1"), meter(T0 + i, i)) for i in range(100)]
    during = [(topic(uid, "meter", "m-1"), meter(T0 + i, i)) for i in range(100, 600)]
    with running_ingest(settings, influx_store, uid):
        publisher.send_all(before)
        wait_until(lambda: influx_store.count("meter") == 100)
    publisher.send_all(during)  # ingest is down: its session holds them
    time.sleep(0.5)
    assert influx_store.count("meter") == 100
    with running_ingest(settings, influx_store, uid) as second:
        wait_until(lambda: influx_store.count("meter") == 600, message="600 points")
        time.sleep(0.5)
        # The first 100 were acknowledged before the stop: the broker does not resend them.
        assert second.metrics.messages == 500
    assert stored_seqs(influx_store, "meter") == [("m-1", i) for i in range(600)]


def test_shared_subscription_workers_split_the_load(settings, influx_store, publisher, uid):
    n = 3000
    messages = [(topic(uid, "meter", f"m-{i % 30}"), meter(T0 + i, i)) for i in range(n)]
    group = f"g{uid}"
    with running_ingest(settings, influx_store, uid, group=group, client_id=f"a-{uid}") as a, \
            running_ingest(settings, influx_store, uid, group=group, client_id=f"b-{uid}",
                           ) as b:
        publisher.send_all(messages)
        wait_until(lambda: influx_store.count("meter") == n, message=f"{n} points")
        wait_until(lambda: a.metrics.messages + b.metrics.messages == n)
        assert a.metrics.messages > n / 10 and b.metrics.messages > n / 10, (
            a.metrics.messages, b.metrics.messages)


def test_back_pressure_holds_messages_at_the_broker_not_in_memory(
        settings, publisher, uid, tmp_path):
    """Store down and spool full: ingest stops acknowledging, so the broker keeps the rest."""
    port = free_port()
    store = InfluxStore(f"http://127.0.0.1:{port}", "city", timeout_s=1)
    n = 2000
    messages = [(topic(uid, "meter", f"m-{i % 10}"), meter(T0 + i, i)) for i in range(n)]
    with running_ingest(settings, store, uid, receive_maximum=100, batch_size=50,
                        spool_max_points=200, retry_window_s=0.2) as service:
        sender = threading.Thread(target=publisher.send_all, args=(messages,))
        sender.start()
        peak = 0
        for _ in range(30):
            peak = max(peak, service.unacked())
            time.sleep(0.1)
        sender.join()
        assert 0 < peak <= 100, peak
        # Ingest took what the spool holds plus one window: the rest waits at the broker.
        assert 200 <= service.spool.depth() <= 200 + 100
        assert service.metrics.messages <= 200 + 100
        server = Influxd(tmp_path / "influx", port)
        server.start()
        try:
            wait_until(lambda: store.count("meter") == n, timeout_s=60,
                       message=f"all {n} points once the store is back")
        finally:
            server.stop()


def test_self_report_and_prometheus_metrics(settings, influx_store, publisher, uid):
    port = free_port()
    with running_ingest(settings, influx_store, uid, metrics_port=port,
                        report_interval_s=0.5) as service:
        publisher.send_all([(topic(uid, "meter", "m-1"), meter(T0 + i, i)) for i in range(50)]
                           + [(topic(uid, "meter", "m-1"), b"junk")])
        wait_until(lambda: influx_store.count("meter") == 50)
        wait_until(lambda: service.metrics.dead[contract.NOT_JSON] == 1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        wait_until(lambda: any(p.fields.get("readings_total") == 50 for p in
                               influx_store.latest("citygrid_ingest").values()),
                   message="a self-report counting the 50 readings")
    assert "citygrid_ingest_readings_total 50.0" in text
    assert 'citygrid_ingest_dead_letters_total{reason="not_json"} 1.0' in text
    reports = influx_store.latest("citygrid_ingest")
    by_reason = [p for p in reports.values() if p.tags.get("reason") == "not_json"]
    assert by_reason and by_reason[0].fields["dead_letters_total"] == 1
    main = next(p for p in reports.values() if "reason" not in p.tags)
    assert main.tags["worker"] == f"ingest-{uid}"
    assert {"messages_per_s", "lag_p99_ms", "batch_latency_p50_ms", "spool_points"} <= set(
        main.fields)


def test_embedded_sqlite_store_end_to_end(settings, sqlite_store, publisher, uid):
    with running_ingest(settings, sqlite_store, uid):
        publisher.send_all([(topic(uid, "streetlight", "sl-1"), light(T0 + i, i))
                            for i in range(100)] * 2)
        wait_until(lambda: sqlite_store.count("streetlight") == 100)
    assert sqlite_store.latest("streetlight")["sl-1"].fields["seq"] == 99


def test_dlq_command_shows_reasons(settings, influx_store, publisher, uid, tmp_path):
    with running_ingest(settings, influx_store, uid) as service:
        publisher.send_all([(topic(uid, "meter", "m-1"), meter(T0, 1, power_w=-1))])
        wait_until(lambda: service.dead_letter_counts()[contract.OUT_OF_RANGE] == 1)
    out = subprocess.run(
        [sys.executable, "-m", "cityctl", "ingest", "dlq", "--data-dir", settings.data_dir],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    assert "out_of_range=1" in out
    assert f"city/v1/{uid}/meter/m-1/telemetry" in out
    assert "power_w: Input should be greater than or equal to 0" in out
    assert orjson.dumps(meter(T0, 1, power_w=-1)).decode()[:60] in out


@pytest.mark.parametrize("variable, value", [("CITYGRID_MQTT_URL", "http://x")])
def test_bad_setting_is_named_at_startup(variable, value):
    result = subprocess.run([sys.executable, "-m", "cityctl", "ingest"], capture_output=True,
                            text=True, env={**os.environ, variable: value,
                                            "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert variable in result.stderr


def test_ingest_started_before_its_broker_waits_for_it(influx_store, uid, tmp_path):
    from cityctl.localservices import Mosquitto
    from citygrid.settings import Settings

    broker = Mosquitto(tmp_path / "late-broker")
    settings = Settings(mqtt_url=broker.url, data_dir=str(tmp_path / "data"))
    timer = threading.Timer(2.0, broker.start)
    timer.start()
    try:
        with running_ingest(settings, influx_store, uid) as service:
            assert service.unacked() == 0
            publisher = Publisher(broker.url, f"late-{uid}")
            publisher.send_all([(topic(uid, "meter", "m-1"), meter(T0, 1))])
            publisher.close()
            wait_until(lambda: influx_store.count("meter") == 1)
    finally:
        timer.join()
        broker.stop()


# --------------------------------------------------------------------------- InfluxDB with auth


ADMIN = ("admin", "admin-pw")


@pytest.fixture
def secured_influxd(tmp_path, monkeypatch):
    """A private influxd 1.x with authentication on (its environment overrides its config),
    an admin, and a user ``ingest`` allowed to write to ``city`` (not an admin)."""
    need("influxd")
    server = Influxd(tmp_path / "secured-influx")
    with monkeypatch.context() as env:
        env.setenv("INFLUXDB_HTTP_AUTH_ENABLED", "true")
        server.start()
    # The first user may be created without credentials; it must be an admin.
    httpx.post(f"{server.url}/query", data={
        "q": f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES"})
    admin = InfluxStore(server.url, "city", username=ADMIN[0], password=ADMIN[1])
    admin.ensure_ready()
    admin.query("CREATE USER ingest WITH PASSWORD 'ingest-pw'")
    admin.query('GRANT WRITE ON "city" TO ingest')
    server.admin = admin
    yield server
    admin.close()
    server.stop()


def _ingest_cli(influx_url: str, tmp_path, env: dict[str, str], db: str = "city"):
    """`citygrid ingest` against a broker that is not there: refusing must not wait for it."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cityctl", "ingest", "--mqtt-url",
         f"mqtt://127.0.0.1:{free_port()}", "--influx-url", influx_url, "--influx-db", db,
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CITYGRID_INFLUX")},
             "PYTHONPATH": str(REPO), **env})
    return result, time.monotonic() - started


@pytest.mark.parametrize("env, named", [
    ({"CITYGRID_INFLUX_USER": "ingest", "CITYGRID_INFLUX_PASSWORD": "wrong"},
     "CITYGRID_INFLUX_PASSWORD"),
    ({}, "CITYGRID_INFLUX_USER"),
    ({"CITYGRID_INFLUX_TOKEN": "not-a-token"}, "CITYGRID_INFLUX_TOKEN"),
], ids=["wrong-password", "no-credentials", "token"])
def test_refused_credentials_stop_ingest_at_start_with_the_setting_named(
        secured_influxd, tmp_path, env, named):
    result, took = _ingest_cli(secured_influxd.url, tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert took < 10, f"took {took:.1f}s to refuse"
    assert named in result.stderr
    assert "401" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_missing_database_the_user_may_not_create_stops_ingest_at_start(
        secured_influxd, tmp_path):
    secured_influxd.admin.query('GRANT WRITE ON "city" TO ingest')  # but not on "other"
    result, took = _ingest_cli(secured_influxd.url, tmp_path, {
        "CITYGRID_INFLUX_USER": "ingest", "CITYGRID_INFLUX_PASSWORD": "ingest-pw"}, db="other")
    assert result.returncode == 2, result.stderr
    assert took < 10
    assert "CITYGRID_INFLUX_DB" in result.stderr and "'other'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_database_is_created_at_start_by_an_admin(secured_influxd, settings, uid):
    store = InfluxStore(secured_influxd.url, f"new_{uid}", username=ADMIN[0],
                        password=ADMIN[1])
    with running_ingest(settings, store, uid):
        pass
    assert f"new_{uid}" in {row[0] for s in secured_influxd.admin.query("SHOW DATABASES")
                             for row in s["values"]}


def test_revoked_credentials_spool_are_reported_and_drain_once_restored(
        secured_influxd, settings, publisher, uid):
    """A writer that is not an admin starts (it may not create the database, but it exists
    and takes writes); its password changed under it: nothing lost, said once."""
    admin = secured_influxd.admin
    store = InfluxStore(secured_influxd.url, "city", username="ingest", password="ingest-pw",
                        timeout_s=2)
    port = free_port()
    with running_ingest(settings, store, uid, metrics_port=port, retry_window_s=0.2) as service:
        publisher.send_all([(topic(uid, "meter", "m-1"), meter(T0 + i, i)) for i in range(100)])
        wait_until(lambda: admin.count("meter") == 100, message="100 points")
        admin.query("SET PASSWORD FOR ingest = 'changed'")
        publisher.send_all([(topic(uid, "meter", "m-1"), meter(T0 + i, i))
                            for i in range(100, 300)])
        wait_until(lambda: service.spool.depth() >= 200, message="200 points spooled")
        assert service.store_state() == "auth_failed"
        assert admin.count("meter") == 100
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "citygrid_ingest_store_auth_failed 1.0" in text
        assert "citygrid_ingest_store_auth_failures_total" in text
        admin.query("SET PASSWORD FOR ingest = 'ingest-pw'")
        wait_until(lambda: admin.count("meter") == 300, message="300 points after the fix")
        wait_until(lambda: service.store_state() == "ok", message="store state ok")
    assert stored_seqs(admin, "meter") == [("m-1", i) for i in range(300)]
