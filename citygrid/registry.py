"""The device registry: the city's one inventory of streetlights and meters.

Every service may read it (the rule engine and billing for where lights stand and which
account a meter bills, the simulator for what to simulate, the gateway for its map and
device list); the gateway and `citygrid devices` write it. It lives in the state database
``registry.sqlite`` under ``CITYGRID_DATA_DIR``, table ``devices``. MQTT credentials, API
tokens and alert acknowledgements are the gateway's and live beside it in tables of its own.

Every write goes through :func:`citygrid.fleet.check_device` (one bad entry refuses the whole
change, naming the entry) and bumps :meth:`Registry.version`, which a running service polls
(a one-row read) to pick up an edit without a restart (docs/architecture.md, "One inventory").
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citygrid import statedb
from citygrid.contract import Topic
from citygrid.fleet import Fleet, FleetDevice, check_device

FILENAME = "registry.sqlite"
STATUSES = ("registered", "provisioned", "revoked")
# What a device record carries (FleetDevice's fields); `status` comes on top.
FIELDS = ("device_id", "kind", "district", "lat", "lon", "rated_w", "account_id", "tariff",
          "profile", "max_power_w", "street", "device_profile", "native_id", "road", "cabinet",
          "lamp_type")
EDITABLE = ("district", "lat", "lon", "rated_w", "account_id", "tariff", "profile",
            "max_power_w", "street", "device_profile", "native_id", "road", "cabinet",
            "lamp_type")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, kind TEXT NOT NULL, district TEXT NOT NULL,
    lat REAL NOT NULL, lon REAL NOT NULL, rated_w REAL, account_id TEXT, tariff TEXT,
    profile TEXT, max_power_w REAL, street TEXT,
    status TEXT NOT NULL DEFAULT 'registered', created_ms INTEGER NOT NULL,
    device_profile TEXT, native_id TEXT, road TEXT, cabinet TEXT, lamp_type TEXT);
CREATE TABLE IF NOT EXISTS registry_version (id INTEGER PRIMARY KEY CHECK (id = 1),
                                             version INTEGER NOT NULL);
INSERT OR IGNORE INTO registry_version VALUES (1, 0);
"""
# Registries from before: the columns added since.
_ADDED_COLUMNS = (("device_profile", "TEXT"), ("native_id", "TEXT"), ("road", "TEXT"),
                  ("cabinet", "TEXT"), ("lamp_type", "TEXT"))


@dataclass(frozen=True)
class Catalogue:
    """What an entry may refer to: the billing configuration's tariffs, the adapters'
    device profiles, the lamp types (citygrid/lamps.py). ``None``: not checked (a caller
    that cannot know)."""

    tariffs: Collection[str] | None = None
    profiles: Collection[str] | None = None
    lamp_types: Collection[str] | None = None

_SELECT = f"SELECT {', '.join(FIELDS)}, status FROM devices"


class RegistryError(ValueError):
    """A registry change that cannot be made (no such device, a value that does not fit)."""

    def __init__(self, message: str, device_id: str | None = None):
        super().__init__(message)
        self.device_id = device_id


class InvalidEntry(RegistryError):
    """An entry that does not pass :func:`citygrid.fleet.check_device`; says which and why."""


class Registry:
    """The inventory in ``data_dir/registry.sqlite``."""

    def __init__(self, data_dir: str | Path, catalogue: Catalogue | None = None):
        self.dir = Path(data_dir)
        self.path = self.dir / FILENAME
        self.catalogue = catalogue or Catalogue()
        self.db = statedb.connect(self.path)
        self.db.executescript(_SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(devices)")}
        with self.db:
            for column, sql_type in _ADDED_COLUMNS:
                if column not in have:
                    self.db.execute(f"ALTER TABLE devices ADD COLUMN {column} {sql_type}")

    def version(self) -> int:
        """A number that changes with every write to the inventory (any process)."""
        return self.db.execute("SELECT version FROM registry_version").fetchone()[0]

    def _bump(self) -> None:  # inside the writing transaction
        self.db.execute("UPDATE registry_version SET version = version + 1")

    def check(self, device: FleetDevice) -> list[str]:
        """What is wrong with this entry (empty: it may go in)."""
        return check_device(device, tariffs=self.catalogue.tariffs,
                            profiles=self.catalogue.profiles,
                            lamp_types=self.catalogue.lamp_types)

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
        """Add or replace many entries in one transaction; one bad entry refuses them all."""
        devices = list(devices)
        bad = [(i, d, problems) for i, d in enumerate(devices) if (problems := self.check(d))]
        if bad:
            lines = [f"entry {i + 1} ({d.device_id}): {p}" for i, d, problems in bad[:20]
                     for p in problems]
            more = f"\n… and {len(bad) - 20} more entries" if len(bad) > 20 else ""
            raise InvalidEntry("\n".join(lines) + more, bad[0][1].device_id)
        n = 0
        with self.db:
            self._bump()
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
        edited = {**record, **changes}
        edited.pop("status")
        problems = self.check(FleetDevice(**edited))
        if problems:
            raise InvalidEntry(f"{device_id}: " + "; ".join(problems), device_id)
        with self.db:
            self._bump()
            self.db.execute("UPDATE devices SET " + ", ".join(f"{k} = ?" for k in changes)
                            + " WHERE device_id = ?", (*changes.values(), device_id))
        return self.record(device_id)  # type: ignore[return-value]

    def set_status(self, device_id: str, status: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {', '.join(STATUSES)}", device_id)
        with self.db:
            self._bump()
            cur = self.db.execute("UPDATE devices SET status = ? WHERE device_id = ?",
                                  (status, device_id))
        if cur.rowcount == 0:
            raise RegistryError(f"no device {device_id!r}", device_id)

    def close(self) -> None:
        self.db.close()


class Follower:
    """A running service's view of the inventory: the registry's devices (not revoked), read
    again only when :meth:`Registry.version` moved — a one-row read, cheap enough to poll
    every second off a hot path. Without a ``registry`` the one in ``data_dir`` is opened once
    its file exists: a follower never creates it."""

    def __init__(self, data_dir: str | Path, registry: Registry | None = None):
        self.path = Path(data_dir) / FILENAME
        self.registry = registry
        self._owned = registry is None
        self._version: int | None = None

    def changed(self) -> Fleet | None:
        """The devices, if the registry changed since the last call (the first call reads
        them); else None (also while there is no registry yet)."""
        if self.registry is None:
            if not self.path.exists():
                return None
            self.registry = Registry(self.path.parent)
        version = self.registry.version()
        if version == self._version:
            return None
        self._version = version
        return self.registry.fleet()

    def close(self) -> None:
        if self._owned and self.registry is not None:
            self.registry.close()
            self.registry = None


def _record(row: tuple) -> dict[str, Any]:
    return dict(zip((*FIELDS, "status"), row, strict=True))


__all__ = ["EDITABLE", "FIELDS", "FILENAME", "STATUSES", "Catalogue", "Follower", "InvalidEntry",
           "Registry",
           "RegistryError"]
