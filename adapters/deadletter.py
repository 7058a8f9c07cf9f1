"""The adapters' state, ``adapters.sqlite`` under the data directory: the dead letters
(native messages and commands the service could not map, with the reason) and the filters its
persistent session has subscribed.

The same design as ingest's dead-letter store (ingest may not be imported from here): a
bounded table of the latest letters (oldest trimmed) with a payload sample, and cumulative
counts per reason. The service writes them off its network thread, in batches, and
acknowledges a message only once its letter is on disk: nothing it takes is dropped silently.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from citygrid import statedb

FILENAME = "adapters.sqlite"
PAYLOAD_SAMPLE = 2048

# Reasons of the service's own (a profile's DecodeError brings its own: not_json,
# missing_field, bad_unit, bad_payload, no_mapping, …).
UNKNOWN_DEVICE = "unknown_device"  # a native id no registered device has
NO_PROFILE = "no_profile"  # a registered device's profile is not loaded
BAD_COMMAND = "bad_command"  # a contract command that does not validate or encode
BAD_ACK = "bad_ack"  # what the profile made of the device's answer is not a contract ack

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms    INTEGER NOT NULL,
    topic    TEXT NOT NULL,
    reason   TEXT NOT NULL,
    detail   TEXT NOT NULL,
    payload  BLOB
);
CREATE TABLE IF NOT EXISTS dead_letter_counts (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    filter TEXT PRIMARY KEY
);
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    at_ms: int
    topic: str
    reason: str
    detail: str
    payload: bytes = b""


class DeadLetterStore:
    """The writer (the adapters service)."""

    def __init__(self, path: str | Path, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db = statedb.connect(path)
        self._db.executescript(_SCHEMA)

    def add(self, letters: Iterable[DeadLetter]) -> None:
        """Write letters in one transaction: on disk when it returns."""
        letters = list(letters)
        if not letters:
            return
        counts: dict[str, int] = {}
        for letter in letters:
            counts[letter.reason] = counts.get(letter.reason, 0) + 1
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO dead_letters (at_ms, topic, reason, detail, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(d.at_ms, d.topic, d.reason, d.detail, bytes(d.payload[:PAYLOAD_SAMPLE]))
                     for d in letters])
                self._db.executemany(
                    "INSERT INTO dead_letter_counts VALUES (?, ?) ON CONFLICT (reason) "
                    "DO UPDATE SET count = count + excluded.count", list(counts.items()))
                self._db.execute(
                    "DELETE FROM dead_letters WHERE id <= "
                    "(SELECT max(id) FROM dead_letters) - ?", (self.max_entries,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def subscriptions(self) -> set[str]:
        """The filters the service's persistent session had subscribed when it last ran."""
        with self._lock:
            return {f for (f,) in self._db.execute("SELECT filter FROM subscriptions")}

    def set_subscriptions(self, filters: set[str] | frozenset[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM subscriptions")
                self._db.executemany("INSERT INTO subscriptions VALUES (?)",
                                     [(f,) for f in sorted(filters)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_dead_letters(data_dir: str | Path, limit: int = 20,
                      reason: str | None = None) -> list[DeadLetter]:
    """The latest dead letters, newest first (read-only; empty before the service has run)."""
    sql = "SELECT at_ms, topic, reason, detail, payload FROM dead_letters"
    args: tuple = ()
    if reason:
        sql += " WHERE reason = ?"
        args = (reason,)
    rows = statedb.read_rows(Path(data_dir) / FILENAME, sql + " ORDER BY id DESC LIMIT ?",
                             (*args, limit))
    return [DeadLetter(at, topic, r, detail, payload or b"")
            for at, topic, r, detail, payload in rows]


def read_dead_letter_counts(data_dir: str | Path) -> dict[str, int]:
    """Dead letters by reason, all time (read-only; empty before the service has run)."""
    return dict(statedb.read_rows(Path(data_dir) / FILENAME,
                                  "SELECT reason, count FROM dead_letter_counts"))
