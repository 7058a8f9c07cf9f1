"""MQTT → store: validate, batch, write, then acknowledge; spool or dead-letter what cannot go.

Threads:
- the MQTT client's I/O thread (citygrid.wire) hands over every PUBLISH of one socket read
  at once; they are decoded and appended to the open batch;
- the writer takes a batch when it is full or old enough, writes it (store, else
  spool), dead-letters what is invalid, and only then acknowledges its messages;
- the drainer moves spooled batches into the store once it answers again;
- the registry watcher re-reads the registry's ids when the registry changed and writes what
  was seen of unknown devices (ingest/unregistered.py) once a second.

Memory is bounded by the MQTT 5 Receive Maximum: the broker sends no more than
that many messages before we acknowledge one, so a slow store slows the broker
down instead of growing our heap.

The MQTT client comes from a factory and time from a clock (both passed in), so the
acknowledgement and back-pressure logic runs in tests without a broker. The factory is
called like ``citygrid.wire.Client`` (the default) and returns something with its
``start()``, ``stop()``, ``ack(mids, epoch)``, ``epoch`` and ``subscribed``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from citygrid import wire
from citygrid.clock import SYSTEM_CLOCK, Clock
from citygrid.contract import (
    BAD_TOPIC,
    STORE_REJECTED,
    ContractError,
    Topic,
    decode_readings,
    topic_filter,
)
from citygrid.partition import Partition
from citygrid.registry import Follower, Registry
from citygrid.settings import Settings
from citygrid.store import (
    DatabaseNotFound,
    Point,
    StoreAuthError,
    StoreRejected,
    StoreUnavailable,
    TelemetryStore,
    credential_settings,
)
from citygrid.store.lineproto import encode, series_key
from ingest.deadletter import DeadLetter, DeadLetterStore
from ingest.metrics import IngestMetrics
from ingest.spool import Spool
from ingest.unregistered import UNKNOWN_DEVICE, UnregisteredLog

log = logging.getLogger("citygrid.ingest")
SELF_MEASUREMENT = "citygrid_ingest"
ROUTE_CACHE_MAX = 200_000  # topics (devices) remembered; a city of 100,000 devices fits

ClientFactory = Callable[..., wire.Client]  # called as citygrid.wire.Client is
NOT_MINE: tuple[str, dict[str, str], str] = ("", {}, "")  # a route to another partition


@dataclass
class IngestConfig:
    client_id: str = "citygrid-ingest"
    group: str | None = None
    topic: str = field(default_factory=topic_filter)
    batch_size: int = 5000
    flush_interval_s: float = 0.2
    receive_maximum: int = 10_000
    retry_window_s: float = 3.0
    report_interval_s: float = 10.0
    spool_max_points: int = 5_000_000
    dead_letter_max: int = 10_000
    metrics_port: int | None = None
    registry_poll_s: float = 1.0  # how often the registry's version is checked
    # This worker's share of the districts (--partition i/N): it takes every reading and
    # stores its districts' (brokers without $share; citygrid/partition.py).
    partition: Partition | None = None

    @property
    def subscription(self) -> str:
        return f"$share/{self.group}/{self.topic}" if self.group else self.topic


@dataclass
class _Batch:
    points: list[Point] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    acks: list[tuple[int, int, int]] = field(default_factory=list)  # (epoch, mid, qos)
    messages: int = 0
    opened: float = 0.0  # the clock's monotonic seconds


MAINTAIN_EVERY_S = 600.0  # rollups of the embedded store, retention


class IngestService:
    """``client_factory(broker url, client id)`` makes the MQTT client (default: paho, see
    ``paho_client``); ``clock`` gives every time stamp and interval (default: the system's);
    ``registry`` is the device registry (default: the one in the data directory, opened once
    it exists). A reading from a device it does not know (or knows as revoked) is stored, or
    dead-lettered as ``unknown_device`` when ``settings.unknown_devices`` is ``quarantine``;
    either way the device is listed as unregistered (``read_unregistered``).
    """

    def __init__(self, settings: Settings, store: TelemetryStore,
                 config: IngestConfig | None = None, *, data_dir: str | Path | None = None,
                 client_factory: ClientFactory | None = None, clock: Clock | None = None,
                 registry: Registry | None = None):
        self.settings = settings
        self.store = store
        self.config = config or IngestConfig()
        self._clock = clock or SYSTEM_CLOCK
        state = Path(data_dir or settings.data_dir) / "ingest.sqlite"
        self.dead_letters = DeadLetterStore(state, self.config.dead_letter_max)
        self.spool = Spool(state)
        self.unregistered = UnregisteredLog(state)
        self._registry_watch = Follower(state.parent, registry)
        fleet = self._registry_watch.changed()
        self._known: frozenset[str] = frozenset(fleet.by_id) if fleet else frozenset()
        self._quarantine = settings.unknown_devices == "quarantine"
        self.metrics = IngestMetrics(self.config.client_id, self._clock)
        self._lock = threading.Lock()  # guards the open batch and the counters below
        self._cond = threading.Condition(self._lock)
        self._auth_lock = threading.Lock()  # one log line per change of the credentials' state
        self._batch = _Batch(opened=self._clock.monotonic())
        self._unacked = 0  # messages taken from the broker and not yet acknowledged
        self._routes: dict[str, tuple[str, dict[str, str], str]] = {}
        self._batch_size = self.config.batch_size
        self._window = self.config.receive_maximum
        self._stopping = threading.Event()
        self._store_down = threading.Event()
        self._threads: list[threading.Thread] = []
        # A persistent session (what arrives while we are away waits at the broker), and the
        # Receive Maximum as the window of messages held unacknowledged.
        self._client = (client_factory or wire.Client)(
            settings.mqtt, self.config.client_id, clean_start=False,
            session_expiry_s=wire.SESSION_EXPIRY_S, receive_maximum=self.config.receive_maximum,
            subscriptions=[(self.config.subscription, 1)], on_messages=self._on_messages,
            on_connect=self._on_connect, on_disconnect=self._on_disconnect,
            reconnect_min_s=0.1, reconnect_max_s=5.0,
            # Batches wait up to flush_interval_s anyway: reading the socket at most 50 times
            # a second costs a quiet city nothing in latency and saves a wake-up per reading.
            read_interval_s=min(0.02, self.config.flush_interval_s / 4))

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float | None = 10.0) -> None:
        """Start, and return once subscribed; ``timeout_s=None`` waits for the broker forever.

        Refuses to start (StoreAuthError, DatabaseNotFound, with the settings to check in
        the message) when the store rejects the credentials or has no database for us.
        """
        try:
            self._ensure_store()
        except BaseException:
            self._stopping.set()
            self._close_state()
            raise
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port)
        self.metrics.spool_depth = self.spool.depth()
        if self._quarantine and not self._known:
            log.warning("CITYGRID_UNKNOWN_DEVICES=quarantine and the registry has no devices: "
                        "every reading is dead-lettered as %s until devices are registered",
                        UNKNOWN_DEVICE)
        for target, name in ((self._writer, "ingest-writer"), (self._drainer, "ingest-drainer"),
                             (self._reporter, "ingest-reporter"),
                             (self._watch_registry, "ingest-registry")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._client.start()
        clock = self._clock
        deadline = None if timeout_s is None else clock.monotonic() + timeout_s
        while not self._client.subscribed.wait(5.0 if deadline is None else
                                               max(0.0, min(5.0, deadline - clock.monotonic()))):
            if deadline is not None and clock.monotonic() >= deadline:
                self.stop()
                raise TimeoutError(f"not subscribed at {self.settings.mqtt} within {timeout_s}s")
            log.warning("waiting for the broker at %s", self.settings.mqtt)
        log.info("subscribed to %s", self.config.subscription)

    def _ensure_store(self) -> None:
        """Create the database where it can be (the store's ``ensure_ready``)."""
        try:
            self.store.ensure_ready()
        except StoreAuthError as e:
            # Wrong credentials would look like an outage and spool forever: refuse.
            raise StoreAuthError(f"{e}; {credential_settings(self.settings)}",
                                 e.status, e.detail) from None
        except DatabaseNotFound as e:
            raise DatabaseNotFound(f"{e}: create it, or check CITYGRID_INFLUX_DB") from None
        except StoreUnavailable as e:
            # Start anyway: batches go to the spool until the store comes up.
            log.warning("store not ready, spooling until it is: %s", e)
            self._store_down.set()

    def stop(self) -> None:
        """Write and acknowledge what we hold, then disconnect.

        The subscription stays in the persistent session: what arrives from now on
        waits at the broker for the next start.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        self._client.stop()  # the last PUBACKs go before DISCONNECT
        self._close_state()

    def _close_state(self) -> None:
        try:
            self.unregistered.flush()
        except Exception:
            log.exception("could not write what was seen of unregistered devices")
        self.unregistered.close()
        self._registry_watch.close()
        self.dead_letters.close()
        self.spool.close()
        self.metrics.close()

    # ------------------------------------------------------------------ MQTT callbacks

    def _on_connect(self, session_present: bool) -> None:
        node = getattr(self._client, "node", str(self.settings.mqtt))
        self.metrics.connected(node, getattr(self._client, "stats", {}).get("failovers", 0))
        log.info("connected to %s (node %s) as %s (session present: %s), subscribing to %s",
                 self.settings.mqtt, node, self.config.client_id, session_present,
                 self.config.subscription)

    def _on_disconnect(self, why: str) -> None:
        if not self._stopping.is_set():
            log.warning("disconnected from broker (%s); reconnecting", why)

    def _on_messages(self, messages: list[wire.Message]) -> None:
        """Every PUBLISH of one socket read: taken a window's room at a time, decoded, then
        into the open batch at once."""
        taken = 0
        while taken < len(messages):
            with self._lock:
                room = max(1, self._window - self._unacked)
            self._take(messages[taken:taken + room])
            taken += room
            with self._lock:
                # Mosquitto 2.0.11 overshoots the Receive Maximum once acks flow (README,
                # Ingest): with a window's worth unacknowledged, hold the network thread, so
                # TCP pushes back and the broker queues the rest.
                while self._unacked >= self._window and not self._stopping.is_set():
                    self._cond.notify_all()
                    self._cond.wait(0.5)

    def _take(self, messages: list[wire.Message]) -> None:
        points: list[Point] = []
        dead: list[DeadLetter] = []
        acks = []
        now_ms = self._clock.now_ms()
        routes, known, quarantine = self._routes, self._known, self._quarantine
        for message in messages:
            topic = message.topic
            acks.append((message.epoch, message.mid, message.qos))
            try:
                kind, tags, key = routes.get(topic) or self._route(topic)
                if not kind:
                    continue  # another partition's district: acknowledged, stored there
                device_id = tags["device_id"]
                if device_id not in known:
                    self.unregistered.seen(device_id, kind, tags["district"], now_ms,
                                           message.payload)
                readings = decode_readings(kind, message.payload, topic, now_ms=now_ms)
                if device_id not in known and quarantine:
                    dead.append(DeadLetter(
                        now_ms, topic, UNKNOWN_DEVICE,
                        f"device {device_id!r} is not in the registry "
                        "(CITYGRID_UNKNOWN_DEVICES=quarantine)", message.payload))
                    continue
                points += [Point(kind, tags, r.fields(), r.ts, key) for r in readings]
            except ContractError as e:
                dead.append(DeadLetter(now_ms, topic, e.reason, e.detail, message.payload))
        with self._lock:
            self._unacked += len(messages)
            batch = self._batch
            batch.messages += len(messages)
            batch.acks += acks
            batch.points += points
            batch.dead += dead
            if len(batch.points) >= self._batch_size:
                self._cond.notify_all()

    def _route(self, topic: str) -> tuple[str, dict[str, str], str]:
        """Parse a topic once: kind, tags and the encoded series key, remembered per topic
        (``NOT_MINE`` for another partition's district)."""
        partition = self.config.partition
        try:
            t = Topic.parse(topic)
        except ContractError:
            if partition is not None and partition.index != 0:
                return NOT_MINE  # a bad topic is dead-lettered once: by partition 0
            raise
        if partition is not None and not partition.owns_topic(t.district, t.device_id):
            if len(self._routes) >= ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[topic] = NOT_MINE
            return NOT_MINE
        if t.channel != "telemetry":
            raise ContractError(BAD_TOPIC, f"ingest takes telemetry, not {t.channel}", topic)
        tags = {"device_id": t.device_id, "district": t.district}
        if len(self._routes) >= ROUTE_CACHE_MAX:
            self._routes.clear()
        route = self._routes[topic] = (t.kind, tags, series_key(t.kind, tags))
        return route

    # ------------------------------------------------------------------ writer

    def _take_batch(self) -> _Batch | None:
        clock = self._clock
        with self._cond:
            while True:
                batch = self._batch
                full = len(batch.points) >= self.config.batch_size
                due = batch.opened + self.config.flush_interval_s
                if (batch.messages or batch.points) and (full or clock.monotonic() >= due or
                                       self._stopping.is_set()):
                    self._batch = _Batch(opened=clock.monotonic())
                    return batch
                if self._stopping.is_set():
                    return None
                if not (batch.messages or batch.points):
                    batch.opened = clock.monotonic()  # the clock starts with the first message
                    self._cond.wait(self.config.flush_interval_s)
                else:
                    self._cond.wait(max(0.0, due - clock.monotonic()))

    def _writer(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            delay = 0.5
            while True:
                try:
                    written = self._write_batch(batch)
                    break
                except Exception:
                    # A connected session gets no redelivery: dropping the batch would strand
                    # its messages unacknowledged. Keep it and try again (disk full, a bug…).
                    log.exception("batch of %d messages failed; retrying in %.1fs",
                                  batch.messages, delay)
                    if self._stopping.wait(delay):
                        written = False  # unacknowledged: redelivered to the next session
                        break
                    delay = min(delay * 2, 30.0)
            # Count them out before the acks go: the broker refills the window at once.
            with self._cond:
                self._unacked -= batch.messages
                self._cond.notify_all()
            if written:
                self._acknowledge(batch)

    def _write_batch(self, batch: _Batch) -> bool:
        """Write points and dead letters durably; False if the batch could not be taken."""
        started = self._clock.monotonic()
        dead = list(batch.dead)
        if batch.points:
            try:
                if not self._store_or_spool(batch.points):
                    return False
            except StoreRejected as e:
                log.warning("store rejected %d points: %s", len(e.points), e.message)
                dead += _rejected_letters(e, self._clock.now_ms())
        self.dead_letters.add(dead)
        self.metrics.batch_written(batch.points, dead, batch.messages,
                                   self._clock.monotonic() - started,
                                   stored=not self._store_down.is_set())
        return True

    def _store_or_spool(self, points: list[Point]) -> bool:
        if not self._store_down.is_set():
            deadline = self._clock.monotonic() + self.config.retry_window_s
            delay = 0.05
            while True:
                try:
                    self.store.write(points)
                    self._store_accepted()
                    return True
                except StoreUnavailable as e:
                    if self._store_refused(e):  # retrying cannot help: spool at once
                        self._store_down.set()
                        break
                    if self._clock.monotonic() + delay > deadline or self._stopping.is_set():
                        log.warning("store unavailable, spooling from now on: %s", e)
                        self._store_down.set()
                        break
                    time.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 1.0)
        # Back-pressure: a full spool holds the acks, so the broker holds the messages.
        while self.metrics.spool_depth >= self.config.spool_max_points:
            if self._stopping.wait(0.5):
                log.warning("stopping with a full spool: %d points stay with the broker",
                            len(points))
                return False
        self.spool.append(points)
        self.metrics.spool_depth += len(points)
        return True

    def _acknowledge(self, batch: _Batch) -> None:
        # After a reconnect the broker redelivers older messages under new ids; their
        # points are already stored, and storing them again overwrites them.
        epoch = self._client.epoch
        self._client.ack([mid for message_epoch, mid, qos in batch.acks
                          if qos == 1 and message_epoch == epoch], epoch)

    # ------------------------------------------------------------------ spool drain

    def _drainer(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            entry = self.spool.oldest()
            if entry is None:
                self.metrics.spool_depth = 0
                if self._store_down.is_set() and self._store_answers():
                    self._store_down.clear()
                self._stopping.wait(0.2)
                continue
            batch_id, points = entry
            try:
                self.store.write(points)
            except StoreUnavailable as e:
                self._store_refused(e)
                self._stopping.wait(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 5.0)
                continue
            except StoreRejected as e:
                self.dead_letters.add(_rejected_letters(e, self._clock.now_ms()))
            self._store_accepted()
            self.spool.remove(batch_id)
            self.metrics.spool_depth = max(0, self.metrics.spool_depth - len(points))
            self.metrics.spool_drained += len(points)
            self._store_down.clear()
            delay = 0.2
            log.info("drained %d spooled points into the store", len(points))

    def _store_answers(self) -> bool:
        try:
            self.store.ensure_ready()
        except StoreUnavailable as e:
            self._store_refused(e)
            return False
        self._store_accepted()
        return True

    # ------------------------------------------------------------------ the store's state

    def _store_refused(self, e: StoreUnavailable) -> bool:
        """Note a failed store request; True if it refused our credentials.

        Credentials revoked while running: nothing is lost (the batches spool), but an
        operator must act, so it is said once (a log line per change of state, not per
        batch) and shown in the metrics and the self-report until the store takes them.
        """
        if not isinstance(e, StoreAuthError):
            return False
        self.metrics.auth_failure()
        with self._auth_lock:
            if self.metrics.store_auth_failed:
                return True
            self.metrics.store_auth_failed = True
        log.error("%s; %s. Readings are spooled until it accepts them.", e,
                  credential_settings(self.settings))
        return True

    def _store_accepted(self) -> None:
        if not self.metrics.store_auth_failed:
            return
        with self._auth_lock:
            if not self.metrics.store_auth_failed:
                return
            self.metrics.store_auth_failed = False
        log.info("the store accepts ingest's credentials again; the spool drains into it")

    def store_state(self) -> str:
        """``ok``; ``spooling`` (the store does not answer); ``auth_failed`` (it refuses our
        credentials: spooling too, until someone fixes them)."""
        if self.metrics.store_auth_failed:
            return "auth_failed"
        return "spooling" if self._store_down.is_set() else "ok"

    # ------------------------------------------------------------------ the registry

    def _watch_registry(self) -> None:
        """Off the hot path: new ids when the registry changed, the unknown devices' counts
        written once a poll."""
        while not self._stopping.wait(self.config.registry_poll_s):
            try:
                self.refresh_registry()
                self.unregistered.flush()
            except Exception:  # a locked or broken database must not stop ingest
                log.exception("reading the registry or writing unregistered devices failed")

    def refresh_registry(self) -> bool:
        """Re-read the registry's ids if it changed; True if it had. Devices it knows now
        drop off the unregistered list."""
        fleet = self._registry_watch.changed()
        if fleet is None:
            return False
        ids = frozenset(fleet.by_id)
        added, before = ids - self._known, len(self._known)
        self._known = ids  # one reference swap: the network thread sees old or new, whole
        if added:
            self.unregistered.forget(added)
        if added or len(ids) != before:
            log.info("registry: %d devices known (%d new)", len(ids), len(added))
        return True

    def is_known(self, device_id: str) -> bool:
        """Whether the registry (as ingest last read it) has the device, not revoked."""
        return device_id in self._known

    # ------------------------------------------------------------------ self-report

    def _reporter(self) -> None:
        clock = self._clock
        next_maintenance = clock.monotonic() + 5
        while not self._stopping.wait(self.config.report_interval_s):
            self.report()
            if clock.monotonic() >= next_maintenance:
                self._maintain()
                next_maintenance = clock.monotonic() + MAINTAIN_EVERY_S

    def _maintain(self) -> None:
        """The embedded store's rollups and retention (InfluxDB does its own, in CQs)."""
        maintain = getattr(self.store, "maintain", None)
        if maintain is None:
            return
        try:
            done = maintain()
        except Exception as e:  # the store being down is the writer's business, not ours
            log.warning("store maintenance failed: %s", e)
            return
        if any(done.values()):
            log.info("store maintenance: %s", ", ".join(f"{k} {v}" for k, v in done.items()))

    def report(self) -> None:
        """Put this worker's figures into the open batch, measurement ``citygrid_ingest``."""
        points = self.metrics.snapshot_points(SELF_MEASUREMENT, buffered=self.unacked())
        with self._cond:
            self._batch.points.extend(points)

    def unacked(self) -> int:
        """Messages taken and not yet acknowledged: never more than the Receive Maximum
        (beyond it, what one socket read brought waits to be taken, at most 1 MiB)."""
        with self._cond:
            return self._unacked

    def dead_letter_counts(self) -> Counter:
        return Counter(self.dead_letters.counts())


def _rejected_letters(e: StoreRejected, now: int) -> list[DeadLetter]:
    """Dead letters for the points the store refused, with its message and the line."""
    return [DeadLetter(now, f"{p.measurement}/{p.tags.get('device_id', '')}", STORE_REJECTED,
                       e.message, encode(p).encode()) for p in e.points]
