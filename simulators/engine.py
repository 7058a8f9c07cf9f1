"""The simulator's engine: a simulated clock, a schedule of readings, and MQTT connections.

One thread runs everything: paho clients in "external loop" mode behind one
selector, so one process holds 10,000 per-device connections (each with its own
client id and Last Will) or multiplexes many devices over a few connections for
load generation.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import random
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import paho.mqtt.client as paho

from citygrid import mqtt
from citygrid.city import CityProfile
from citygrid.fleet import Fleet
from citygrid.settings import MqttUrl
from simulators.devices import SimDevice, StreetlightSim, World, make_device

log = logging.getLogger("citygrid.simulate")
ONLINE, OFFLINE = b'{"online":true}', b'{"online":false}'
MODES = ("multiplexed", "per-device")
# Devices speak MQTT 5 or 3.1.1 (many in the field still do); 3.1.1 is also cheaper to drive.
PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}


def _load_state(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    try:
        state = orjson.loads(Path(path).read_bytes())
        return state if isinstance(state.get("devices"), dict) and "clock_ms" in state else None
    except (OSError, orjson.JSONDecodeError, AttributeError):
        log.warning("ignoring unreadable simulator state %s", path)
        return None


class SimClock:
    """Simulated time running ``speed``× the wall clock from ``start_ms``.

    An accelerated run that starts in the past catches up with the wall clock and
    then goes on in real time, so its timestamps never lie in the future.
    """

    def __init__(self, start_ms: int, speed: float):
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.start_ms, self.speed = start_ms, speed
        self.w0 = time.monotonic()
        self.epoch0_ms = time.time() * 1000
        self.clamp = start_ms <= self.epoch0_ms

    def now_ms(self) -> int:
        elapsed = time.monotonic() - self.w0
        sim = self.start_ms + elapsed * 1000 * self.speed
        if self.clamp:
            sim = min(sim, self.epoch0_ms + elapsed * 1000)
        return int(sim)

    def wall_at(self, sim_ms: float) -> float:
        """The monotonic time at which the simulated clock shows ``sim_ms``."""
        elapsed = (sim_ms - self.start_ms) / (1000 * self.speed)
        if self.clamp:
            elapsed = max(elapsed, (sim_ms - self.epoch0_ms) / 1000)
        return self.w0 + elapsed


@dataclass
class SimConfig:
    speed: float = 1.0
    start_ms: int | None = None
    duration_s: float | None = None  # simulated seconds
    interval_s: float = 10.0  # simulated seconds between a device's readings
    seed: int = 1
    mode: str = "multiplexed"
    devices_per_connection: int = 1000
    faults: dict[str, float] = field(default_factory=dict)
    report_every_s: float = 5.0
    client_prefix: str = "citygrid-sim"
    protocol: str = "5"
    state_path: str | None = None  # where the fleet's registers and clock are kept

    def resolved_start_ms(self) -> int:
        if self.start_ms is not None:
            return self.start_ms
        now = int(time.time() * 1000)
        if self.speed <= 1:
            return now
        # Far enough back that the run's timestamps never pass the wall clock.
        span = self.duration_s if self.duration_s else 86_400
        return now - int(span * 1000)


class _Connection:
    def __init__(self, engine: Engine, client_id: str, devices: list[int]):
        self.engine = engine
        self.devices = devices
        self.client_id = client_id
        self.up = False
        self.dropped = False  # cut on purpose (a device gone offline)
        self.client = mqtt.make_client(engine.url, client_id,
                                       protocol=PROTOCOLS[engine.config.protocol])
        self.client.max_inflight_messages_set(1000 if len(devices) > 1 else 20)
        self.client.max_queued_messages_set(0)
        if engine.config.mode == "per-device":
            status = str(engine.devices[devices[0]].topic.with_channel("status"))
            self.client.will_set(status, OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = engine._on_command
        self.sock: socket.socket | None = None
        self.backoff = 0.5  # a lost broker is retried after 0.5 s, 1 s, 2 s … 30 s (±50 %)
        self.retry_at = 0.0

    def connect(self) -> None:
        mqtt.connect(self.client, self.engine.url, keepalive=60)
        self.sock = self.client.socket()
        self.engine.selector.register(self.sock, selectors.EVENT_READ, self)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("%s refused: %s", self.client_id, reason_code)
            return
        self.up = True
        self.backoff = 0.5
        engine = self.engine
        lights = [engine.cmd_topics[i] for i in self.devices
                  if isinstance(engine.devices[i], StreetlightSim)]
        for k in range(0, len(lights), 200):
            client.subscribe([(t, 1) for t in lights[k:k + 200]])
        for i in self.devices:
            client.publish(engine.status_topics[i], ONLINE, qos=1, retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.up = False
        self._unregister()
        if not self.dropped and not self.engine.stopping:
            log.warning("%s lost its connection (%s)", self.client_id, reason_code)

    def _unregister(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.engine.selector.unregister(self.sock)
            self.sock = None

    def drop(self) -> None:
        """Vanish without a DISCONNECT: the broker publishes the Last Will."""
        self.dropped = True
        sock = self.client.socket()
        self._unregister()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_read()  # paho notices the dead socket and cleans up
        self.up = False

    def retry(self, now: float) -> None:
        """Reconnect after the broker was lost, like a real device: with backoff and jitter."""
        self.retry_at = now + self.backoff * random.uniform(0.5, 1.5)
        self.backoff = min(30.0, self.backoff * 2)
        try:
            self.client.reconnect()
        except OSError:
            return
        self.sock = self.client.socket()
        self.engine.selector.register(self.sock, selectors.EVENT_READ, self)

    def revive(self) -> None:
        self.dropped = False
        try:
            self.client.reconnect()
        except OSError as e:
            log.warning("%s could not reconnect: %s", self.client_id, e)
            return
        self.sock = self.client.socket()
        self.engine.selector.register(self.sock, selectors.EVENT_READ, self)


class Engine:
    def __init__(self, url: MqttUrl, fleet: Fleet, city: CityProfile, config: SimConfig):
        self.url = url
        self.config = config
        self.city = city
        self.world = World(city)
        rng = random.Random(config.seed)
        characters = {d.slug: d.character for d in city.districts}
        self.devices: list[SimDevice] = [
            make_device(spec, characters.get(spec.district, "urban"),
                        random.Random(rng.getrandbits(64)), config.faults)
            for spec in fleet]
        self.telemetry_topics = [str(d.topic) for d in self.devices]
        self.status_topics = [str(d.topic.with_channel("status")) for d in self.devices]
        self.cmd_topics = [str(d.topic.with_channel("cmd")) for d in self.devices]
        self.by_cmd_topic = {t: i for i, t in enumerate(self.cmd_topics)}
        saved = _load_state(config.state_path)
        start_ms = config.start_ms
        if saved:
            # Real meters keep their registers across a restart of the platform: so do ours,
            # and the simulated clock goes on from where it stopped.
            for device in self.devices:
                device.restore(saved["devices"].get(device.spec.device_id) or {})
            if start_ms is None:
                start_ms = int(saved["clock_ms"])
        self.clock = SimClock(start_ms if start_ms is not None else config.resolved_start_ms(),
                              config.speed)
        self.end_ms = (self.clock.start_ms + config.duration_s * 1000
                       if config.duration_s else None)
        interval_ms = int(config.interval_s * 1000)
        self.interval_ms = interval_ms
        # Each device reports at its own phase of the interval, like a real fleet.
        self.schedule = [(self.clock.start_ms + rng.randrange(interval_ms), i)
                         for i in range(len(self.devices))]
        heapq.heapify(self.schedule)
        self.selector = selectors.DefaultSelector()
        self.connections: list[_Connection] = []
        self.connection_of: list[_Connection] = []
        self.stats = Counter()
        self.stopping = False
        self._stop = threading.Event()

    # ------------------------------------------------------------------ connections

    def connect(self) -> None:
        n = len(self.devices)
        size = 1 if self.config.mode == "per-device" else self.config.devices_per_connection
        self.connection_of = [None] * n  # type: ignore[list-item]
        for start in range(0, n, size):
            ids = list(range(start, min(n, start + size)))
            if size == 1:
                client_id = f"dev-{self.devices[start].spec.device_id}"
            else:
                client_id = f"{self.config.client_prefix}-{self.config.seed}-{start // size}"
            conn = _Connection(self, client_id, ids)
            conn.connect()
            self.connections.append(conn)
            for i in ids:
                self.connection_of[i] = conn
            if len(self.connections) % 500 == 0:
                self._service_io(0)
        deadline = time.monotonic() + 60
        while not all(c.up for c in self.connections):
            self._service_io(0.05)
            if time.monotonic() > deadline:
                down = sum(not c.up for c in self.connections)
                raise TimeoutError(f"{down} of {len(self.connections)} connections got no CONNACK")
        log.info("%d devices on %d connections (%s)", n, len(self.connections), self.config.mode)

    def _service_io(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            conn: _Connection = key.data
            rc = conn.client.loop_read()
            if rc != paho.MQTT_ERR_SUCCESS and conn.sock is not None:
                conn._unregister()
        for conn in self.connections:
            if conn.sock is not None and conn.client.want_write():
                conn.client.loop_write()

    def _on_command(self, client, userdata, message: paho.MQTTMessage) -> None:
        i = self.by_cmd_topic.get(message.topic)
        device = self.devices[i] if i is not None else None
        if not isinstance(device, StreetlightSim) or device.offline_for > 0:
            return  # not ours, or switched off: a dead controller answers nothing
        ack = device.command(message.payload, self.clock.now_ms())
        self.stats["commands"] += 1
        self.stats["acks_ok" if ack["ok"] else "acks_refused"] += 1
        client.publish(str(device.topic.with_channel("ack")), orjson.dumps(ack), qos=1)

    # ------------------------------------------------------------------ run

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> Counter:
        """Publish until the duration is over or stop() is called; returns the stats."""
        if not self.connections:
            self.connect()
        per_device = self.config.mode == "per-device"
        interval_s = self.config.interval_s
        next_misc = next_report = next_save = time.monotonic()
        reported = 0
        while not self._stop.is_set():
            now_sim = self.clock.now_ms()
            # At the end, still send every reading due before it (at 3600× one loop can
            # span minutes of simulated time): a run publishes exactly its schedule.
            finishing = self.end_ms is not None and now_sim >= self.end_ms
            if finishing:
                now_sim = self.end_ms - 1
            burst = 0
            while self.schedule and self.schedule[0][0] <= now_sim:
                due, i = heapq.heappop(self.schedule)
                heapq.heappush(self.schedule, (due + self.interval_ms, i))
                if self.end_ms is not None and due >= self.end_ms:
                    continue
                device, conn = self.devices[i], self.connection_of[i]
                if per_device and conn.dropped and device.offline_for == 0:
                    conn.revive()
                payloads = device.tick(due, interval_s, self.world)
                topic = self.telemetry_topics[i]
                for payload in payloads:
                    conn.client.publish(topic, payload, qos=1)
                self.stats["readings"] += len(payloads)
                if per_device and device.went_offline and not conn.dropped:
                    conn.drop()
                burst += 1
                if burst % 256 == 0:
                    self._service_io(0)  # take the broker's acks as we go
                    if self._stop.is_set():  # behind schedule must not mean deaf to Ctrl-C
                        break
            if finishing:
                break
            wait = 0.05
            if self.schedule:
                wait = min(wait, max(0.0, self.clock.wall_at(self.schedule[0][0])
                                     - time.monotonic()))
            self._service_io(wait)
            now = time.monotonic()
            if now >= next_misc:
                for conn in self.connections:
                    if conn.sock is not None:
                        conn.client.loop_misc()
                    elif not conn.dropped and now >= conn.retry_at:
                        conn.retry(now)
                next_misc = now + 0.25
            if now >= next_save and self.config.state_path:
                self.save_state(now_sim)
                next_save = now + 10.0
            if now >= next_report:
                if reported or self.stats["readings"]:
                    rate = (self.stats["readings"] - reported) / self.config.report_every_s
                    behind = (now_sim - self.schedule[0][0]) / 1000 if self.schedule else 0
                    log.info("sim %s  %.0f readings/s  commands %d  connections up %d/%d%s",
                             datetime.fromtimestamp(self.clock.now_ms() / 1000, UTC)
                             .isoformat(timespec="seconds"), rate, self.stats["commands"],
                             sum(c.up for c in self.connections), len(self.connections),
                             f"  BEHIND by {behind:.1f} s of sim time" if behind > 5 else "")
                reported = self.stats["readings"]
                next_report = now + self.config.report_every_s
        self.close()
        for device in self.devices:
            self.stats.update({f"fault_{k}": v for k, v in device.injected.items()})
        return self.stats

    def save_state(self, clock_ms: int | None = None) -> None:
        """Write the clock and every device's registers (atomically: a kill leaves the old)."""
        path = Path(self.config.state_path)
        if clock_ms is None:
            clock_ms = min(self.clock.now_ms(), self.end_ms or 1 << 62)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"clock_ms": clock_ms, "devices": {
            d.spec.device_id: d.saved() for d in self.devices}}))
        os.replace(tmp, path)

    def close(self) -> None:
        """Say goodbye like a device switched off on purpose: offline status, DISCONNECT."""
        self.stopping = True
        if self.config.state_path:
            self.save_state()
        for conn in self.connections:
            if conn.up:
                for i in conn.devices:
                    conn.client.publish(self.status_topics[i], OFFLINE, qos=1, retain=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                c.up and c.client._out_messages for c in self.connections):  # noqa: SLF001
            self._service_io(0.05)
        for conn in self.connections:
            if conn.up:
                conn.client.disconnect()
                conn.client.loop_write()
        self.selector.close()
