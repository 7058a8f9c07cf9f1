"""IngestService without a broker or InfluxDB: a fake MQTT client, a fake store, a clock
the test turns. What is asserted is what a broker and a store would see: which points the
store holds, which message ids were acknowledged, and when."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from prometheus_client import generate_latest

from citygrid import contract
from citygrid.settings import Settings
from citygrid.store import (
    DatabaseNotFound,
    Point,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from ingest.service import IngestConfig, IngestService
from tests.helpers import meter, wait_until

T0 = 1_790_000_000_000
WAIT_S = 10.0


# --------------------------------------------------------------------------- fakes


class ManualClock:
    """Time stands still until the test advances it."""

    def __init__(self, now_ms: int = T0):
        self._lock = threading.Lock()
        self._start_ms = now_ms
        self._elapsed_s = 0.0

    def now_ms(self) -> int:
        with self._lock:
            return self._start_ms + int(self._elapsed_s * 1000)

    def monotonic(self) -> float:
        with self._lock:
            return 1000.0 + self._elapsed_s

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._elapsed_s += seconds


@dataclass
class Message:
    """A PUBLISH as the client hands it on; ``key`` is what the test expects of it:
    ``(kind, device, ts)`` stored, or ``("dead", reason)``."""

    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    key: tuple | None = None
    epoch: int = 1


class FakeClient:
    """A broker session as citygrid.wire.Client presents it, with no network.

    Like the real client's I/O thread, one loop thread runs every callback and hands over
    what has arrived since the last turn as one list, so a blocking ``on_messages`` holds
    back all later deliveries. Unlike a well-behaved broker it sends whatever is published
    without waiting for acknowledgements (as Mosquitto 2.0.11 does once acks flow), so any
    bound on what ingest holds is ingest's own.

    Each ``ack`` is checked as it arrives: the message id must be one delivered and not
    acked before, and ``before_ack(message)`` (set by the test) may name what the
    message's data should already be in; a failed check is kept in ``problems``.
    """

    def __init__(self, url=None, client_id: str = "", *, clean_start=True,
                 session_expiry_s=0, receive_maximum=None, subscriptions=(),
                 on_messages=None, on_connect=None, on_disconnect=None, **_):
        self.client_id = client_id
        self.on_messages, self.on_connect, self.on_disconnect = (on_messages, on_connect,
                                                                 on_disconnect)
        self.options = {"clean_start": clean_start, "receive_maximum": receive_maximum,
                        "session_expiry": session_expiry_s}
        self.connected_with: dict | None = None
        self.wanted = list(subscriptions)
        self.subscriptions: list[tuple[str, int]] = []
        self.subscribed = threading.Event()
        self.epoch = 1
        self.before_ack: Callable[[Message], str | None] | None = None
        self.probe: Callable[[], int] | None = None  # sampled after each delivery
        self.problems: list[str] = []
        self.acked: list[int] = []
        self.delivered = 0
        self.peak_outstanding = 0  # delivered and not acknowledged, as the broker counts
        self.peak_probe = 0
        self._messages: dict[int, Message] = {}
        self._acked: set[int] = set()
        self._lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self._mid = 0

    # --- what the service calls (citygrid.wire.Client's shape)

    def start(self):
        self.connected_with = dict(self.options)
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="fake-mqtt", daemon=True)
        self._thread.start()
        self._inbox.put(("connack", None))
        return self

    def stop(self, timeout_s: float = 5.0):
        self._running.clear()
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(WAIT_S)

    def ack(self, mids, epoch=None):
        if epoch is not None and epoch != self.epoch:
            return
        with self._lock:
            for mid in mids:
                message = self._messages.get(mid)
                if message is None:
                    self.problems.append(f"ack of mid {mid}, never delivered")
                elif mid in self._acked:
                    self.problems.append(f"mid {mid} acknowledged twice")
                else:
                    problem = self.before_ack(message) if self.before_ack else None
                    if problem:
                        self.problems.append(f"mid {mid} acknowledged before {problem}")
                    self._acked.add(mid)
                    self.acked.append(mid)

    # --- the test's side: devices publishing

    def publish(self, topic: str, payload: bytes | dict, key: tuple | None = None) -> int:
        with self._lock:
            self._mid += 1
            message = Message(topic, payload if isinstance(payload, bytes)
                              else orjson.dumps(payload), self._mid, key=key)
            message.epoch = self.epoch
            self._messages[message.mid] = message
        self._inbox.put(("publish", message))
        return message.mid

    def outstanding(self) -> int:
        with self._lock:
            return self.delivered - len(self._acked)

    def all_acked(self) -> bool:
        with self._lock:
            return len(self._acked) == len(self._messages)

    def _loop(self) -> None:
        while self._running.is_set():
            kind, item = self._inbox.get()
            if kind == "stop" or not self._running.is_set():
                return
            if kind == "connack":
                self.on_connect(False)
                self.subscriptions += self.wanted
                self.subscribed.set()
                continue
            # One "read": this message and whatever else has arrived meanwhile, as much as
            # the Receive Maximum leaves room for (a broker's first window), at least one
            # (the overshoot).
            with self._lock:
                room = (self.options["receive_maximum"] or 65535) - (self.delivered
                                                                     - len(self._acked))
            batch = [item]
            while len(batch) < min(50, room):
                try:
                    kind, more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind != "publish":
                    self._inbox.put((kind, more))
                    break
                batch.append(more)
            with self._lock:
                self.delivered += len(batch)
                self.peak_outstanding = max(self.peak_outstanding,
                                            self.delivered - len(self._acked))
            self.on_messages(batch)
            if self.probe is not None:
                self.peak_probe = max(self.peak_probe, self.probe())


class FakeStore:
    """A telemetry store in a dict. A point is there once ``write`` has returned (and not
    before); ``fail`` makes writes and ``ensure_ready`` raise; ``gate`` cleared blocks
    writes, as a store that does not answer in time."""

    def __init__(self, write_s: float = 0.0):
        self.lock = threading.Lock()
        self.stored: dict[tuple, dict] = {}
        self.writes: list[int] = []  # points per successful write
        self.fail: StoreError | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.write_s = write_s

    def ensure_ready(self) -> None:
        if self.fail is not None:
            raise self.fail

    def write(self, points) -> None:
        assert self.gate.wait(WAIT_S * 3), "the test left the store blocked"
        if self.fail is not None:
            raise self.fail
        time.sleep(self.write_s)  # a slow write: acks must still wait for it
        with self.lock:
            for p in points:
                self.stored[key_of(p)] = p.fields
            self.writes.append(len(points))

    def stored_keys(self, measurement: str | None = None) -> set[tuple]:
        with self.lock:
            return {k for k in self.stored if measurement in (None, k[0])}

    def close(self) -> None:
        pass


def key_of(p: Point) -> tuple:
    return p.measurement, p.tags.get("device_id"), p.ts_ms


def spooled_keys(data_dir: Path) -> set[tuple]:
    """What the spool holds, read as a second process would (its own connection)."""
    with sqlite3.connect(data_dir / "ingest.sqlite") as db:
        rows = db.execute("SELECT body FROM spool").fetchall()
    return {key_of(Point(*p)) for (body,) in rows for p in orjson.loads(body)}


# --------------------------------------------------------------------------- fixtures


@dataclass
class Rig:
    service: IngestService
    client: FakeClient
    store: FakeStore
    clock: ManualClock
    data_dir: Path

    def send(self, device: str, seq: int, **fields) -> int:
        ts = T0 - 60_000 + seq
        return self.client.publish(str(contract.Topic("d1", "meter", device)),
                                   meter(ts, seq, **fields), key=("meter", device, ts))

    def send_raw(self, device: str, payload: bytes | dict, reason: str) -> int:
        return self.client.publish(str(contract.Topic("d1", "meter", device)), payload,
                                   key=("dead", reason))

    def wait_acked(self, flush: bool = True) -> None:
        """Until every message is acknowledged; with ``flush`` the clock runs on meanwhile, so
        a partial batch left over (the writer takes a batch a message or two past full, as
        the loop thread races on) is flushed."""

        def acked() -> bool:
            if flush:
                self.clock.advance(1.0)
            return self.client.all_acked()

        wait_until(acked, WAIT_S, 0.02, "every message acknowledged")


@pytest.fixture
def rig(tmp_path):
    made: list[IngestService] = []

    def make(store: FakeStore | None = None, start: bool = True, **config) -> Rig:
        config = {"batch_size": 10, "flush_interval_s": 0.05, "report_interval_s": 3600.0,
                  "retry_window_s": 0.0, **config}
        clients: list[FakeClient] = []

        def factory(url, client_id, **kw):
            clients.append(FakeClient(url, client_id, **kw))
            return clients[-1]

        clock = ManualClock()
        store = store or FakeStore()
        data_dir = tmp_path / f"data{len(made)}"
        service = IngestService(Settings(data_dir=str(data_dir)), store, IngestConfig(**config),
                                client_factory=factory, clock=clock)
        made.append(service)
        rig = Rig(service, clients[0], store, clock, data_dir)
        rig.client.probe = service.unacked
        if start:
            service.start(timeout_s=WAIT_S)
        return rig

    yield make
    for service in made:
        service.stop()


def stored_before(store: FakeStore, data_dir: Path | None = None):
    """An ack check: the message's point is in the store (or the spool, or its dead letter
    is written) when its acknowledgement goes out."""

    def check(message: Message) -> str | None:
        if message.key is None or message.key[0] == "dead":
            return None
        if message.key in store.stored_keys():
            return None
        if data_dir is not None and message.key in spooled_keys(data_dir):
            return None
        return f"its point {message.key} was stored" + (" or spooled" if data_dir else "")

    return check


# --------------------------------------------------------------------------- tests


def test_a_batch_is_written_once_then_every_message_acknowledged_once(rig):
    r = rig(FakeStore(write_s=0.2), batch_size=10)
    r.client.before_ack = stored_before(r.store)
    mids = [r.send(f"m-{i}", i) for i in range(10)]
    r.wait_acked(flush=False)
    assert r.store.writes == [10]  # one write with the whole batch
    assert r.store.stored_keys() == {("meter", f"m-{i}", T0 - 60_000 + i) for i in range(10)}
    assert sorted(r.client.acked) == mids
    assert r.client.problems == []
    assert r.client.connected_with == {"clean_start": False, "receive_maximum": 10_000,
                                       "session_expiry": 3600}
    assert r.client.subscriptions == [(contract.topic_filter(), 1)]


def test_invalid_readings_are_dead_lettered_with_their_reason_and_acknowledged(rig):
    r = rig(batch_size=5)

    def dead_letter_written(message: Message) -> str | None:
        if message.key and message.key[0] == "dead" and \
                r.service.dead_letter_counts()[message.key[1]] == 0:
            return f"its dead letter ({message.key[1]})"
        return stored_before(r.store)(message)

    r.client.before_ack = dead_letter_written
    valid = [r.send("m-1", i) for i in range(5)]
    r.send_raw("m-2", b"not json", contract.NOT_JSON)
    r.send_raw("m-3", meter(T0, 1, power_w=-5), contract.OUT_OF_RANGE)
    # 20 minutes ahead of the (fake) platform clock: a device clock fault.
    r.send_raw("m-4", meter(T0 + 20 * 60_000, 1), contract.OUT_OF_RANGE)
    r.wait_acked()
    assert r.client.problems == []
    assert len(r.client.acked) == len(valid) + 3
    assert r.store.stored_keys() == {("meter", "m-1", T0 - 60_000 + i) for i in range(5)}
    assert r.service.dead_letter_counts() == {contract.NOT_JSON: 1, contract.OUT_OF_RANGE: 2}
    letters = {d.topic.split("/")[4]: d for d in r.service.dead_letters.latest(10)}
    assert letters["m-2"].payload == b"not json"
    assert "power_w" in letters["m-3"].detail
    assert "ahead of the platform's clock" in letters["m-4"].detail
    assert T0 <= letters["m-4"].at_ms <= r.clock.now_ms()  # stamped by the service's clock


def test_store_unavailable_spools_then_acks_and_drains_when_it_answers(rig):
    r = rig(batch_size=5)
    r.client.before_ack = stored_before(r.store, r.data_dir)
    first = [r.send("m-1", i) for i in range(5)]
    r.wait_acked()
    assert r.store.writes == [5]

    r.store.fail = StoreUnavailable("InfluxDB answered 503")
    second = [r.send("m-1", i) for i in range(5, 15)]
    r.wait_acked()
    assert r.client.problems == []
    assert sorted(r.client.acked) == first + second
    assert len(r.store.stored_keys()) == 5  # nothing new reached the store…
    assert spooled_keys(r.data_dir) == {("meter", "m-1", T0 - 60_000 + i) for i in range(5, 15)}
    assert r.service.store_state() == "spooling"

    r.store.fail = None  # …until it answers again
    wait_until(lambda: len(r.store.stored_keys()) == 15, WAIT_S, 0.02, "the spool drained")
    wait_until(lambda: r.service.spool.depth() == 0, WAIT_S, 0.02, "an empty spool")
    assert r.service.metrics.spool_drained == 10
    assert r.service.store_state() == "ok"
    assert sorted(r.client.acked) == first + second  # drained, not acknowledged again
    assert r.client.problems == []


def test_a_store_down_at_start_spools_from_the_first_batch(rig):
    store = FakeStore()
    store.fail = StoreUnavailable("connection refused")
    r = rig(store, batch_size=4)
    r.client.before_ack = stored_before(r.store, r.data_dir)
    mids = [r.send("m-1", i) for i in range(8)]
    r.wait_acked()
    assert sorted(r.client.acked) == mids and r.client.problems == []
    assert len(spooled_keys(r.data_dir)) == 8 and r.store.stored_keys() == set()
    store.fail = None
    wait_until(lambda: len(store.stored_keys()) == 8, WAIT_S, 0.02, "the spool drained")


def test_back_pressure_holds_no_more_than_the_receive_maximum(rig):
    store = FakeStore()
    store.gate.clear()  # the store does not answer
    r = rig(store, batch_size=5, receive_maximum=20)
    r.client.before_ack = stored_before(store)
    mids = [r.send(f"m-{i % 3}", i) for i in range(100)]
    wait_until(lambda: r.service.unacked() == 20, WAIT_S, 0.02, "a full window")
    time.sleep(0.3)  # were it unbounded, more would be taken by now
    assert r.client.delivered == 20  # the network thread is held: the rest stays queued
    assert r.client.peak_outstanding <= 20 and r.client.peak_probe <= 20
    assert r.client.acked == [] and store.stored_keys() == set()

    store.gate.set()
    r.wait_acked()
    assert sorted(r.client.acked) == mids and r.client.problems == []
    assert len(store.stored_keys()) == 100
    assert r.client.peak_probe <= 20  # what ingest held, at every delivery


def test_a_full_spool_holds_the_acks_so_the_broker_keeps_the_rest(rig):
    store = FakeStore()
    store.fail = StoreUnavailable("down")
    r = rig(store, batch_size=5, receive_maximum=10, spool_max_points=20)
    mids = [r.send("m-1", i) for i in range(100)]
    wait_until(lambda: r.service.spool.depth() >= 20, WAIT_S, 0.02, "a full spool")
    time.sleep(0.5)
    # Spooled points are acknowledged (the spool takes batches while it holds fewer than 20,
    # a batch holds at most a window); then one receive window, held unacknowledged.
    assert 20 <= len(r.client.acked) <= 20 + 10
    assert r.client.delivered <= len(r.client.acked) + 10
    store.fail = None
    r.wait_acked()
    assert sorted(r.client.acked) == mids
    wait_until(lambda: len(store.stored_keys()) == 100, WAIT_S, 0.02, "everything stored")


def test_a_partial_batch_waits_for_the_flush_interval_on_the_clock(rig):
    r = rig(batch_size=100, flush_interval_s=0.05)
    r.client.before_ack = stored_before(r.store)
    mids = [r.send("m-1", i) for i in range(3)]
    time.sleep(0.4)  # many real flush intervals: the service's clock has not moved
    assert r.store.writes == [] and r.client.acked == []
    r.clock.advance(0.05)
    r.wait_acked(flush=False)
    assert r.store.writes == [3] and sorted(r.client.acked) == mids
    assert r.client.problems == []


# --------------------------------------------------------------------------- credentials


def test_start_refuses_a_store_that_rejects_the_credentials(rig):
    store = FakeStore()
    store.fail = StoreAuthError("InfluxDB at http://db:8086 refused the credentials "
                                "(401: authorization failed)", 401)
    r = rig(store, start=False)
    started = time.monotonic()
    with pytest.raises(StoreAuthError) as e:
        r.service.start(timeout_s=WAIT_S)
    assert time.monotonic() - started < 2
    assert "CITYGRID_INFLUX_USER" in str(e.value) and "CITYGRID_INFLUX_PASSWORD" in str(e.value)
    assert "CITYGRID_INFLUX_TOKEN" in str(e.value)
    assert r.client.connected_with is None  # never went to the broker


def test_start_refuses_a_missing_database_it_cannot_create(rig):
    store = FakeStore()
    store.fail = DatabaseNotFound("InfluxDB at http://db:8086 has no database 'city'")
    r = rig(store, start=False)
    with pytest.raises(DatabaseNotFound, match="CITYGRID_INFLUX_DB"):
        r.service.start(timeout_s=WAIT_S)
    assert r.client.connected_with is None


def test_credentials_revoked_while_running_spool_and_are_reported_once(rig, caplog):
    caplog.set_level(logging.INFO, logger="citygrid.ingest")
    r = rig(batch_size=5)
    r.client.before_ack = stored_before(r.store, r.data_dir)
    [r.send("m-1", i) for i in range(5)]
    r.wait_acked()

    r.store.fail = StoreAuthError("InfluxDB at http://db:8086 refused the credentials "
                                  "(401: authorization failed)", 401)
    for i in range(5, 30):  # five batches
        r.send("m-1", i)
    r.wait_acked()
    # The drainer keeps trying the store: several refusals, one log line.
    wait_until(lambda: r.service.metrics.store_auth_failures >= 3, WAIT_S, 0.02,
               "three refused requests")
    assert r.client.problems == []
    assert len(spooled_keys(r.data_dir)) == 25  # nothing lost
    assert r.service.store_state() == "auth_failed"
    refused = [rec for rec in caplog.records if "refused the credentials" in rec.message]
    assert len(refused) == 1, [rec.message for rec in refused]  # once, not per batch
    assert refused[0].levelno == logging.ERROR
    assert "CITYGRID_INFLUX_PASSWORD" in refused[0].message
    metrics = generate_latest(r.service.metrics.registry).decode()
    assert "citygrid_ingest_store_auth_failed 1.0" in metrics
    assert "citygrid_ingest_store_auth_failures_total" in metrics
    total = next(line for line in metrics.splitlines()
                 if line.startswith("citygrid_ingest_store_auth_failures_total "))
    assert float(total.split()[1]) >= 3
    report = r.service.metrics.snapshot_points("citygrid_ingest", buffered=0)[0].fields
    assert report["store_auth_failed"] == 1 and report["store_auth_failures_total"] >= 3

    r.store.fail = None  # credentials fixed
    wait_until(lambda: len(r.store.stored_keys()) == 30, WAIT_S, 0.02, "the spool drained")
    wait_until(lambda: r.service.store_state() == "ok", WAIT_S, 0.02, "store state ok")
    assert "citygrid_ingest_store_auth_failed 0.0" in generate_latest(
        r.service.metrics.registry).decode()
    again = [rec for rec in caplog.records if "accepts ingest's credentials again" in
             rec.message]
    assert len(again) == 1
    assert len([rec for rec in caplog.records if "refused the credentials" in
                rec.message]) == 1
