"""Operators' acknowledgements of alerts: the gateway's own table ``alert_acks`` beside the
registry (``registry.sqlite``). The alerts themselves are the rule engine's, read through
``rules.read_alerts``."""

from __future__ import annotations

import time
from pathlib import Path

from citygrid import statedb
from citygrid.registry import FILENAME as REGISTRY_FILE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_acks (key TEXT PRIMARY KEY, acked_ms INTEGER NOT NULL);
"""


class Acks:
    """The acknowledgement table in ``data_dir/registry.sqlite``."""

    def __init__(self, data_dir: str | Path):
        self.db = statedb.connect(Path(data_dir) / REGISTRY_FILE)
        self.db.executescript(_SCHEMA)

    def ack(self, key: str) -> int:
        """Acknowledge an alert now (again: the newer time); returns that time (ms)."""
        now = int(time.time() * 1000)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO alert_acks VALUES (?, ?)", (key, now))
        return now

    def acked(self) -> dict[str, int]:
        """When each acknowledged alert was acknowledged, by alert key."""
        return dict(self.db.execute("SELECT key, acked_ms FROM alert_acks"))

    def close(self) -> None:
        self.db.close()


__all__ = ["Acks"]
