"""Devices on the wire that the registry does not know: what ingest saw of them, and the
registry's ids as ingest knows them.

``CITYGRID_UNKNOWN_DEVICES=store`` (the default) stores their readings as any others;
``quarantine`` dead-letters them with reason ``unknown_device`` (acknowledged: nothing is
lost, it is all in the dead-letter store). Either way each unknown device is tracked per
(kind, district, device id): first and last seen, how many messages, the latest payload.

The hot path only counts in memory (``UnregisteredLog.seen``: a dict update); a background
thread of the service writes what was counted to ``ingest.sqlite`` (table ``unregistered``)
once a second, in one transaction, and re-reads the registry's ids when it changed.

An empty registry is a city without an inventory yet (a demo, a test): every device is
unknown. ``store`` then stores everything and lists every device as unregistered;
``quarantine`` quarantines everything, which is what it says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from citygrid import statedb
from citygrid.contract import UNKNOWN_DEVICE  # noqa: F401 (the reason, re-exported)
from citygrid.registry import FILENAME as REGISTRY_FILE
from citygrid.registry import Registry

log = logging.getLogger("citygrid.ingest")

SAMPLE_BYTES = 4096  # the sample payload kept per device
MAX_DEVICES = 100_000  # rows kept; the least recently seen go first

_SCHEMA = """
CREATE TABLE IF NOT EXISTS unregistered (
    device_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    district   TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    sample     BLOB NOT NULL,
    PRIMARY KEY (device_id, kind, district)
);
"""
_COLUMNS = ("device_id", "kind", "district", "first_seen", "last_seen", "count", "sample")


class UnregisteredLog:
    """What ingest saw of unknown devices: counted in memory, flushed to ``ingest.sqlite``."""

    def __init__(self, path: str | Path, max_devices: int = MAX_DEVICES):
        self.max_devices = max_devices
        self._lock = threading.Lock()  # the pending counts (network thread vs the flusher)
        self._db_lock = threading.Lock()
        # (device_id, kind, district) → [first_seen, last_seen, count, latest payload]
        self._pending: dict[tuple[str, str, str], list] = {}
        self._db = statedb.connect(path)
        # A crash may lose the last second of these counts; they are observations, not data.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def seen(self, device_id: str, kind: str, district: str, now_ms: int,
             payload: bytes) -> None:
        """One message from an unknown device (the hot path: memory only)."""
        key = (device_id, kind, district)
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                self._pending[key] = [now_ms, now_ms, 1, payload]
            else:
                entry[1] = now_ms
                entry[2] += 1
                entry[3] = payload

    def flush(self) -> int:
        """Write what was counted since the last flush, in one transaction; the rows
        written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        rows = [(*key, first, last, count, bytes(payload[:SAMPLE_BYTES]))
                for key, (first, last, count, payload) in pending.items()]
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO unregistered VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (device_id, kind, district) DO UPDATE SET "
                    "first_seen = min(first_seen, excluded.first_seen), "
                    "last_seen = max(last_seen, excluded.last_seen), "
                    "count = count + excluded.count, sample = excluded.sample", rows)
                (n,) = self._db.execute("SELECT count(*) FROM unregistered").fetchone()
                if n > self.max_devices:
                    self._db.execute(
                        "DELETE FROM unregistered WHERE rowid IN (SELECT rowid FROM "
                        "unregistered ORDER BY last_seen LIMIT ?)", (n - self.max_devices,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def forget(self, known: Iterable[str] | set[str] | frozenset[str]) -> int:
        """Drop the devices the registry now knows (counted or written); the rows removed."""
        known = known if isinstance(known, set | frozenset) else set(known)
        with self._lock:
            for key in [k for k in self._pending if k[0] in known]:
                del self._pending[key]
        with self._db_lock:
            ids = [i for (i,) in self._db.execute("SELECT DISTINCT device_id FROM unregistered")
                   if i in known]
            if ids:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("DELETE FROM unregistered WHERE device_id = ?",
                                         [(i,) for i in ids])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        return len(ids)

    def close(self) -> None:
        with self._db_lock:
            self._db.close()


def read_unregistered(data_dir: str | Path, *, registry: Registry | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
    """The devices ingest saw that the registry does not know (revoked ones included), most
    recently seen first: ``device_id, kind, district, first_seen, last_seen`` (epoch ms),
    ``count`` (messages) and ``sample`` (the latest payload, at most 4 KiB, as text).

    For other services: read-only, empty before ingest has run. Devices registered since
    ingest saw them are left out (``registry``: the caller's, else the one in ``data_dir``).
    """
    data_dir = Path(data_dir)
    sql = f"SELECT {', '.join(_COLUMNS)} FROM unregistered ORDER BY last_seen DESC, device_id"
    rows = statedb.read_rows(data_dir / "ingest.sqlite", sql)
    if not rows:
        return []
    known = _registered_ids(data_dir, registry)
    out = []
    for row in rows:
        if row[0] in known:
            continue
        item = dict(zip(_COLUMNS, row, strict=True))
        sample = item["sample"]
        item["sample"] = (bytes(sample).decode("utf-8", "replace") if isinstance(
            sample, bytes | memoryview) else str(sample))
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def _registered_ids(data_dir: Path, registry: Registry | None) -> set[str]:
    if registry is None:
        if not (data_dir / REGISTRY_FILE).exists():
            return set()
        registry = Registry(data_dir)
        try:
            return {d for d, _, _, status in registry.devices() if status != "revoked"}
        finally:
            registry.close()
    return {d for d, _, _, status in registry.devices() if status != "revoked"}


__all__ = ["MAX_DEVICES", "SAMPLE_BYTES", "UNKNOWN_DEVICE", "UnregisteredLog",
           "read_unregistered"]
