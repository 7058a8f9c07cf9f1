"""Fixtures: real Mosquitto and InfluxDB (Debian packages) on free ports, per-test isolation.

With CI=true a missing binary fails the run and names the package to install;
elsewhere the tests that need it are skipped with that message.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from citygrid import mqtt
from citygrid.localservices import Influxd, MissingBinary, Mosquitto, find_binary
from citygrid.settings import Settings
from citygrid.store.influx import InfluxStore
from citygrid.store.sqlite import SqliteStore

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(binary: str) -> None:
    try:
        find_binary(binary)
    except MissingBinary as e:
        if IN_CI:
            pytest.fail(f"CI needs the real services: {e}", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Iterator[Mosquitto]:
    need("mosquitto")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory) -> Iterator[Influxd]:
    need("influxd")
    server = Influxd(tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def uid() -> str:
    """A unique id per test: its district (topic prefix), database and client ids."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def influx_store(influxd, uid) -> Iterator[InfluxStore]:
    store = InfluxStore(influxd.url, f"db_{uid}")
    store.ensure_ready()
    yield store
    with contextlib.suppress(Exception):
        store.drop()
    store.close()


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    store.ensure_ready()
    yield store
    store.close()


@pytest.fixture(params=["influx", "sqlite"])
def store(request):
    """The store contract suite runs against every backend."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def settings(mosquitto, tmp_path) -> Settings:
    return Settings(mqtt_url=mosquitto.url, data_dir=str(tmp_path / "data"))


class Publisher:
    """A device-side MQTT client for tests: publishes at QoS 1 and waits for the broker."""

    def __init__(self, url: str, client_id: str):
        self.settings = Settings(mqtt_url=url)
        self.client = mqtt.make_client(self.settings.mqtt, client_id)
        self.client.max_queued_messages_set(0)
        mqtt.connect(self.client, self.settings.mqtt)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | dict | list, qos: int = 1):
        if not isinstance(payload, bytes):
            payload = orjson.dumps(payload)
        return self.client.publish(topic, payload, qos=qos)

    def send_all(self, messages, rate: float | None = None) -> None:
        last = None
        started = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            last = self.send(topic, payload)
            if rate:
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        if last is not None:
            last.wait_for_publish(60)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def publisher(mosquitto, uid) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.url, f"pub-{uid}")
    yield pub
    pub.close()


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, every_s: float = 0.2,
               message: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message} (last: {last!r})")


def light(ts_ms: int, seq: int, **extra) -> dict:
    reading = {"ts": ts_ms, "seq": seq, "brightness_pct": 40.0, "power_w": 24.0,
               "energy_wh": float(seq), "lux": 3.0, "motion": seq % 3 == 0}
    reading.update(extra)
    return reading


def meter(ts_ms: int, seq: int, **extra) -> dict:
    reading = {"ts": ts_ms, "seq": seq, "energy_kwh": seq * 0.01, "power_w": 500.0}
    reading.update(extra)
    return reading


REPO = Path(__file__).resolve().parent.parent


class CityUp:
    """`citygrid up` in a subprocess, as a user runs it: its own ports, a data directory."""

    def __init__(self, data_dir: Path, *args: str, name: str = "up"):
        import subprocess
        import sys

        from citygrid.localservices import free_port

        self.data_dir = Path(data_dir)
        self.broker_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mqtt_url = f"mqtt://127.0.0.1:{self.broker_port}"
        self.out = self.data_dir.parent / f"{name}.out"
        n = 1
        while self.out.exists():
            n += 1
            self.out = self.data_dir.parent / f"{name}-{n}.out"
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "citygrid", "up", "--plain", "--report-every", "2",
                 "--data-dir", str(self.data_dir), "--broker-port", str(self.broker_port),
                 "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 60.0):
        import re

        def found():
            if self.process.poll() is not None:
                raise AssertionError(f"citygrid up exited ({self.process.returncode}):\n"
                                     + self.text()[-3000:])
            return re.search(pattern, self.text())

        return wait_until(found, timeout_s, message=f"{pattern!r} from citygrid up")

    @property
    def token(self) -> str:
        return (self.data_dir / "demo-token").read_text().strip()

    def descendants(self) -> list:
        import psutil

        return psutil.Process(self.process.pid).children(recursive=True)

    def interrupt(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C, as at the terminal: SIGINT to `up` alone (its children have their own
        session, and `up` stops them in order)."""
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout_s)

    def close(self) -> None:
        if self.process.poll() is None:
            children = self.descendants()
            self.process.kill()
            self.process.wait()
            for child in children:
                with contextlib.suppress(Exception):
                    child.kill()
