"""The on-disk spool: batches taken from MQTT while the store could not write them.

A batch is acknowledged to the broker once it is here; it leaves only after the
store has it. Several workers may share one spool: rewriting a point is harmless.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import orjson

from citygrid import statedb
from citygrid.store import Point

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    points  INTEGER NOT NULL,
    body    BLOB NOT NULL
);
"""


class Spool:
    def __init__(self, path: str | Path):
        self._lock = threading.Lock()
        self._db = statedb.connect(path)
        self._db.executescript(_SCHEMA)

    def append(self, points: Sequence[Point]) -> None:
        body = orjson.dumps([tuple(p) for p in points])
        with self._lock:
            self._db.execute("INSERT INTO spool (points, body) VALUES (?, ?)", (len(points), body))

    def oldest(self) -> tuple[int, list[Point]] | None:
        with self._lock:
            row = self._db.execute("SELECT id, body FROM spool ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return row[0], [Point(*p) for p in orjson.loads(row[1])]

    def remove(self, batch_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM spool WHERE id = ?", (batch_id,))

    def depth(self) -> int:
        """Points waiting in the spool."""
        with self._lock:
            return self._db.execute("SELECT coalesce(sum(points), 0) FROM spool").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
