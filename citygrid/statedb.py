"""SQLite connections for the state databases under ``CITYGRID_DATA_DIR`` (WAL, durable)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path


def connect(path: str | Path) -> sqlite3.Connection:
    """Autocommit connection; a COMMIT is on disk when it returns (synchronous=FULL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def checkpoint_in_background(db: sqlite3.Connection, path: str | Path,
                             every_s: float = 2.0) -> threading.Event:
    """Take WAL checkpoints (and their fsyncs) off ``db``'s thread.

    SQLite checkpoints in whichever commit crosses 1,000 WAL pages: on a hot thread (the rule
    engine settling bills) that is a stall of up to a second now and then. Here ``db`` stops
    checkpointing itself and a daemon thread with its own connection does it every few
    seconds. Set the returned event to stop it.
    """
    db.execute("PRAGMA wal_autocheckpoint=0")
    stop = threading.Event()

    def run() -> None:
        own = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            while not stop.wait(every_s):
                with contextlib.suppress(sqlite3.Error):
                    own.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            own.close()

    threading.Thread(target=run, name=f"checkpoint-{Path(path).name}", daemon=True).start()
    return stop


def connect_readonly(path: str | Path) -> sqlite3.Connection | None:
    """A read-only connection to a state database another process owns, or None while it
    does not exist yet. Readers never create, migrate or lock a writer's file."""
    path = Path(path)
    if not path.exists():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                           timeout=30)


def read_rows(path: str | Path, sql: str, params: tuple = ()) -> list[tuple]:
    """One query over another process's state database, read-only; a database or table that
    does not exist yet (its owner has not run) reads as no rows."""
    db = connect_readonly(path)
    if db is None:
        return []
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        db.close()
