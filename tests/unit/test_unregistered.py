"""Unregistered devices in ingest, without a broker: the fake client, store and clock of
test_ingest_service drive IngestService against a real registry and state database.

What is asserted: unknown devices are counted in memory and written in one go (not per
message), with first/last seen, count and the latest payload; in quarantine their readings
are dead letters (``unknown_device``), acknowledged and not stored; a device registered while
ingest runs stops being unknown within a poll and leaves the list."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from citygrid import contract
from citygrid.fleet import FleetDevice
from citygrid.registry import Follower, Registry
from citygrid.settings import Settings, SettingsError
from ingest import UNKNOWN_DEVICE, read_unregistered
from ingest.service import IngestConfig, IngestService
from ingest.unregistered import SAMPLE_BYTES, UnregisteredLog
from tests.helpers import meter, wait_until
from tests.unit.test_ingest_service import T0, WAIT_S, FakeClient, FakeStore, ManualClock


class Rig:
    def __init__(self, data_dir: Path, mode: str = "store", **config):
        config = {"batch_size": 10, "flush_interval_s": 0.05, "report_interval_s": 3600.0,
                  "retry_window_s": 0.0, "registry_poll_s": 3600.0, **config}
        self.data_dir = data_dir
        self.clock = ManualClock()
        self.store = FakeStore()
        clients: list[FakeClient] = []

        def factory(url, client_id, **kw):
            clients.append(FakeClient(url, client_id, **kw))
            return clients[-1]

        self.service = IngestService(
            Settings(data_dir=str(data_dir), unknown_devices=mode), self.store,
            IngestConfig(**config), client_factory=factory, clock=self.clock)
        self.client = clients[0]
        self.service.start(timeout_s=WAIT_S)

    def send(self, device: str, seq: int, payload: bytes | None = None,
             district: str = "d1") -> int:
        body = payload if payload is not None else meter(T0 - 60_000 + seq, seq)
        return self.client.publish(str(contract.Topic(district, "meter", device)), body)

    def delivered(self, n: int) -> None:
        """Until ``n`` messages have reached the service (the fake delivers on its thread)."""
        wait_until(lambda: self.client.delivered >= n, WAIT_S, 0.01, f"{n} delivered")

    def wait_acked(self) -> None:
        def acked() -> bool:
            self.clock.advance(1.0)
            return self.client.all_acked()

        wait_until(acked, WAIT_S, 0.02, "every message acknowledged")

    def stored_devices(self) -> set[str]:
        return {device for _, device, _ in self.store.stored_keys()}

    def table(self) -> list[tuple]:
        """The unregistered table as another process reads it (its own connection)."""
        with sqlite3.connect(self.data_dir / "ingest.sqlite") as db:
            return db.execute("SELECT device_id, kind, district, count FROM unregistered "
                              "ORDER BY device_id, district").fetchall()


@pytest.fixture
def rig(tmp_path):
    made: list[Rig] = []

    def make(mode: str = "store", devices: tuple[str, ...] = (), **config) -> Rig:
        data_dir = tmp_path / f"data{len(made)}"
        if devices:
            registry = Registry(data_dir)
            for d in devices:
                registry.upsert(FleetDevice(d, "meter", "d1", 55.68, 12.57,
                                            account_id=f"acct-{d}", tariff="flat"))
            registry.close()
        made.append(Rig(data_dir, mode, **config))
        return made[-1]

    yield make
    for r in made:
        r.service.stop()


def register(data_dir: Path, device_id: str, status: str = "registered") -> None:
    registry = Registry(data_dir)
    try:
        registry.upsert(FleetDevice(device_id, "meter", "d1", 55.68, 12.57,
                                    account_id=f"acct-{device_id}", tariff="flat"), status=status)
    finally:
        registry.close()


# --------------------------------------------------------------------------- aggregation


def test_unknown_devices_are_counted_in_memory_and_written_in_one_go(rig):
    r = rig(devices=("m-known",))
    r.send("m-known", 1)
    r.send("m-new", 1)
    r.delivered(2)
    r.clock.advance(5.0)
    r.send("m-new", 2)
    r.delivered(3)
    r.clock.advance(1.0)
    r.send("m-new", 3, district="d2")  # another district: a row of its own
    r.wait_acked()
    assert r.stored_devices() == {"m-known", "m-new"}  # store mode: stored as today
    assert r.table() == []  # nothing written per message…
    assert r.service.unregistered.flush() == 2  # …but once, for the lot
    assert r.table() == [("m-new", "meter", "d1", 2), ("m-new", "meter", "d2", 1)]

    listed = read_unregistered(r.data_dir)
    assert [(d["device_id"], d["district"], d["count"]) for d in listed] == [
        ("m-new", "d2", 1), ("m-new", "d1", 2)]  # most recently seen first
    d1 = listed[1]
    assert d1["first_seen"] == T0 and d1["last_seen"] == T0 + 5000  # ingest's clock
    assert orjson.loads(d1["sample"])["seq"] == 2  # the latest payload, as text
    assert set(d1) == {"device_id", "kind", "district", "first_seen", "last_seen", "count",
                       "sample"}

    r.send("m-new", 4)  # a second flush adds to the row
    r.wait_acked()
    r.service.unregistered.flush()
    assert ("m-new", "meter", "d1", 3) in r.table()
    row = next(d for d in read_unregistered(r.data_dir) if d["district"] == "d1")
    assert row["first_seen"] == T0 and row["last_seen"] > T0 + 5000


def test_the_sample_is_truncated_and_rows_are_bounded(tmp_path):
    log = UnregisteredLog(tmp_path / "ingest.sqlite", max_devices=3)
    log.seen("big", "meter", "d1", 1, b"x" * (SAMPLE_BYTES * 3))
    for i in range(5):
        log.seen(f"m-{i}", "meter", "d1", 10 + i, b"{}")
    assert log.flush() == 6
    assert log.flush() == 0  # nothing new, nothing written
    rows = read_unregistered(tmp_path)
    assert [d["device_id"] for d in rows] == ["m-4", "m-3", "m-2"]  # least recently seen go
    log.seen("big", "meter", "d1", 99, b"y" * (SAMPLE_BYTES + 10))
    log.flush()
    assert len(read_unregistered(tmp_path, limit=1)[0]["sample"]) == SAMPLE_BYTES
    log.close()


def test_read_unregistered_before_ingest_ran_is_empty(tmp_path):
    assert read_unregistered(tmp_path / "nothing-here") == []
    assert not (tmp_path / "nothing-here").exists()


def test_an_empty_registry_in_store_mode_lists_every_device_and_stores_everything(rig):
    r = rig()
    for i in range(3):
        r.send(f"m-{i}", i)
    r.wait_acked()
    r.service.unregistered.flush()
    assert r.stored_devices() == {"m-0", "m-1", "m-2"}
    assert [d for d, *_ in r.table()] == ["m-0", "m-1", "m-2"]
    assert r.service.dead_letter_counts() == {}
    # ingest never creates the registry: it reads it once someone has written one
    assert not (r.data_dir / "registry.sqlite").exists()


# --------------------------------------------------------------------------- quarantine


def test_quarantine_dead_letters_unknown_devices_acknowledged_and_not_stored(rig):
    r = rig("quarantine", devices=("m-known",))
    mids = [r.send("m-known", 1), r.send("m-stray", 1), r.send("m-stray", 2),
            r.send("m-stray", 3, payload=b"not json")]
    r.wait_acked()
    assert sorted(r.client.acked) == mids and r.client.problems == []
    assert r.stored_devices() == {"m-known"}
    # A payload that breaks the contract keeps its own reason; a good one is unknown_device.
    assert r.service.dead_letter_counts() == {UNKNOWN_DEVICE: 2, contract.NOT_JSON: 1}
    letter = r.service.dead_letters.latest(1, UNKNOWN_DEVICE)[0]
    assert letter.topic == str(contract.Topic("d1", "meter", "m-stray"))
    assert "m-stray" in letter.detail and orjson.loads(letter.payload)["seq"] == 2
    r.service.unregistered.flush()
    assert r.table() == [("m-stray", "meter", "d1", 3)]  # listed, to be registered


def test_quarantine_with_an_empty_registry_quarantines_everything(rig):
    r = rig("quarantine")
    r.send("m-1", 1)
    r.wait_acked()
    assert r.store.stored_keys() == set()
    assert r.service.dead_letter_counts() == {UNKNOWN_DEVICE: 1}


def test_a_revoked_device_is_unknown(rig, tmp_path):
    r = rig("quarantine", devices=("m-known", "m-old"))
    register(r.data_dir, "m-old", status="revoked")
    r.service.refresh_registry()
    r.send("m-old", 1)
    r.wait_acked()
    assert r.service.dead_letter_counts() == {UNKNOWN_DEVICE: 1}
    r.service.unregistered.flush()
    assert [d["device_id"] for d in read_unregistered(r.data_dir)] == ["m-old"]


# --------------------------------------------------------------------------- the live registry


def test_a_device_registered_while_ingest_runs_is_known_within_a_poll(rig):
    r = rig("quarantine", devices=("m-known",), registry_poll_s=0.05)
    r.send("m-stray", 1)
    r.wait_acked()
    wait_until(lambda: r.table() == [("m-stray", "meter", "d1", 1)], WAIT_S, 0.02,
               "the watcher wrote what it saw")
    assert r.service.dead_letter_counts() == {UNKNOWN_DEVICE: 1}

    register(r.data_dir, "m-stray")
    wait_until(lambda: r.service.is_known("m-stray"), WAIT_S, 0.02, "ingest re-read the registry")
    # Cleared on refresh, not only hidden at read time (the watcher clears it just after it
    # takes the new ids: on a loaded machine a moment later).
    wait_until(lambda: r.table() == [], WAIT_S, 0.02, "the refresh cleared the table")
    assert read_unregistered(r.data_dir) == []
    r.send("m-stray", 2)
    r.wait_acked()
    assert r.stored_devices() == {"m-stray"}  # its next reading is stored
    assert r.service.dead_letter_counts() == {UNKNOWN_DEVICE: 1}
    r.service.unregistered.flush()
    assert r.table() == []


def test_read_unregistered_leaves_out_devices_registered_since(rig):
    r = rig()
    r.send("m-1", 1)
    r.send("m-2", 1)
    r.wait_acked()
    r.service.unregistered.flush()
    register(r.data_dir, "m-1")  # ingest has not looked yet (poll: an hour)
    assert [d["device_id"] for d in read_unregistered(r.data_dir)] == ["m-2"]


def test_the_registry_watch_reads_ids_only_when_the_registry_changed(tmp_path):
    watch = Follower(tmp_path)
    assert watch.changed() is None  # no registry yet: nothing to read, nothing created
    assert not (tmp_path / "registry.sqlite").exists()
    register(tmp_path, "m-1")
    assert set(watch.changed().by_id) == {"m-1"}
    assert watch.changed() is None  # unchanged: no re-read
    register(tmp_path, "m-2")
    register(tmp_path, "m-1", status="revoked")
    assert set(watch.changed().by_id) == {"m-2"}
    watch.close()


# --------------------------------------------------------------------------- the setting


def test_the_setting_is_checked_and_named():
    assert Settings.from_env({}).unknown_devices == "store"
    assert Settings.from_env({"CITYGRID_UNKNOWN_DEVICES": "quarantine"}).unknown_devices == \
        "quarantine"
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"CITYGRID_UNKNOWN_DEVICES": "drop"})
    assert e.value.variable == "CITYGRID_UNKNOWN_DEVICES"
    assert "store or quarantine" in str(e.value)


def test_the_ingest_command_takes_the_setting_as_a_flag():
    from cityctl.cli import build_parser
    from ingest.cli import _settings

    args = build_parser().parse_args(["ingest", "--unknown-devices", "quarantine"])
    assert _settings(args).unknown_devices == "quarantine"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "--unknown-devices", "drop"])
