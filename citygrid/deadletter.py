"""The dead-letter store: messages and points a service could not take, with the reason.

Bounded (oldest entries trimmed), while the per-reason counts are cumulative. Ingest keeps
one in ``ingest.sqlite``, the adapters in ``adapters.sqlite``; the read functions take the
database's path and open it read-only (empty before its service has run).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from citygrid import statedb

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
"""
PAYLOAD_EXCERPT = 2048


@dataclass(frozen=True, slots=True)
class DeadLetter:
    at_ms: int
    topic: str
    reason: str
    detail: str
    payload: bytes = b""


class DeadLetterStore:
    def __init__(self, path: str | Path, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db = statedb.connect(path)
        self._db.executescript(_SCHEMA)

    def add(self, letters: Iterable[DeadLetter]) -> None:
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
                    [(d.at_ms, d.topic, d.reason, d.detail, bytes(d.payload[:PAYLOAD_EXCERPT]))
                     for d in letters],
                )
                self._db.executemany(
                    "INSERT INTO dead_letter_counts VALUES (?, ?) ON CONFLICT (reason) "
                    "DO UPDATE SET count = count + excluded.count",
                    list(counts.items()),
                )
                self._db.execute(
                    "DELETE FROM dead_letters WHERE id <= "
                    "(SELECT max(id) FROM dead_letters) - ?", (self.max_entries,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def latest(self, limit: int = 20, reason: str | None = None) -> list[DeadLetter]:
        sql = "SELECT at_ms, topic, reason, detail, payload FROM dead_letters"
        args: tuple = ()
        if reason:
            sql += " WHERE reason = ?"
            args = (reason,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [DeadLetter(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT reason, count FROM dead_letter_counts"))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_latest(path: str | Path, limit: int = 20,
                reason: str | None = None) -> list[DeadLetter]:
    """The latest dead letters in the database at ``path``, newest first."""
    sql = "SELECT at_ms, topic, reason, detail, payload FROM dead_letters"
    args: tuple = ()
    if reason:
        sql += " WHERE reason = ?"
        args = (reason,)
    rows = statedb.read_rows(path, sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
    return [DeadLetter(at, topic, r, detail, payload or b"")
            for at, topic, r, detail, payload in rows]


def read_counts(path: str | Path) -> dict[str, int]:
    """Dead letters by reason, all time, in the database at ``path``."""
    return dict(statedb.read_rows(path, "SELECT reason, count FROM dead_letter_counts"))
