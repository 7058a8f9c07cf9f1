"""`citygrid adapters run`: native device topics ⇄ the CityGrid contract.

Inbound, a native message from a registered device (its profile and native id in the
registry) is decoded by the device's profile and republished as contract messages: readings on
``…/telemetry``, presence on ``…/status`` (retained), and, when a state report confirms a
command it was sent, an ack on ``…/ack``. Outbound, a contract command on ``…/cmd`` for a
device with a profile becomes the device's native command.

Nothing is lost between the two sides. The service consumes QoS 1 in a persistent session
and acknowledges a message by hand, only once every contract message made from it has been
acknowledged by the broker (``on_published``: the PUBACKs of one read, by packet id) — or,
for a message it cannot map (unknown native device, missing field, bad unit, …) and for a
contract message the broker refuses (a PUBACK reason ≥ 0x80 under MQTT 5: its ACL), once the
dead letter is on disk (``adapters.sqlite``, :mod:`adapters.deadletter`). A crash before that
and the broker delivers the message again to the next run.

One thread runs the MQTT connection (``citygrid.wire``, driven by the service's own
``loop()`` calls, like the rule engine's), so the decode, the publishes, their PUBACKs and the
acknowledgements need no locks: every PUBLISH of one socket read is handled in one call, and
the contract publishes and acknowledgements that a read causes go out as one write. Beside
it: the registry watcher (re-reads the devices with a profile when ``Registry.version()``
changes, polled every ``registry_poll_s``; the loop thread then subscribes or unsubscribes
what changed), and the dead-letter writer. Memory is bounded by the MQTT 5 Receive Maximum:
the broker sends no more than that many messages before we acknowledge one.

The subscriptions are the persistent session's, and remembered across runs (in
``adapters.sqlite``): on each connection the service subscribes what the registry calls for
and the session lacks (all of it when the broker kept no session), and unsubscribes what no
device needs any more. A filter the session already has is not subscribed again, so retained
messages come once, when a subscription is new to the session.

The MQTT client comes from a factory (called as ``citygrid.wire.Client`` is) and time from a
clock (both passed in), so all of this runs in tests without a broker.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from adapters.deadletter import (
    BAD_ACK,
    BAD_COMMAND,
    FILENAME,
    PUBLISH_REFUSED,
    UNKNOWN_DEVICE,
    DeadLetter,
    DeadLetterStore,
)
from adapters.profile import Decoded, DecodeError, Profile
from citygrid import wire
from citygrid.clock import SYSTEM_CLOCK, Clock
from citygrid.contract import Ack, ContractError, Topic, topic_filter, validate_command
from citygrid.fleet import Fleet
from citygrid.registry import Follower
from citygrid.settings import Settings

log = logging.getLogger("citygrid.adapters")

ClientFactory = Callable[..., wire.Client]  # called as citygrid.wire.Client is
CMD_PREFIX = "city/v1/"
TOPIC_CACHE_MAX = 200_000
# PUBACK and SUBACK reason codes ≥ 0x80 (MQTT 5), for dead letters and logs.
REFUSALS = {0x80: "unspecified error", 0x83: "implementation specific error",
            0x87: "not authorized", 0x8F: "topic filter invalid", 0x90: "topic name invalid",
            0x91: "packet identifier in use", 0x97: "quota exceeded",
            0x99: "payload format invalid"}


@dataclass
class AdapterConfig:
    client_id: str = "citygrid-adapters"
    receive_maximum: int = 1000  # native messages held unacknowledged, at most
    registry_poll_s: float = 0.5  # how often Registry.version() is read
    report_interval_s: float = 10.0
    dead_letter_flush_s: float = 0.05
    dead_letter_max: int = 10_000
    command_timeout_s: float = 300.0  # a command no state report confirms is forgotten then
    metrics_port: int | None = None
    # After a read that brought messages, let the next ones gather this long before reading
    # again: fewer, fuller reads (a wake-up costs more CPU than a message here, see
    # bench/adapters.py) for at most this much latency. 0: read as soon as anything arrives.
    batch_window_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Route:
    """A registered device with a profile, and its contract topics."""

    device_id: str
    kind: str
    district: str
    profile: Profile
    native_id: str
    telemetry: str
    ack: str
    status: str


@dataclass(frozen=True)
class _Inventory:
    """What the registry says, as the hot path reads it (swapped whole by reference)."""

    native: Mapping[tuple[str, str], Route]  # (profile name, native id) → device
    devices: Mapping[str, Route]  # device id → device
    filters: tuple[tuple[str, Profile], ...]  # native subscription, profile
    wanted: frozenset[str]  # every subscription: native filters and contract cmd filters


_EMPTY = _Inventory({}, {}, (), frozenset())


class AdapterService:
    """``profiles``: the loaded profiles by name (``adapters.load_profiles()``);
    ``registry_dir``: where ``registry.sqlite`` is (opened once it exists: never created
    here); ``client_factory`` makes the MQTT client, called as ``citygrid.wire.Client`` (the
    default) and returning something with its ``loop()``, ``stop()``, ``publish()``,
    ``ack()``, ``subscribe()``, ``unsubscribe()``, ``subscriptions``, ``subscribed``,
    ``refused`` and ``epoch``; ``clock`` gives every time stamp and interval."""

    def __init__(self, settings: Settings, *, profiles: Mapping[str, Profile],
                 registry_dir: str | Path | None = None, config: AdapterConfig | None = None,
                 data_dir: str | Path | None = None, client_factory: ClientFactory | None = None,
                 clock: Clock | None = None):
        self.settings = settings
        self.profiles = dict(profiles)
        self.config = config or AdapterConfig()
        self._clock = clock or SYSTEM_CLOCK
        self._follower = Follower(Path(registry_dir or settings.data_dir))
        self.dead_letters = DeadLetterStore(Path(data_dir or settings.data_dir) / FILENAME,
                                            self.config.dead_letter_max)
        self.counts: Counter[str] = Counter()  # messages, readings, acks, … (loop thread)
        self.dead_counts: Counter[str] = Counter()  # by reason (dead-letter writer)
        self._inventory = _EMPTY
        self._missing_profiles: set[str] = set()
        self._topic_profiles: dict[str, tuple[Profile, ...]] = {}
        # What the session has subscribed (the loop thread's view; replaced, never changed in
        # place, as other threads read it), remembered across runs so that filters no device
        # needs any more are unsubscribed from the persistent session.
        self._subscribed: frozenset[str] = frozenset(self.dead_letters.subscriptions())
        self._synced: _Inventory | None = None  # the inventory the subscriptions follow
        # The SUBSCRIBE awaiting its SUBACK (one at a time): its filters, for which inventory.
        self._sub_pending: tuple[tuple[str, ...], _Inventory] | None = None
        # Filters the broker refused (→ reason): asked again on the next connection, or once
        # the registry has changed since.
        self._refused: dict[str, int] = {}
        self._refused_under: _Inventory | None = None
        # Acknowledgement bookkeeping, loop thread only. ``_epoch`` is the connection's
        # (``wire.Client.epoch``, None between connections): ids of an older connection are
        # never acknowledged on a newer one.
        self._epoch: int | None = None
        # publish mid → (inbound mid it belongs to, 0 for none; its topic; its payload)
        self._out: dict[int, tuple[int, str, bytes]] = {}
        self._waiting: dict[int, int] = {}  # inbound mid → publishes not yet acknowledged
        self._acks: list[int] = []  # inbound mids done, to acknowledge in this read's write
        self._written: collections.deque[tuple[int, int]] = collections.deque()  # dead, on disk
        self._dead: list[tuple[DeadLetter, int | None, int | None]] = []  # (letter, epoch, mid)
        self._dead_lock = threading.Condition()
        self._commands: dict[str, tuple[dict[str, Any], float]] = {}  # device → (cmd, deadline)
        self._had_messages = False  # since the last loop turn (batch_window_s)
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._ready = threading.Event()  # connected and the wanted filters subscribed
        self._threads: list[threading.Thread] = []
        self._writer: threading.Thread | None = None
        self._metrics_server = None
        self._client = (client_factory or wire.Client)(
            settings.mqtt, self.config.client_id, clean_start=False,
            session_expiry_s=wire.SESSION_EXPIRY_S, receive_maximum=self.config.receive_maximum,
            on_messages=self._on_messages, on_connect=self._on_connect,
            on_published=self._on_published, on_disconnect=self._on_disconnect,
            reconnect_min_s=0.25, reconnect_max_s=2.0)
        self.refresh_registry()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float | None = 10.0) -> None:
        """Start, and return once subscribed; ``timeout_s=None`` waits for the broker forever."""
        if self.config.metrics_port:
            self._serve_metrics(self.config.metrics_port)
        self._threads = [threading.Thread(target=target, name=name, daemon=True)
                         for target, name in ((self._run, "adapters-mqtt"),
                                              (self._write_dead_letters, "adapters-dead-letters"),
                                              (self._watch_registry, "adapters-registry"),
                                              (self._reporter, "adapters-report"))]
        self._writer = self._threads[1]
        for thread in self._threads:
            thread.start()
        clock = self._clock
        deadline = None if timeout_s is None else clock.monotonic() + timeout_s
        while not self._ready.wait(5.0 if deadline is None else
                                   max(0.0, min(5.0, deadline - clock.monotonic()))):
            if deadline is not None and clock.monotonic() >= deadline:
                self.stop()
                raise TimeoutError(f"not subscribed at {self.settings.mqtt} within {timeout_s}s")
            log.warning("waiting for the broker at %s", self.settings.mqtt)

    def stop(self) -> None:
        """Write the dead letters held, acknowledge what is done, disconnect. What is not done
        stays unacknowledged in the persistent session, for the next start."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._dead_lock:
            self._dead_lock.notify_all()
        if self._threads:
            mqtt_thread, *others = self._threads
            mqtt_thread.join(timeout=15)
            if mqtt_thread.is_alive():  # in a connect or its backoff: cut it short
                self._client.stop()
                mqtt_thread.join(timeout=10)
            for thread in others:
                thread.join(timeout=30)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._follower.close()
        self.dead_letters.close()

    @property
    def subscriptions(self) -> frozenset[str]:
        """What the service wants subscribed now (native filters and contract commands)."""
        return self._inventory.wanted

    def wait_subscribed(self, timeout_s: float = 5.0) -> bool:
        """Wait until the session has exactly the filters the registry calls for."""
        deadline = self._clock.monotonic() + timeout_s
        while self._clock.monotonic() < deadline:
            if self._connected.is_set() and self._sub_pending is None and \
                    self._subscribed == self._inventory.wanted:
                return True
            self._stopping.wait(0.02)
        return False

    # ------------------------------------------------------------------ the MQTT thread

    def _run(self) -> None:
        """The loop thread: the client's loop (connecting, reconnecting with backoff; every
        callback runs here), and between reads what is not driven by the broker."""
        client = self._client
        window = self.config.batch_window_s
        try:
            while not self._stopping.is_set():
                try:
                    client.loop(0.05)
                    self._turn()
                    if window and self._had_messages:
                        self._had_messages = False
                        time.sleep(window)
                except Exception:  # a bug must not end the service's connection
                    log.exception("the MQTT loop failed; going on")
                    self._stopping.wait(0.5)
        finally:
            # The letters the writer still holds go to disk first, so that their messages
            # are acknowledged with the rest before DISCONNECT.
            if self._writer is not None and self._writer.is_alive():
                self._writer.join(timeout=10)
            self._drain_written()
            self._flush_acks()
            client.stop()

    def _turn(self) -> None:
        """After each loop turn: acknowledge the dead-lettered, follow the registry."""
        if self._written:
            self._drain_written()
        if self._acks:
            self._flush_acks()
        if self._connected.is_set():
            if self._sub_pending is not None and self._client.subscribed.is_set():
                self._subscribe_answered()
            self._sync_subscriptions()
        if self._commands:
            now = self._clock.monotonic()
            for device_id in [d for d, (_, until) in self._commands.items() if until < now]:
                del self._commands[device_id]
                self.counts["commands_unconfirmed"] += 1

    def _drain_written(self) -> None:
        written = self._written
        while written:
            epoch, mid = written.popleft()
            if epoch == self._epoch:
                self._done(mid)

    def _flush_acks(self) -> None:
        """The inbound messages done: one write (inside a callback, with the read's own)."""
        if self._acks:
            if self._epoch is not None:
                self._client.ack(self._acks, self._epoch)
            self._acks = []

    def _lost(self) -> None:
        """The connection is gone: its message ids mean nothing now. The broker sends the
        unacknowledged messages again on the next connection (clean_start=False)."""
        self._epoch = None
        self._connected.clear()
        self._out.clear()
        self._waiting.clear()
        self._acks = []
        self._sub_pending = None

    def _on_connect(self, session_present: bool) -> None:
        self._epoch = self._client.epoch
        if not session_present and self._subscribed:
            self._subscribed = frozenset()  # a new session has no subscriptions
            self._remember_subscriptions()
        self._refused.clear()
        self._sub_pending = None
        self._synced = None
        self._connected.set()
        log.info("connected to %s as %s (session present: %s)", self.settings.mqtt,
                 self.config.client_id, session_present)
        self._sync_subscriptions()

    def _on_disconnect(self, why: str) -> None:
        self._lost()
        # The client subscribes its list again on every connection; the session keeps ours,
        # and _on_connect decides what it lacks.
        self._client.subscriptions = []
        if not self._stopping.is_set():
            log.info("disconnected from the broker (%s); unacknowledged messages come again",
                     why)

    def _sync_subscriptions(self) -> None:
        """Subscribe to what the registry calls for and the session lacks; unsubscribe the
        rest. One SUBSCRIBE at a time. The client's list of subscriptions is set to the
        session's first: its ``subscribe`` sends only filters not on it (a refused one, asked
        again, would stay there), and older clients' ``unsubscribe`` only filters on it."""
        if self._sub_pending is not None:
            return
        inventory = self._inventory
        if inventory is self._synced:
            return
        if self._refused and inventory is not self._refused_under:
            self._refused.clear()  # the registry changed: ask again
        wanted = inventory.wanted
        drop = sorted(self._subscribed - wanted)
        add = sorted(wanted - self._subscribed - self._refused.keys())
        client = self._client
        if drop or add:
            client.subscriptions = [(f, 1) for f in sorted(self._subscribed)]
        if drop:
            client.unsubscribe(drop)
            self._subscribed = self._subscribed - set(drop)
            self._remember_subscriptions()
            log.info("unsubscribed from %s", ", ".join(drop))
        if add:
            client.subscribed.clear()  # set again by the SUBACK
            self._sub_pending = (tuple(add), inventory)
            client.subscribe([(f, 1) for f in add])
        else:
            self._synced = inventory
            self._ready.set()

    def _subscribe_answered(self) -> None:
        """The SUBACK: what the broker granted is the session's; what it refused is logged
        and not asked again until the registry changes or the next connection."""
        assert self._sub_pending is not None
        asked, inventory = self._sub_pending
        self._sub_pending = None
        refused = {t: c for t, c in self._client.refused if t in asked}
        granted = [f for f in asked if f not in refused]
        if refused:
            self._refused.update(refused)
            self._refused_under = inventory
            log.error("the broker refused the subscription to %s", ", ".join(
                f"{t} (0x{c:02x} {REFUSALS.get(c, 'refused')})" for t, c in refused.items()))
        if granted:
            self._subscribed = self._subscribed | set(granted)
            self._remember_subscriptions()
            log.info("subscribed to %s", ", ".join(granted))

    def _remember_subscriptions(self) -> None:
        try:
            self.dead_letters.set_subscriptions(self._subscribed)
        except Exception:  # only a later run's clean-up depends on it
            log.exception("could not remember the subscriptions")

    # ------------------------------------------------------------------ inbound

    def _on_messages(self, messages: list[wire.Message]) -> None:
        """Every PUBLISH of one socket read; what they publish and the acknowledgements of
        what is already done (dead letters aside) go out with the read's one write."""
        self._had_messages = True
        on_message = self._on_message
        for message in messages:
            on_message(message)
        if self._acks:
            self._flush_acks()

    def _on_message(self, message: wire.Message) -> None:
        mid = message.mid if message.qos else 0
        if mid:
            self._waiting[mid] = 1  # a guard: no ack before this handler has published all
        topic = message.topic
        try:
            if topic.startswith(CMD_PREFIX):
                self._command(topic, message.payload, mid)
            else:
                self._native(topic, message.payload, mid)
        except Exception as e:  # a bug, not the message's fault: keep it, and say so
            log.exception("could not handle a message on %s", topic)
            self._dead_letter(topic, "internal_error", repr(e)[:500], message.payload, mid)
        if mid:
            self._release(mid)

    def _native(self, topic: str, payload: bytes, mid: int) -> None:
        counts = self.counts
        counts["messages"] += 1
        inventory = self._inventory
        now_ms = self._clock.now_ms()
        candidates = self._topic_profiles.get(topic)
        if candidates is None:
            candidates = self._profiles_for(topic, inventory)
        error: DecodeError | None = None
        decoded: Decoded | None = None
        route: Route | None = None
        for profile in candidates:
            try:
                decoded = profile.decode(topic, payload, now_ms)
            except DecodeError as e:
                error = error or e
                continue
            route = inventory.native.get((profile.name, decoded.native_id))
            if route is not None or decoded.affected:
                break
        if route is None:
            if decoded is not None and decoded.affected and not decoded.readings:
                self._node_status(decoded, inventory)  # a gateway/node speaking for devices
                return
            if error is not None and decoded is None:
                self._dead_letter(topic, error.reason, error.detail, payload, mid)
            elif decoded is None:
                self._dead_letter(topic, UNKNOWN_DEVICE, "no profile a registered device "
                                  "uses reads this topic", payload, mid)
            else:
                self._dead_letter(topic, UNKNOWN_DEVICE, f"native id {decoded.native_id!r} "
                                  "is no registered device's (citygrid devices add … "
                                  "--profile … --native-id …)", payload, mid)
            return
        publish = self._publish
        for reading in decoded.readings:
            publish(route.telemetry, orjson.dumps(reading), mid)
        if decoded.readings:
            counts["readings"] += len(decoded.readings)
        if decoded.status is not None:
            self._status(route, decoded.status, mid)
            if decoded.affected:
                self._node_status(decoded, inventory, mid)
        if decoded.acks or (decoded.state and route.device_id in self._commands):
            self._acks_from(route, decoded, now_ms, payload, mid)
        if decoded.held and not decoded.readings:
            counts["held"] += 1

    def _profiles_for(self, topic: str, inventory: _Inventory) -> tuple[Profile, ...]:
        """The profiles in use whose subscriptions match the topic (remembered per topic)."""
        found: list[Profile] = []
        for sub, profile in inventory.filters:
            if profile not in found and topic_matches(sub, topic):
                found.append(profile)
        if len(self._topic_profiles) >= TOPIC_CACHE_MAX:
            self._topic_profiles.clear()
        self._topic_profiles[topic] = out = tuple(found)
        return out

    def _status(self, route: Route, status: str, mid: int) -> None:
        if status not in ("online", "offline"):
            return
        self._publish(route.status, b'{"online":true}' if status == "online"
                      else b'{"online":false}', mid, retain=True)
        self.counts["statuses"] += 1

    def _node_status(self, decoded: Decoded, inventory: _Inventory, mid: int = 0) -> None:
        if decoded.status is None:
            return
        for native_id in decoded.affected:
            for profile_name, nid in ((p.name, native_id) for _, p in inventory.filters):
                route = inventory.native.get((profile_name, nid))
                if route is not None:
                    self._status(route, decoded.status, mid)
                    break

    def _acks_from(self, route: Route, decoded: Decoded, now_ms: int, payload: bytes,
                   mid: int) -> None:
        """The device's answer, or a state report that confirms the pending command."""
        pending = self._commands.get(route.device_id)
        acks = list(decoded.acks)
        if pending is not None and not acks and decoded.state:
            ack = route.profile.ack_for(pending[0], decoded.state, now_ms)
            if ack is not None:
                acks.append(ack)
        for ack in acks:
            if "id" not in ack:
                if pending is None:
                    self.counts["acks_unmatched"] += 1
                    continue
                ack = {"id": pending[0]["id"], **ack}
            ack.setdefault("ts", now_ms)
            try:
                Ack.model_validate(ack)
            except ValueError as e:
                self._dead_letter(route.ack, BAD_ACK, str(e)[:500], payload, 0)
                continue
            self._publish(route.ack, orjson.dumps(ack), mid)
            self.counts["acks"] += 1
            if pending is not None and ack["id"] == pending[0]["id"]:
                self._commands.pop(route.device_id, None)
                pending = None

    # ------------------------------------------------------------------ commands

    def _command(self, topic: str, payload: bytes, mid: int) -> None:
        """A contract command for a device with a profile → its native command(s)."""
        try:
            t = Topic.parse(topic)
        except ContractError:
            return
        if t.channel != "cmd":
            return
        route = self._inventory.devices.get(t.device_id)
        if route is None:
            self.counts["commands_not_ours"] += 1  # a contract device takes it itself
            return
        try:
            command = validate_command(payload).model_dump()
            native = route.profile.encode_command(route.native_id, command)
        except (ContractError, DecodeError, ValueError) as e:
            reason = getattr(e, "reason", BAD_COMMAND)
            self._dead_letter(topic, BAD_COMMAND, f"{reason}: {getattr(e, 'detail', e)}",
                              payload, mid)
            return
        for native_topic, body in native:
            self._publish(native_topic, body, mid)
        self._commands[route.device_id] = (
            command, self._clock.monotonic() + self.config.command_timeout_s)
        self.counts["commands"] += 1

    # ------------------------------------------------------------------ publish and ack

    def _publish(self, topic: str, payload: bytes, mid: int, retain: bool = False) -> None:
        self._out[self._client.publish(topic, payload, 1, retain)] = (mid, topic, payload)
        if mid:
            self._waiting[mid] += 1

    def _on_published(self, mids: list[int], refused: Mapping[int, int] | None = None) -> None:
        """The broker's PUBACKs of one read. ``refused``: packet id → reason code (≥ 0x80) of
        the publishes it refused (default: what the client says, ``refused_publishes``)."""
        if refused is None:
            refused = getattr(self._client, "refused_publishes", None) or {}
        out, release = self._out, self._release
        for mid in mids:
            entry = out.pop(mid, None)
            if entry is None:
                continue  # an earlier connection's: its message comes again
            if refused and mid in refused:
                self._publish_refused(entry, refused[mid])
            if entry[0]:
                release(entry[0])
        if self._acks:
            self._flush_acks()

    def _publish_refused(self, entry: tuple[int, str, bytes], code: int) -> None:
        """The broker did not take a contract message (its ACL, under MQTT 5): the message is
        dead-lettered as it was to go, and its native message acknowledged once the letter is
        on disk, instead of being held until the next connection brings it back refused
        again."""
        mid, topic, payload = entry
        self.counts["publish_refused"] += 1
        self._dead_letter(topic, PUBLISH_REFUSED, f"the broker refused the publish: reason "
                          f"0x{code:02x} ({REFUSALS.get(code, 'refused')})", payload, mid)

    def _release(self, mid: int) -> None:
        left = self._waiting.get(mid)
        if left is None:
            return
        if left <= 1:
            del self._waiting[mid]
            self._acks.append(mid)
        else:
            self._waiting[mid] = left - 1

    def _done(self, mid: int) -> None:  # a dead letter is on disk
        self._release(mid)

    # ------------------------------------------------------------------ dead letters

    def _dead_letter(self, topic: str, reason: str, detail: str, payload: bytes,
                     mid: int) -> None:
        letter = DeadLetter(self._clock.now_ms(), topic, reason, detail, bytes(payload))
        if mid:
            self._waiting[mid] += 1  # acknowledged when the letter is on disk
        with self._dead_lock:
            self._dead.append((letter, self._epoch, mid or None))
            self._dead_lock.notify()

    def _write_dead_letters(self) -> None:
        while True:
            with self._dead_lock:
                while not self._dead and not self._stopping.is_set():
                    self._dead_lock.wait(1.0)
                if not self._dead and self._stopping.is_set():
                    return
            self._stopping.wait(self.config.dead_letter_flush_s)  # gather a batch
            with self._dead_lock:
                batch, self._dead = self._dead, []
            delay = 0.5
            while True:
                try:
                    self.dead_letters.add(letter for letter, _, _ in batch)
                    break
                except Exception:
                    log.exception("could not write %d dead letters; retrying", len(batch))
                    if self._stopping.wait(delay):
                        return  # unacknowledged: the broker sends them again next time
                    delay = min(delay * 2, 30.0)
            for letter, epoch, mid in batch:
                self.dead_counts[letter.reason] += 1
                if mid is not None:
                    self._written.append((epoch, mid))
            if batch:
                log.info("dead-lettered %d messages (%s)", len(batch), ", ".join(
                    f"{r}={n}" for r, n in Counter(x.reason for x, _, _ in batch).items()))

    # ------------------------------------------------------------------ the registry

    def _watch_registry(self) -> None:
        while not self._stopping.wait(self.config.registry_poll_s):
            try:
                self.refresh_registry()
            except Exception:  # a locked or broken database must not stop the adapters
                log.exception("reading the registry failed")

    def refresh_registry(self) -> bool:
        """Re-read the devices with a profile if the registry changed; True if it had."""
        fleet = self._follower.changed()
        if fleet is None:
            return False
        inventory = self._build(fleet)
        before = self._inventory
        self._topic_profiles = {}
        self._inventory = inventory  # one reference swap: the MQTT thread sees old or new
        if len(inventory.native) != len(before.native) or inventory.wanted != before.wanted:
            log.info("registry: %d devices with a profile (%s); subscriptions: %s",
                     len(inventory.native), ", ".join(sorted(
                         {r.profile.name for r in inventory.devices.values()})) or "none",
                     ", ".join(sorted(inventory.wanted)) or "none")
        return True

    def _build(self, fleet: Fleet) -> _Inventory:
        native: dict[tuple[str, str], Route] = {}
        devices: dict[str, Route] = {}
        used: dict[str, Profile] = {}
        kinds: set[str] = set()
        for d in fleet:
            if not d.device_profile or not d.native_id:
                continue
            profile = self.profiles.get(d.device_profile)
            if profile is None:
                if d.device_profile not in self._missing_profiles:
                    self._missing_profiles.add(d.device_profile)
                    log.error("device %s uses profile %r, which is not loaded (known: %s): "
                              "its messages are dead-lettered as %s", d.device_id,
                              d.device_profile, ", ".join(sorted(self.profiles)) or "none",
                              UNKNOWN_DEVICE)
                continue
            t = Topic(d.district, d.kind, d.device_id)
            route = Route(d.device_id, d.kind, d.district, profile, d.native_id, str(t),
                          str(t.with_channel("ack")), str(t.with_channel("status")))
            native[(profile.name, d.native_id)] = route
            devices[d.device_id] = route
            used[profile.name] = profile
            if _takes_commands(profile):
                kinds.add(d.kind)
        filters = tuple((sub, p) for _, p in sorted(used.items()) for sub in p.subscriptions())
        wanted = {sub for sub, _ in filters} | {topic_filter("cmd", kind=k) for k in kinds}
        return _Inventory(native, devices, filters, frozenset(wanted))

    def route(self, device_id: str) -> Route | None:
        return self._inventory.devices.get(device_id)

    # ------------------------------------------------------------------ self-report

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "dead_letters": dict(self.dead_counts),
                "unacked": len(self._waiting), "devices": len(self._inventory.devices),
                "pending_commands": len(self._commands)}

    def _reporter(self) -> None:
        clock = self._clock
        last, last_t = 0, clock.monotonic()
        while not self._stopping.wait(self.config.report_interval_s):
            now, messages = clock.monotonic(), self.counts["messages"]
            rate = (messages - last) / max(1e-9, now - last_t)
            last, last_t = messages, now
            s = self.stats()
            log.info("adapters: %.0f native messages/s; %d messages, %d readings, %d statuses, "
                     "%d commands, %d acks; dead letters: %s; %d held unacknowledged; "
                     "%d devices", rate, s.get("messages", 0), s.get("readings", 0),
                     s.get("statuses", 0), s.get("commands", 0), s.get("acks", 0),
                     ", ".join(f"{r}={n}" for r, n in sorted(s["dead_letters"].items()))
                     or "none", s["unacked"], s["devices"])

    def _serve_metrics(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = self

        class _Collector:
            def collect(self):
                s = service.stats()
                for name in ("messages", "readings", "statuses", "commands", "acks"):
                    yield CounterMetricFamily(f"citygrid_adapters_{name}",
                                              f"adapters: {name} handled", s.get(name, 0))
                dead = CounterMetricFamily("citygrid_adapters_dead_letters",
                                           "dead letters by reason", labels=["reason"])
                for reason, n in s["dead_letters"].items():
                    dead.add_metric([reason], n)
                yield dead
                yield GaugeMetricFamily("citygrid_adapters_unacked",
                                        "native messages held unacknowledged", s["unacked"])
                yield GaugeMetricFamily("citygrid_adapters_devices",
                                        "registered devices with a profile", s["devices"])

        registry = CollectorRegistry()
        registry.register(_Collector())
        self._metrics_server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)


def topic_matches(sub: str, topic: str) -> bool:
    """Whether the topic filter ``sub`` (``+``, ``#``) matches ``topic`` (MQTT's rules: a
    wildcard first level does not match a ``$`` topic; ``a/#`` matches ``a`` too)."""
    if topic.startswith("$") and sub[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    parts = sub.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)


def _takes_commands(profile: Profile) -> bool:
    spec = getattr(profile, "spec", None)
    return spec is None or getattr(spec, "command", None) is not None
