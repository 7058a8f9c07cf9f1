"""The simulator's engine: a simulated clock, a schedule of readings, and MQTT connections.

One thread runs everything, in either mode:

* **multiplexed** (load generation): many devices share each connection, a client of
  CityGrid's own (``citygrid.wire``). A reading's QoS 1 PUBLISH is encoded here: the topic
  part of each device's packet is fixed and encoded once, the payload is the device's
  ``bytes`` template, and what a loop turn produced goes to the socket as one write per
  connection. The broker's PUBACKs are counted as they come (``on_published``); what it
  has not acknowledged is sent again (DUP) after a reconnect, and beyond the in-flight
  window readings wait here, in order — up to a backlog, past which the schedule pauses
  until the broker catches up (a reading is late, never lost).
* **per-device**: one paho client per device (its own client id and Last Will) in
  "external loop" mode behind one selector, so one process holds 10,000 connections.

A light's motion events (a detection, published at its time: simulators/devices.py) wait in
a heap of ``(time, device)``, one entry per device at a time, and go out in time order
between the scheduled readings, in either mode. Injected faults (``SimConfig.inject``: a
fault on named devices or a cabinet's lights, from a time after the start, for a while) are
applied as the simulated clock passes their time.

The schedule costs nothing per reading: every device reports once per interval at its own
phase, so a round is the devices in phase order and the next round is the same order one
interval later — what a heap of ``(due, device)`` would give, without the heap.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import paho.mqtt.client as paho

from citygrid import mqtt, wire
from citygrid.city import CityProfile
from citygrid.fleet import Fleet
from citygrid.settings import MqttUrl
from simulators.devices import (
    INJECTED_FAULTS,
    SimDevice,
    StreetlightSim,
    World,
    make_device,
)

log = logging.getLogger("citygrid.simulate")
ONLINE, OFFLINE = b'{"online":true}', b'{"online":false}'
MODES = ("multiplexed", "per-device")
# Devices speak MQTT 5 or 3.1.1 (many in the field still do); paho's and wire's numbers.
PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}

# The multiplexed mode's wire.
MAX_INFLIGHT = 1000  # QoS 1 publishes unacknowledged per connection (the broker may lower it)
MAX_BACKLOG = 5000  # readings waiting beyond the window, per connection, before the pause
SERVICE_EVERY = 256  # readings between two looks at the sockets while catching up
# A paced run wakes at most once a tick: the tick's readings go out in one write per
# connection (a reading leaves up to a tick after its time; its timestamp is its time).
# On the 2-core reference machine a turn costs ~0.5–0.8 ms of CPU beyond its readings (the
# wake-up, the writes, caches gone cold meanwhile): at 5,000 readings/s a 25 ms tick made
# ~13 µs a reading, 50 ms ~10–11 µs (bench/simulator.py). The engine paho drove sent in
# bursts of ~140 ms of work at that rate: 50 ms late at most is still sooner.
TICK_S = 0.05
# A connection's acks and commands are read once a poll period (a command is answered
# within it), and as they come while its window is full (readings waiting: the broker's
# Receive Maximum can be 20, Mosquitto's default).
POLL_S = 0.05
CHUNK = 64  # devices dealt to a multiplexed connection at a time, in reporting order
# Our packet ids live above the ones the wire client gives its SUBSCRIBEs (1, 2, 3 … one per
# connection made): the two never meet on one connection.
FIRST_MID = 4096
_H3 = struct.Struct("!BBB")
_MID5 = struct.Struct("!Hx")  # packet id, and MQTT 5's empty property list (a zero byte)
_MID3 = struct.Struct("!H")


@dataclass(frozen=True)
class Injection:
    """A fault to inject: ``name`` on a device or on a cabinet's lights (``target``),
    ``after_s`` simulated seconds after the run's start, for ``for_s`` (an outage or an
    offline spell; None: the rest of the run, or for an offline device 30 readings)."""

    name: str
    target: str
    after_s: float = 0.0
    for_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Injection:
        """``NAME:TARGET@+OFFSET[/DURATION]``, e.g. ``lamp_failure:sl-00012@+2m`` or
        ``cabinet_outage:cab-indre-by-03@+5m/30m`` (durations as 90s, 15m, 2h)."""
        from simulators.cli import duration  # (the CLI's parser of durations)

        name, sep, rest = text.partition(":")
        target, at, when = rest.partition("@")
        if not sep or not target:
            raise ValueError(f"{text!r} is not NAME:TARGET[@+OFFSET[/DURATION]]")
        if name not in INJECTED_FAULTS:
            raise ValueError(f"{text!r}: no fault {name!r} to inject; known: "
                             + ", ".join(INJECTED_FAULTS))
        offset, _, length = when.partition("/")
        if at and not offset.startswith("+"):
            raise ValueError(f"{text!r}: the time is an offset from the start, like @+2m")
        try:
            after = duration(offset[1:]) if offset else 0.0
            for_s = duration(length) if length else None
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{text!r}: {e}") from None
        return cls(name, target, after, for_s)


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
    inject: list[Injection] = field(default_factory=list)

    def resolved_start_ms(self) -> int:
        if self.start_ms is not None:
            return self.start_ms
        now = int(time.time() * 1000)
        if self.speed <= 1:
            return now
        # Far enough back that the run's timestamps never pass the wall clock.
        span = self.duration_s if self.duration_s else 86_400
        return now - int(span * 1000)


class Schedule:
    """When each device reports: device ``i`` at ``start + phase[i] + k × interval``.

    ``order`` is the devices by (phase, index) and ``offsets`` their phases; ``pos`` and
    ``base`` say where the schedule stands (the next reading is ``order[pos]``'s, due at
    ``base + offsets[pos]``). The engine's loop reads and writes these directly.
    """

    def __init__(self, start_ms: int, interval_ms: int, phases: list[int]):
        self.interval_ms = interval_ms
        self.order = sorted(range(len(phases)), key=lambda i: (phases[i], i))
        self.offsets = [phases[i] for i in self.order]
        self.pos, self.base = 0, start_ms

    def __len__(self) -> int:
        return len(self.order)

    @property
    def next_due(self) -> int | None:
        return self.base + self.offsets[self.pos] if self.order else None


def _topic_part(topic: str) -> bytes:
    """A PUBLISH's topic as it goes on the wire (length-prefixed UTF-8)."""
    return wire.utf8(topic)


_vbi = wire.vbi


# A QoS 1 PUBLISH's fixed header by remaining length, for the readings' lengths (a reading
# and its topic are a few hundred bytes; the engine checks its topics fit).
_HEADS = [bytes((0x32,)) + _vbi(n) for n in range(4096)]


class _WireConnection:
    """Many devices on one ``wire.Client``: their QoS 1 publishes encoded, numbered, kept
    until acknowledged and written here (``Client.publish_encoded``), commands taken from
    the ``on_messages`` callback and acknowledged to the broker."""

    waiting: deque[tuple[int, bytes]]
    dropped = False  # (a per-device connection's state; a multiplexed one never vanishes)

    def __init__(self, engine: Engine, client_id: str, devices: list[int]):
        self.engine = engine
        self.devices = devices
        self.client_id = client_id
        self.up = False
        lights = [engine.cmd_topics[i] for i in devices
                  if isinstance(engine.devices[i], StreetlightSim)]
        # reconnect_min_s=0: the client's loop never sleeps out a backoff (it would stop
        # every connection's devices); retry() keeps each connection's own backoff.
        self.client = wire.Client(
            engine.url, client_id, protocol=PROTOCOLS[engine.config.protocol], keepalive=60,
            subscriptions=[(t, 1) for t in lights], on_messages=self._on_messages,
            on_connect=self._on_connect, on_published=self._on_published,
            on_disconnect=self._on_disconnect, max_inflight=MAX_INFLIGHT,
            reconnect_min_s=0.0, reconnect_max_s=0.0, connect_timeout_s=10.0)
        self.v5 = self.client.v5
        self._mid_bytes = _MID5.pack if self.v5 else _MID3.pack
        self.window = MAX_INFLIGHT
        self.inflight: dict[int, bytes] = {}  # sent, not yet acknowledged, by packet id
        self.waiting = deque()  # numbered and encoded, beyond the window (or while down)
        self.out: list[bytes] = []  # in flight, for this turn's write
        self.mid = FIRST_MID - 1
        self.acked = 0
        self.backoff = 0.5  # a lost broker is retried after 0.5 s, 1 s, 2 s … 30 s (±50 %)
        self.retry_at = 0.0

    # -- publishing (the engine's thread, which also runs the client's loop) --

    def _next_mid(self) -> int:
        mid, inflight = self.mid, self.inflight
        while True:
            mid = mid + 1 if mid < 65535 else FIRST_MID
            if mid not in inflight:
                self.mid = mid
                return mid

    def put(self, part: bytes, payloads: list[bytes], head: int = 0x32) -> None:
        """Queue QoS 1 PUBLISHes of ``payloads`` on the topic ``part`` (``_topic_part``);
        ``head`` 0x33 retains them."""
        fixed = len(part) + (3 if self.v5 else 2)
        inflight, out, waiting, mid_bytes = self.inflight, self.out, self.waiting, self._mid_bytes
        room = self.up and not waiting
        for payload in payloads:
            rl = fixed + len(payload)
            mid = self._next_mid()
            if 128 <= rl < 16384:
                packet = _H3.pack(head, (rl & 127) | 128, rl >> 7) + part + mid_bytes(mid) + payload
            else:
                packet = bytes((head,)) + _vbi(rl) + part + mid_bytes(mid) + payload
            if room and len(inflight) < self.window:
                inflight[mid] = packet
                out.append(packet)
            else:
                room = False
                waiting.append((mid, packet))

    def flush(self) -> None:
        """This turn's packets, in one write."""
        if self.out:
            out, self.out = self.out, []
            self.client.publish_encoded(b"".join(out), len(out))

    def _fill(self) -> None:
        waiting, inflight, out = self.waiting, self.inflight, self.out
        while waiting and len(inflight) < self.window:
            mid, packet = waiting.popleft()
            inflight[mid] = packet
            out.append(packet)

    @property
    def unacknowledged(self) -> int:
        return len(self.inflight) + len(self.waiting)

    # -- the client's callbacks (called from within its loop(), on the engine's thread) --

    def _on_connect(self, session_present: bool) -> None:
        self.up = True
        self.backoff = 0.5
        # The broker's Receive Maximum lowers our window (MQTT 5). wire.Client keeps it for
        # its own publishes only; ours are encoded here, so we read it from there.
        self.window = min(MAX_INFLIGHT, getattr(self.client, "_window", MAX_INFLIGHT))
        # What the broker never acknowledged goes again, marked DUP; then the retained
        # statuses of this connection's devices, ahead of what waited while we were away.
        self.out = [bytes((p[0] | 8,)) + p[1:] for p in self.inflight.values()]
        queued, self.waiting = self.waiting, deque()
        self.up = False  # (put() queues them all, in order)
        parts = self.engine.status_parts
        silent = self.engine.silent
        for i in self.devices:
            self.put(parts[i], [OFFLINE if i in silent else ONLINE], 0x33)
        self.waiting.extend(queued)
        self.up = True
        self._fill()
        self.flush()

    def _on_disconnect(self, why: str) -> None:
        self.up = False
        self.out = []  # in flight still: sent again on the next connection

    def _on_published(self, mids: list[int]) -> None:
        inflight = self.inflight
        before = len(inflight)
        for mid in mids:
            inflight.pop(mid, None)
        self.acked += before - len(inflight)
        if self.waiting:
            self._fill()
        self.flush()  # inside the loop turn: joins its one write

    def _on_messages(self, messages: list[wire.Message]) -> None:
        try:
            for message in messages:
                self.engine._on_wire_command(self, message)
        finally:
            self.client.ack([m.mid for m in messages if m.qos], messages[0].epoch)
            self.flush()

    # -- the connection --

    def poll(self, timeout: float = 0.0) -> None:
        """Write what is queued, read what came (acks, commands), keep the connection alive;
        reconnect a lost one when its backoff has passed."""
        if self.up:
            self.flush()
            self.client.loop(timeout)
        elif not self.engine.stopping and time.monotonic() >= self.retry_at:
            self.retry()

    def retry(self) -> None:
        """Connect (again), like a real device after losing the broker: backoff with jitter."""
        self.retry_at = time.monotonic() + self.backoff * random.uniform(0.5, 1.5)
        self.backoff = min(30.0, self.backoff * 2)
        self.client.loop(0)  # connects; on_connect runs in there

    def close(self) -> None:
        self.client.stop()  # DISCONNECT: a normal goodbye, no Will
        self.up = False


class _Connection:
    """One device on its own paho client (per-device mode): own client id and Last Will."""

    waiting = ()  # paho queues (a per-device connection carries one device's readings)

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
        status = engine.status_topics[devices[0]]
        self.client.will_set(status, OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = engine._on_command
        self.sock: socket.socket | None = None
        self.backoff = 0.5  # a lost broker is retried after 0.5 s, 1 s, 2 s … 30 s (±50 %)
        self.retry_at = 0.0

    def put(self, part: bytes, payloads: list[bytes]) -> None:
        topic = self.engine.telemetry_topics[self.devices[0]]
        for payload in payloads:
            self.client.publish(topic, payload, qos=1)

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
        if config.mode not in MODES:
            raise ValueError(f"mode {config.mode!r} is not one of {MODES}")
        self.url = url
        self.config = config
        self.city = city
        self.world = World(city)
        interval_ms = int(config.interval_s * 1000)
        if interval_ms <= 0:
            raise ValueError("the interval must be at least 1 ms")
        self.interval_ms = interval_ms
        rng = random.Random(config.seed)
        specs = list(fleet)
        seeds = [rng.getrandbits(64) for _ in specs]  # each device's own generator
        # Each device reports at its own phase of the interval, like a real fleet.
        phases = [rng.randrange(interval_ms) for _ in specs]
        characters = {d.slug: d.character for d in city.districts}
        self.devices: list[SimDevice] = [None] * len(specs)  # type: ignore[list-item]
        # Made in the order they report: the devices one round visits lie side by side in
        # memory (in fleet order they would be all over it).
        for i in sorted(range(len(specs)), key=lambda i: (phases[i], i)):
            spec = specs[i]
            self.devices[i] = make_device(spec, characters.get(spec.district, "urban"),
                                          random.Random(seeds[i]), config.faults)
        self.telemetry_topics = [str(d.topic) for d in self.devices]
        self.status_topics = [str(d.topic.with_channel("status")) for d in self.devices]
        self.cmd_topics = [str(d.topic.with_channel("cmd")) for d in self.devices]
        self.by_cmd_topic = {t: i for i, t in enumerate(self.cmd_topics)}
        # The fixed part of each device's packets, encoded once.
        self.telemetry_parts = [_topic_part(t) for t in self.telemetry_topics]
        self.status_parts = [_topic_part(t) for t in self.status_topics]
        v5 = PROTOCOLS[config.protocol] == wire.MQTT5
        self._fixed = [len(p) + (3 if v5 else 2) for p in self.telemetry_parts]
        # Topic parts are ≤ 200 bytes (ids ≤ 64 characters), readings ≤ ~300: _HEADS covers.
        assert max(self._fixed, default=0) + 1024 < len(_HEADS)
        self._mid_bytes = _MID5.pack if v5 else _MID3.pack
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
        self.schedule = Schedule(self.clock.start_ms, interval_ms, phases)
        self.selector = selectors.DefaultSelector()
        self.connections: list[_WireConnection | _Connection] = []
        self.connection_of: list[_WireConnection | _Connection] = []
        self.stats = Counter()
        self._next_poll = 0.0
        self.silent: set[int] = set()  # multiplexed: devices in an offline fault, by index
        self.events: list[tuple[int, int]] = []  # (due, device): each light's next event
        self.injections = self._resolve(config.inject)
        self.stopping = False
        self._stop = threading.Event()

    def _resolve(self, injections: list[Injection]) -> list[tuple[int, int, Injection, list[int]]]:
        """(due ms, order, injection, devices), by when they are due; an unknown target is
        refused here, before anything connects."""
        by_id = {d.spec.device_id: i for i, d in enumerate(self.devices)}
        out = []
        for k, inj in enumerate(injections):
            if inj.name == "cabinet_outage":
                ids = [i for i, d in enumerate(self.devices) if d.spec.cabinet == inj.target]
            else:
                ids = [by_id[inj.target]] if inj.target in by_id else []
            if not ids:
                raise ValueError(f"--inject {inj.name}:{inj.target}: no such "
                                 f"{'cabinet' if inj.name == 'cabinet_outage' else 'device'}")
            if inj.name != "offline" and not all(
                    isinstance(self.devices[i], StreetlightSim) for i in ids):
                raise ValueError(f"--inject {inj.name}:{inj.target}: a streetlight's fault")
            out.append((self.clock.start_ms + int(inj.after_s * 1000), k, inj, ids))
        out.sort(key=lambda e: e[:2])
        return out

    def _inject_due(self, now_sim: int) -> None:
        while self.injections and self.injections[0][0] <= now_sim:
            _, _, inj, ids = self.injections.pop(0)
            span = inj.for_s if inj.for_s is not None else (
                30 * self.config.interval_s if inj.name == "offline" else 1e12)
            readings = max(1, round(span / self.config.interval_s))
            for i in ids:
                self.devices[i].inject(inj.name, readings)
            self.stats[f"injected_{inj.name}"] += len(ids)
            log.info("injected %s on %s (%d device%s)", inj.name, inj.target, len(ids),
                     "" if len(ids) == 1 else "s")

    @property
    def per_device(self) -> bool:
        return self.config.mode == "per-device"

    # ------------------------------------------------------------------ connections

    def _groups(self) -> list[list[int]]:
        """The devices of each connection. Multiplexed: dealt out in chunks of CHUNK in the
        order they report, so a tick's readings fall on a few connections (a few writes),
        and a burst's on several (several in-flight windows)."""
        n = len(self.devices)
        if self.per_device:
            return [[i] for i in range(n)]
        size = max(1, self.config.devices_per_connection)
        groups: list[list[int]] = [[] for _ in range(-(-n // size))]
        for rank, i in enumerate(self.schedule.order):
            groups[(rank // CHUNK) % len(groups)].append(i)
        return [sorted(g) for g in groups]

    def connect(self) -> None:
        n = len(self.devices)
        self.connection_of = [None] * n  # type: ignore[list-item]
        for k, ids in enumerate(self._groups()):
            if self.per_device:
                client_id = f"dev-{self.devices[ids[0]].spec.device_id}"
                conn: _WireConnection | _Connection = _Connection(self, client_id, ids)
                conn.connect()
            else:
                client_id = f"{self.config.client_prefix}-{self.config.seed}-{k}"
                conn = _WireConnection(self, client_id, ids)
                conn.retry()
                if not conn.up:  # as paho's connect() did: a broker that is not there is said
                    raise ConnectionError(f"{client_id} could not connect to {self.url}: "
                                          f"{conn.client.last_error}")
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
        if self.per_device:
            self._service_paho(timeout)
            return
        now = time.monotonic()
        poll_all = now >= self._next_poll
        if poll_all:
            self._next_poll = now + POLL_S
        for conn in self.connections:
            if poll_all or conn.waiting or not conn.up:
                conn.poll()
            else:
                conn.flush()
        if timeout > 0:
            self._stop.wait(timeout)

    def _wait_wire(self, wait: float) -> None:
        """Write and read what is due, then wait: on the socket of a connection whose
        window is full if there is one (its acks end the wait), else on the clock."""
        self._service_io(0)
        if wait > 0:
            full = next((c for c in self.connections if c.waiting and c.up), None)
            if full is not None:
                full.poll(wait)
            else:
                self._stop.wait(wait)

    def _service_paho(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            conn: _Connection = key.data
            rc = conn.client.loop_read()
            if rc != paho.MQTT_ERR_SUCCESS and conn.sock is not None:
                conn._unregister()
        for conn in self.connections:
            if conn.sock is not None and conn.client.want_write():
                conn.client.loop_write()

    def _command(self, topic: str, payload: bytes) -> tuple[int, bytes] | None:
        """Apply a command to its light; (the device, the ack to publish), or None."""
        i = self.by_cmd_topic.get(topic)
        device = self.devices[i] if i is not None else None
        if not isinstance(device, StreetlightSim) or device.offline_for > 0:
            return None  # not ours, or switched off: a dead controller answers nothing
        ack = device.command(payload, self.clock.now_ms())
        self.stats["commands"] += 1
        self.stats["acks_ok" if ack["ok"] else "acks_refused"] += 1
        return i, orjson.dumps(ack)

    def _on_command(self, client, userdata, message: paho.MQTTMessage) -> None:
        done = self._command(message.topic, message.payload)
        if done is not None:
            i, ack = done
            client.publish(str(self.devices[i].topic.with_channel("ack")), ack, qos=1)

    def _on_wire_command(self, conn: _WireConnection, message: wire.Message) -> None:
        done = self._command(message.topic, message.payload)
        if done is not None:
            i, ack = done
            conn.put(_topic_part(str(self.devices[i].topic.with_channel("ack"))), [ack])

    # ------------------------------------------------------------------ run

    def stop(self) -> None:
        self._stop.set()

    def _publish_events(self, upto: int) -> int:
        """Publish the lights' events due by ``upto``, in time order; how many went."""
        events, devices, world = self.events, self.devices, self.world
        parts, conn_of = self.telemetry_parts, self.connection_of
        n = 0
        while events and events[0][0] <= upto:
            due, i = heapq.heappop(events)
            device = devices[i]
            planned = device.planned
            if not planned or planned[0][0] != due:
                continue  # its plan went (an outage) or was made again
            payloads = device.motion_event(world)
            if planned:
                heapq.heappush(events, (planned[0][0], i))
            if payloads:
                n += len(payloads)
                conn_of[i].put(parts[i], payloads)
        self.stats["motion_events"] += n
        return n

    def _publish_due(self, now_sim: int) -> _WireConnection | bool:
        """Publish every reading due by ``now_sim``: True when all were, False when stopped,
        or the connection whose backlog is full (the schedule waits for it)."""
        if not len(self.schedule):
            return True
        if self.per_device:
            return self._publish_due_per_device(now_sim)
        sched = self.schedule
        order, offsets, n = sched.order, sched.offsets, len(sched.order)
        pos, base, step = sched.pos, sched.base, sched.interval_ms
        devices, conn_of, parts = self.devices, self.connection_of, self.telemetry_parts
        world, interval_s = self.world, self.config.interval_s
        fixed, heads, mid_bytes = self._fixed, _HEADS, self._mid_bytes
        readings, left = 0, SERVICE_EVERY
        silent = self.silent if "offline" in self.config.faults or self.config.inject else None
        events, push = self.events, heapq.heappush
        result: _WireConnection | bool = True
        try:
            while True:
                due = base + offsets[pos]
                if events and events[0][0] <= due:  # the events before this reading first
                    readings += self._publish_events(due if due <= now_sim else now_sim)
                if due > now_sim:
                    break
                i = order[pos]
                conn = conn_of[i]
                if conn.waiting and len(conn.waiting) >= MAX_BACKLOG:
                    result = conn
                    break
                pos += 1
                if pos == n:
                    pos = 0
                    base += step
                device = devices[i]
                payloads = device.tick(due, interval_s, world)
                if device.planned:
                    push(events, (device.planned[0][0], i))
                if silent is not None:
                    # An offline fault (5–30 silent readings) on a shared connection: the
                    # retained status a per-device connection's Last Will would give, and
                    # online again with its first reading back.
                    if payloads:
                        if i in silent:
                            silent.discard(i)
                            conn.put(self.status_parts[i], [ONLINE], 0x33)
                    elif devices[i].went_offline and i not in silent:
                        silent.add(i)
                        conn.put(self.status_parts[i], [OFFLINE], 0x33)
                if payloads:
                    readings += len(payloads)
                    # put(), inline for the usual case: one reading, room in the window.
                    inflight = conn.inflight
                    if (len(payloads) == 1 and conn.up and not conn.waiting
                            and len(inflight) < conn.window):
                        mid = conn.mid + 1
                        if mid > 65535 or mid in inflight:
                            mid = conn._next_mid()
                        else:
                            conn.mid = mid
                        payload = payloads[0]
                        packet = heads[fixed[i] + len(payload)] + parts[i] + mid_bytes(mid)
                        inflight[mid] = packet = packet + payload
                        conn.out.append(packet)
                    else:
                        conn.put(parts[i], payloads)
                left -= 1
                if not left:
                    left = SERVICE_EVERY
                    sched.pos, sched.base = pos, base
                    self.stats["readings"] += readings
                    readings = 0
                    self._service_io(0)  # take the broker's acks as we go
                    if self._stop.is_set():  # behind schedule must not mean deaf to Ctrl-C
                        result = False
                        break
        finally:
            sched.pos, sched.base = pos, base
            self.stats["readings"] += readings
        return result

    def _publish_due_per_device(self, now_sim: int) -> bool:
        sched = self.schedule
        order, offsets, n = sched.order, sched.offsets, len(sched.order)
        pos, base, step = sched.pos, sched.base, sched.interval_ms
        devices, conn_of = self.devices, self.connection_of
        world, interval_s = self.world, self.config.interval_s
        events, push = self.events, heapq.heappush
        readings = burst = 0
        result = True
        try:
            while True:
                due = base + offsets[pos]
                if events and events[0][0] <= due:  # the events before this reading first
                    readings += self._publish_events(due if due <= now_sim else now_sim)
                if due > now_sim:
                    break
                i = order[pos]
                device, conn = devices[i], conn_of[i]
                pos += 1
                if pos == n:
                    pos = 0
                    base += step
                if conn.dropped and device.offline_for == 0:
                    conn.revive()
                payloads = device.tick(due, interval_s, world)
                if device.planned:
                    push(events, (device.planned[0][0], i))
                if payloads:
                    conn.put(b"", payloads)
                    readings += len(payloads)
                if device.went_offline and not conn.dropped:
                    conn.drop()
                burst += 1
                if burst % SERVICE_EVERY == 0:
                    sched.pos, sched.base = pos, base
                    self._service_io(0)
                    if self._stop.is_set():
                        result = False
                        break
        finally:
            sched.pos, sched.base = pos, base
            self.stats["readings"] += readings
        return result

    def run(self) -> Counter:
        """Publish until the duration is over or stop() is called; returns the stats."""
        if not self.connections:
            self.connect()
        next_misc = next_report = next_save = time.monotonic()
        reported = 0
        while not self._stop.is_set():
            turn = time.monotonic()
            now_sim = self.clock.now_ms()
            # At the end, still send every reading due before it (at 3600× one loop can
            # span minutes of simulated time): a run publishes exactly its schedule.
            finishing = self.end_ms is not None and now_sim >= self.end_ms
            if finishing:
                now_sim = self.end_ms - 1
            if self.injections and self.injections[0][0] <= now_sim:
                self._publish_due(self.injections[0][0] - 1)  # what came before it, first
                self._inject_due(now_sim)
            done = self._publish_due(now_sim)
            if finishing and done is True:
                break
            if isinstance(done, _WireConnection):
                # Its backlog is full (the broker is behind, or gone): wait for its acks
                # (its socket wakes us when they come) or its reconnection, not for the clock.
                self._service_io(0)
                if done.up:
                    done.poll(0.05)
                else:
                    self._stop.wait(min(0.05, max(0.0, done.retry_at - time.monotonic())))
            else:
                wait = 0.05
                next_due = self.schedule.next_due
                if self.events and (next_due is None or self.events[0][0] < next_due):
                    next_due = self.events[0][0]
                if done is True and next_due is not None:
                    wake = self.clock.wall_at(next_due)
                    if not self.per_device:
                        wake = max(wake, turn + TICK_S)  # paced: a tick's readings, one write
                    wait = min(wait, max(0.0, wake - time.monotonic()))
                if self.per_device:
                    self._service_io(wait)
                else:
                    self._wait_wire(wait)
            now = time.monotonic()
            if now >= next_misc:
                if self.per_device:
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
                    due = self.schedule.next_due
                    behind = (now_sim - due) / 1000 if due is not None else 0
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
        if self.per_device:
            self._close_paho()
            return
        for conn in self.connections:
            if conn.up:
                for i in conn.devices:
                    conn.put(self.status_parts[i], [OFFLINE], 0x33)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                c.up and c.unacknowledged for c in self.connections):
            for conn in self.connections:
                if conn.up and conn.unacknowledged:
                    conn.poll(0.01)
        for conn in self.connections:
            self.stats["pubacks"] += conn.acked
            if conn.unacknowledged:
                self.stats["unacknowledged"] += conn.unacknowledged
            conn.close()
        self.selector.close()

    def _close_paho(self) -> None:
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
