"""Per-device MQTT credentials for Mosquitto, beside the device registry.

CityGrid keeps the accounts in the registry's state database and writes two files Mosquitto
reads: a password file (hashes in mosquitto_passwd's ``$7$`` PBKDF2-SHA512 format)
and an ACL file in which, by authenticated user name, each device may publish only
to its own ``telemetry``, ``ack`` and ``status`` topics and subscribe only to its
own ``cmd`` topic; the platform services have accounts of their own; nothing is
anonymous. After each change Mosquitto is told to reload (SIGHUP).

A device registered with a device profile (``device_profile``, ``native_id``) speaks its
vendor's topics instead, and is confined the same way: it may publish only its own native
topics and subscribe only to its own native command topic, as its profile names them
(``Profile.native_topics``). The adapters' account reads every profile's native topics and
writes their command topics, and writes the contract's telemetry, ack and status.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billing import HEAD_TOPIC
from citygrid import statedb
from citygrid.contract import Topic
from citygrid.fleet import FleetDevice
from citygrid.registry import FILENAME as REGISTRY_FILE
from citygrid.registry import Registry, RegistryError
from rules import SERVICE_FILTERS

log = logging.getLogger("citygrid.gateway")
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SERVICES = {
    # account: ACL lines (topic filters are the contract's)
    # citygrid/probe/#: the start-up check of a shared-subscription group (wire.probe_shared)
    "citygrid-ingest": ["topic read city/v1/+/+/+/telemetry", "topic readwrite citygrid/probe/#"],
    "citygrid-rules": ["topic read city/v1/+/+/+/telemetry", "topic read city/v1/+/+/+/ack",
                       "topic readwrite citygrid/probe/#",
                       "topic read city/v1/+/+/+/override",
                       # what the rules may publish is theirs to say (`rules check` holds
                       # every publish action to it), and the ledger head they anchor
                       *(f"topic write {f}" for f in SERVICE_FILTERS)],
    "citygrid-gateway": ["topic read city/v1/#", "topic write city/v1/+/+/+/override"],
    # and the native topics of every profile (_adapters_native_acl), added when written
    "citygrid-adapters": ["topic write city/v1/+/+/+/telemetry",
                          "topic write city/v1/+/+/+/ack", "topic write city/v1/+/+/+/status",
                          "topic read city/v1/+/+/+/cmd"],
    # an outside party holding the ledger's head (docs/ledger-anchoring.md): that one
    # retained topic, read only
    "citygrid-auditor": [f"topic read {HEAD_TOPIC}"],
    "citygrid-simulator": ["topic write city/v1/+/+/+/telemetry",
                           "topic write city/v1/+/+/+/ack", "topic write city/v1/+/+/+/status",
                           "topic read city/v1/+/+/+/cmd"],
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    username TEXT PRIMARY KEY, hash TEXT NOT NULL, kind TEXT NOT NULL, created_ms INTEGER);
"""


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto_passwd ``$7$`` hash: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte key."""
    salt = salt if salt is not None else os.urandom(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(key).decode()}")


def check_password(password: str, stored: str) -> bool:
    _, seven, iterations, salt, _ = stored.split("$")
    return secrets.compare_digest(
        hash_password(password, salt=base64.b64decode(salt), iterations=int(iterations)),
        stored) and seven == "7"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str  # shown once, never stored

    def url(self, host: str, port: int) -> str:
        return f"mqtt://{self.username}:{self.password}@{host}:{port}"


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener: the broker's certificate and key, the CA clients are checked against."""

    port: int
    cafile: str
    certfile: str
    keyfile: str
    require_certificate: bool = False  # clients must present a certificate the CA signed

    def conf(self) -> str:
        return (f"listener {self.port}\n"
                f"cafile {self.cafile}\ncertfile {self.certfile}\nkeyfile {self.keyfile}\n"
                "tls_version tlsv1.2\n"
                f"require_certificate {str(self.require_certificate).lower()}\n")


class ProvisioningError(ValueError):
    pass


class Provisioner:
    """Per-device and per-service MQTT accounts, kept beside the registry (table
    ``credentials`` in its database), and the broker files made from both."""

    def __init__(self, data_dir: str | Path, registry: Registry | None = None, *,
                 profiles: Mapping[str, Any] | None = None,
                 profiles_dir: str | Path | None = None):
        """``profiles``: the device profiles by name (default: ``adapters.load_profiles``
        of ``profiles_dir``, the shipped ones and the operator's), for the native topics."""
        self.dir = Path(data_dir)
        self._profiles = dict(profiles) if profiles is not None else None
        self._profiles_dir = profiles_dir
        self.registry = registry if registry is not None else Registry(self.dir)
        self.db = statedb.connect(self.dir / REGISTRY_FILE)
        self.db.executescript(_SCHEMA)
        self.password_file = self.dir / "mosquitto" / "passwords"
        self.acl_file = self.dir / "mosquitto" / "acl"
        self.pid_file = self.dir / "mosquitto" / "mosquitto.pid"

    def provision(self, device: FleetDevice) -> Credentials:
        """Register a device (or re-key one) and return its MQTT credentials — once."""
        Topic(device.district, device.kind, device.device_id)  # ids must fit the contract
        if device.device_id in SERVICES:
            raise ProvisioningError(f"{device.device_id!r} is a platform account name")
        password = secrets.token_urlsafe(24)
        self.registry.upsert(device, status="provisioned")
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO credentials VALUES (?, ?, 'device', ?)",
                            (device.device_id, hash_password(password), int(time.time() * 1000)))
        self.write_broker_files()
        return Credentials(device.device_id, password)

    def revoke(self, device_id: str) -> None:
        """The device stays in the inventory as revoked; its account is gone."""
        try:
            self.registry.set_status(device_id, "revoked")
        except RegistryError as e:
            raise ProvisioningError(str(e)) from None
        with self.db:
            self.db.execute("DELETE FROM credentials WHERE username = ?", (device_id,))
        self.write_broker_files()

    def service_account(self, name: str) -> Credentials:
        """(Re)create a platform service's account; returns its credentials once."""
        if name not in SERVICES:
            raise ProvisioningError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
        password = secrets.token_urlsafe(24)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO credentials VALUES (?, ?, 'service', ?)",
                            (name, hash_password(password), int(time.time() * 1000)))
        self.write_broker_files()
        return Credentials(name, password)

    # ------------------------------------------------------------------ broker files

    def profiles(self) -> Mapping[str, Any]:
        if self._profiles is None:
            from adapters import ProfileError, load_profiles
            try:
                self._profiles = load_profiles(self._profiles_dir)
            except ProfileError as e:
                log.error("device profiles do not load; profiled devices get no native "
                          "topics in the ACL: %s", e)
                return {}
        return self._profiles

    def _native_acl(self, device_id: str, profile_name: str, native_id: str) -> list[str]:
        """A profiled device's own native topics: write what it publishes, read its commands."""
        profile = self.profiles().get(profile_name)
        if profile is None:
            return [f"# {device_id}: profile {profile_name!r} is not loaded: no topics"]
        try:
            publish, subscribe = profile.native_topics(native_id)
        except ValueError as e:
            return [f"# {device_id}: {e}".replace("\n", " ")]
        return [f"topic write {t}" for t in publish] + [f"topic read {t}" for t in subscribe]

    def _adapters_native_acl(self) -> list[str]:
        """The adapters' account: every profile's native topics (read) and command topics
        (write), as filters over all devices."""
        lines: list[str] = []
        for profile in self.profiles().values():
            lines += [f"topic read {f}" for f in profile.subscriptions()]
            lines += [f"topic write {f}" for f in _command_filters(profile)]
        return list(dict.fromkeys(lines))

    def write_broker_files(self) -> None:
        where = {r["device_id"]: (r["kind"], r["district"], r.get("device_profile"),
                                  r.get("native_id")) for r in self.registry.records()}
        rows = [(user, h, kind, *where.get(user, (None, None, None, None)))
                for user, h, kind in
                self.db.execute("SELECT username, hash, kind FROM credentials "
                                "ORDER BY username")]
        passwords = "".join(f"{user}:{h}\n" for user, h, *_ in rows)
        acl = ["# Written by CityGrid (gateway/provisioning.py): edit the registry, not this.",
               "# Devices: each may write only its own telemetry/ack/status and read only its",
               "# own cmd (a device with a profile: its own native topics), matched by",
               "# authenticated user name. Nothing is anonymous.", ""]
        for user, _, kind, dkind, district, device_profile, native_id in rows:
            acl.append(f"user {user}")
            if kind == "service":
                acl += SERVICES[user]
                if user == "citygrid-adapters":
                    acl += self._adapters_native_acl()
            elif device_profile and native_id:
                acl += self._native_acl(user, device_profile, native_id)
            else:
                own = Topic(district, dkind, user)
                acl += [f"topic write {own.with_channel(c)}" for c in ("telemetry", "ack",
                                                                        "status")]
                acl.append(f"topic read {own.with_channel('cmd')}")
            acl.append("")
        _atomic_write(self.password_file, passwords, 0o600)
        _atomic_write(self.acl_file, "\n".join(acl), 0o644)
        self.reload_broker()

    def reload_broker(self) -> bool:
        """SIGHUP the broker (its pid file) so it rereads the files; False if none runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
            return True
        except (OSError, ValueError):
            return False

    def broker_config(self, port: int = 1883, host: str = "0.0.0.0",
                      user: str | None = None, tls: TlsListener | None = None) -> Path:
        """A ready mosquitto.conf using these files; persistence on; size limits; optionally
        a TLS listener (with client certificates required, if asked).

        The broker runs as ``user`` (default: whoever runs CityGrid, who owns the files it
        must reread on SIGHUP; Mosquitto started as root would otherwise drop to `mosquitto`).
        """
        import getpass

        user = user or getpass.getuser()
        conf = self.dir / "mosquitto" / "mosquitto.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        if not self.password_file.exists():
            self.write_broker_files()
        conf.write_text(
            "# Written by `citygrid broker config`.\n"
            f"listener {port} {host}\n"
            f"user {user}\n"
            "allow_anonymous false\n"
            f"password_file {self.password_file}\n"
            f"acl_file {self.acl_file}\n"
            f"pid_file {self.pid_file}\n"
            "persistence true\n"
            f"persistence_location {conf.parent}/\n"
            "autosave_interval 10\n"  # a crash loses at most 10 s of undelivered messages
            "max_packet_size 65536\n"  # readings are small; a 64 KiB packet is an attack
            "max_queued_messages 100000\n"
            "max_inflight_messages 1000\n"
            "max_keepalive 300\n"
            + (tls.conf() if tls else ""))
        return conf

    def close(self) -> None:
        self.db.close()
        self.registry.close()


_ANY = "ZzAnyZz"  # a native id part that stands for every device's


def _command_filters(profile: Any) -> list[str]:
    """The topic filters a profile's commands go to, over every device: its command topic for
    a native id of placeholders, each level with a placeholder made ``+``."""
    template = getattr(getattr(profile, "spec", None), "native_id", "{native_id}")
    native_id = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", _ANY, template)
    try:
        _, subscribe = profile.native_topics(native_id)
    except ValueError:
        return []
    return ["/".join("+" if _ANY in level or level == "+" else level
                     for level in topic.split("/")) for topic in subscribe]


def _atomic_write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


__all__ = ["Credentials", "Provisioner", "ProvisioningError", "TlsListener", "check_password",
           "hash_password"]
