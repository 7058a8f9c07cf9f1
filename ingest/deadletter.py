"""Ingest's dead letters (``ingest.sqlite``): the kernel's store, and its reader for the
other services."""

from __future__ import annotations

from pathlib import Path

from citygrid.deadletter import DeadLetter, DeadLetterStore, read_counts

__all__ = ["DeadLetter", "DeadLetterStore", "read_dead_letter_counts"]


def read_dead_letter_counts(data_dir: str | Path) -> dict[str, int]:
    """Dead letters by reason, all time, for other services (read-only; empty before ingest
    has run)."""
    return read_counts(Path(data_dir) / "ingest.sqlite")
