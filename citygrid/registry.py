"""The device registry: the city's one inventory of streetlights and meters.

Every service may read it (the rule engine and billing for where lights stand and which
account a meter bills, the simulator for what to simulate, the gateway for its map and
device list); the gateway and `citygrid devices` write it. It lives in the state database
``registry.sqlite`` under ``CITYGRID_DATA_DIR``, table ``devices``. MQTT credentials, API
tokens and alert acknowledgements are the gateway's and live beside it in tables of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from citygrid import statedb
from citygrid.contract import Topic
from citygrid.fleet import Fleet, FleetDevice

FILENAME = "registry.sqlite"
STATUSES = ("registered", "provisioned", "revoked")
# What a device record carries (FleetDevice's fields); `status` comes on top.
FIELDS = ("device_id", "kind", "district", "lat", "lon", "rated_w", "account_id", "tariff",
          "profile", "max_power_w", "street")
EDITABLE = ("district", "lat", "lon", "rated_w", "account_id", "tariff", "profile",
            "max_power_w", "street")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, kind TEXT NOT NULL, district TEXT NOT NULL,
    lat REAL NOT NULL, lon REAL NOT NULL, rated_w REAL, account_id TEXT, tariff TEXT,
    profile TEXT, max_power_w REAL, street TEXT,
    status TEXT NOT NULL DEFAULT 'registered', created_ms INTEGER NOT NULL);
"""
_SELECT = f"SELECT {', '.join(FIELDS)}, status FROM devices"


class RegistryError(ValueError):
    """A registry change that cannot be made (no such device, a value that does not fit)."""

    def __init__(self, message: str, device_id: str | None = None):
        super().__init__(message)
        self.device_id = device_id


class Registry:
    """The inventory in ``data_dir/registry.sqlite``."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.path = self.dir / FILENAME
        self.db = statedb.connect(self.path)
        self.db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ reading

    def devices(self) -> list[tuple[str, str, str, str]]:
        """(device_id, kind, district, status) of every device, by id."""
        return self.db.execute("SELECT device_id, kind, district, status FROM devices "
                               "ORDER BY device_id").fetchall()

    def fleet(self) -> Fleet:
        """Every device that is not revoked, as the services' inventory."""
        rows = self.db.execute(f"SELECT {', '.join(FIELDS)} FROM devices "
                               "WHERE status != 'revoked'").fetchall()
        return Fleet(FleetDevice(**dict(zip(FIELDS, r, strict=True))) for r in rows)

    def records(self, *, kind: str | None = None, district: str | None = None,
                status: str | None = None) -> list[dict[str, Any]]:
        """Device records (every field and ``status``), by id, optionally filtered."""
        sql, args = _SELECT + " WHERE 1=1", []
        for column, value in (("kind", kind), ("district", district), ("status", status)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        return [_record(r) for r in self.db.execute(sql + " ORDER BY device_id", args)]

    def record(self, device_id: str) -> dict[str, Any] | None:
        row = self.db.execute(_SELECT + " WHERE device_id = ?", (device_id,)).fetchone()
        return _record(row) if row else None

    def counts(self) -> list[tuple[str, str, int]]:
        """(kind, district, devices) of the devices that are not revoked."""
        return self.db.execute("SELECT kind, district, count(*) FROM devices WHERE status != "
                               "'revoked' GROUP BY kind, district").fetchall()

    # ------------------------------------------------------------------ writing

    def upsert(self, device: FleetDevice, status: str | None = None) -> None:
        """Add a device or replace its record; ``status`` if given, else as it was."""
        self.upsert_many([device])
        if status is not None:
            self.set_status(device.device_id, status)

    def upsert_many(self, devices: Iterable[FleetDevice]) -> int:
        n = 0
        with self.db:
            for d in devices:
                self.db.execute(
                    f"INSERT INTO devices ({', '.join(FIELDS)}, created_ms) "
                    f"VALUES ({', '.join('?' * (len(FIELDS) + 1))}) "
                    "ON CONFLICT (device_id) DO UPDATE SET "
                    + ", ".join(f"{f}=excluded.{f}" for f in FIELDS[1:]),
                    (*(getattr(d, f) for f in FIELDS), int(time.time() * 1000)))
                n += 1
        return n

    def import_fleet(self, fleet: Fleet) -> int:
        """Every device of a fleet file, added or updated (idempotent)."""
        return self.upsert_many(fleet)

    def edit(self, device_id: str, **changes: Any) -> dict[str, Any]:
        """Change editable fields of a device; a new district must fit the contract."""
        record = self.record(device_id)
        if record is None:
            raise RegistryError(f"no device {device_id!r}", device_id)
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise RegistryError(f"not editable: {', '.join(sorted(unknown))}", device_id)
        if not changes:
            return record
        if "district" in changes:
            Topic(changes["district"], record["kind"], device_id)  # raises ContractError
        with self.db:
            self.db.execute("UPDATE devices SET " + ", ".join(f"{k} = ?" for k in changes)
                            + " WHERE device_id = ?", (*changes.values(), device_id))
        return self.record(device_id)  # type: ignore[return-value]

    def set_status(self, device_id: str, status: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {', '.join(STATUSES)}", device_id)
        with self.db:
            cur = self.db.execute("UPDATE devices SET status = ? WHERE device_id = ?",
                                  (status, device_id))
        if cur.rowcount == 0:
            raise RegistryError(f"no device {device_id!r}", device_id)

    def close(self) -> None:
        self.db.close()


def _record(row: tuple) -> dict[str, Any]:
    return dict(zip((*FIELDS, "status"), row, strict=True))


__all__ = ["EDITABLE", "FIELDS", "FILENAME", "STATUSES", "Registry", "RegistryError"]
