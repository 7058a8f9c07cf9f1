"""The adapters' state, ``adapters.sqlite`` under the data directory: the dead letters
(native messages and commands the service could not map, with the reason) and the filters its
persistent session has subscribed.

The kernel's dead-letter store (``citygrid.deadletter``, as ingest's): a bounded table of the
latest letters (oldest trimmed) with a payload sample, and cumulative counts per reason. The
service writes them off its network thread, in batches, and
acknowledges a message only once its letter is on disk: nothing it takes is dropped silently.
"""

from __future__ import annotations

from pathlib import Path

from citygrid.contract import UNKNOWN_DEVICE  # noqa: F401 (the reason, re-exported)
from citygrid.deadletter import DeadLetter, read_counts, read_latest
from citygrid.deadletter import DeadLetterStore as _Store

FILENAME = "adapters.sqlite"

# Reasons of the service's own (a profile's DecodeError brings its own: not_json,
# missing_field, bad_unit, bad_payload, no_mapping, …).
NO_PROFILE = "no_profile"  # a registered device's profile is not loaded
BAD_COMMAND = "bad_command"  # a contract command that does not validate or encode
BAD_ACK = "bad_ack"  # what the profile made of the device's answer is not a contract ack
PUBLISH_REFUSED = "publish_refused"  # the broker refused a contract (or native command) publish

_SUBSCRIPTIONS = "CREATE TABLE IF NOT EXISTS subscriptions (filter TEXT PRIMARY KEY);"


class DeadLetterStore(_Store):
    """The kernel's dead-letter store (the writer: the adapters service), with the filters its
    persistent session has subscribed beside it."""

    def __init__(self, path: str | Path, max_entries: int = 10_000):
        super().__init__(path, max_entries)
        self._db.execute(_SUBSCRIPTIONS)

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


def read_dead_letters(data_dir: str | Path, limit: int = 20,
                      reason: str | None = None) -> list[DeadLetter]:
    """The latest dead letters, newest first (read-only; empty before the service has run)."""
    return read_latest(Path(data_dir) / FILENAME, limit, reason)


def read_dead_letter_counts(data_dir: str | Path) -> dict[str, int]:
    """Dead letters by reason, all time (read-only; empty before the service has run)."""
    return read_counts(Path(data_dir) / FILENAME)
