"""Helpers the tests share: real clients, readings, `citygrid up` in a subprocess, waiting."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import psutil
import pytest

from cityctl.localservices import MissingBinary, find_binary
from citygrid import mqtt
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.settings import MqttUrl, Settings
from simulators.engine import Engine

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(binary: str) -> None:
    try:
        find_binary(binary)
    except MissingBinary as e:
        if IN_CI:
            pytest.fail(f"CI needs the real services: {e}", pytrace=False)
        pytest.skip(str(e))


class Publisher:
    """A device-side MQTT client for tests: publishes at QoS 1 and waits for the broker."""

    def __init__(self, url: str, client_id: str):
        self.settings = Settings(mqtt_url=url)
        self.client = mqtt.make_client(self.settings.mqtt, client_id)
        self.client.max_queued_messages_set(0)
        self.delivered = 0  # publishes the broker has acknowledged (a load's real progress)
        self.client.on_publish = self._on_publish
        mqtt.connect(self.client, self.settings.mqtt)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.delivered += 1  # paho's network thread only: no lock needed

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

        from cityctl.localservices import free_port

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
                [sys.executable, "-m", "cityctl", "up", "--plain", "--report-every", "2",
                 "--data-dir", str(self.data_dir), "--broker-port", str(self.broker_port),
                 "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 60.0):

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

        return psutil.Process(self.process.pid).children(recursive=True)

    def interrupt(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C, as at the terminal: SIGINT to `up` alone (its children have their own
        session, and `up` stops them in order)."""

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


NIGHT = int(datetime(2026, 11, 27, 22, 0, tzinfo=COPENHAGEN.tz).timestamp() * 1000)


def rules_fleet(uid: str) -> Fleet:
    # sl-2 is 28 m from sl-1, sl-3 is 300 m away.
    return Fleet([
        FleetDevice("sl-1", "streetlight", uid, 55.696000, 12.544, rated_w=50),
        FleetDevice("sl-2", "streetlight", uid, 55.696252, 12.544, rated_w=50),
        FleetDevice("sl-3", "streetlight", uid, 55.698700, 12.544, rated_w=50),
    ])


def light_reading(seq: int, ts: int, **fields) -> dict:
    return {"ts": ts, "seq": seq, "brightness_pct": 30.0, "power_w": 16.7, "energy_wh": seq,
            "lux": 0.5, "motion": False, **fields}


class Collector:
    """Everything published under a filter, with its retain flag."""

    def __init__(self, url: str, topic_filter: str):
        u = MqttUrl.parse(url)
        self.messages: list[tuple[str, bytes, bool]] = []
        self.expiries: list[int | None] = []  # MQTT 5 message expiry left, per message
        self.client = mqtt.make_client(u)

        def on_message(client, userdata, m) -> None:
            self.expiries.append(getattr(m.properties, "MessageExpiryInterval", None))
            self.messages.append((m.topic, m.payload, m.retain))

        self.client.on_message = on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        mqtt.connect(self.client, u)
        self.client.loop_start()
        assert done.wait(10)

    def on(self, channel: str) -> list[tuple[str, bytes, bool]]:
        return [m for m in self.messages if m[0].endswith("/" + channel)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_in_thread(engine: Engine) -> threading.Thread:
    engine.connect()
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    return thread


class Listener:
    """Commands and settlements on the city's broker, counted by a client of our own."""

    def __init__(self, url: str, protocol: int = paho.MQTTv5):
        self.commands: list[dict] = []
        self.settlements: list[dict] = []
        settings = Settings(mqtt_url=url)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(
            [("city/v1/+/streetlight/+/cmd", 1), ("city/v1/+/meter/+/settlement", 1)])
        self.client.connect(settings.mqtt.host, settings.mqtt.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        body = orjson.loads(message.payload)
        (self.commands if message.topic.endswith("/cmd") else self.settlements).append(body)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Box:
    def __init__(self):
        self.commands, self.alerts, self.published, self.pts = [], [], [], []

    def command(self, device, payload, expiry_s):
        self.commands.append((device.device_id, payload["brightness_pct"], payload["reason"],
                              payload["ts"]))

    def publish(self, topic, payload, qos, retain):
        self.published.append((topic, payload))

    def alert(self, alert, raised):
        self.alerts.append((alert.key, raised, alert.message))

    def points(self, points):
        self.pts += points


def _simulate(url: str, fleet: Fleet, config, result) -> None:
    from simulators.engine import Engine as Sim

    sim = Sim(MqttUrl.parse(url), fleet, COPENHAGEN, config)
    sim.connect()
    result.put(dict(sim.run()))


def simulate_elsewhere(url: str, fleet: Fleet, config, timeout_s: float = 240.0) -> dict:
    """Run a simulator to its end in a process of its own and return its stats.

    In the test process the simulator, ingest and the rule engine would share one GIL;
    this one gets the other core, as it would in a deployment.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    process = ctx.Process(target=_simulate, args=(url, fleet, config, result), daemon=True)
    process.start()
    try:
        stats = result.get(timeout=timeout_s)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return stats


@contextlib.contextmanager
def secured_broker(provisioner, tmp_path: Path):
    """Mosquitto with the provisioner's password and ACL files (no anonymous access) on a free
    port; yields the port. The provisioner is closed afterwards."""
    from cityctl.localservices import free_port, wait_for_port

    need("mosquitto")
    port = free_port()
    conf = provisioner.broker_config(port, "127.0.0.1")
    log = open(tmp_path / "mosquitto.log", "wb")  # noqa: SIM115
    broker = subprocess.Popen([find_binary("mosquitto"), "-c", str(conf)], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        wait_until(lambda: provisioner.pid_file.exists())
        yield port
    finally:
        broker.terminate()
        broker.wait(10)
        log.close()
        provisioner.close()
