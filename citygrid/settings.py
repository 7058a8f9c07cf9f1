"""Settings (DESIGN.md §4): environment variables, read once at start-up, checked there.

Every command also takes them as flags; a flag wins over the environment.
An error names the variable and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from urllib.parse import unquote, urlsplit


class SettingsError(ValueError):
    def __init__(self, variable: str, message: str):
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True)
class MqttUrl:
    """The broker's address — or a cluster's: ``mqtt://user:pass@h1:p1,h2:p2,h3:p3`` lists its
    nodes, each tried in turn with the same TLS and credentials (``host``/``port``: the
    first)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    protocol: int = 5  # paho's numbers: 5 = MQTT 5, 4 = MQTT 3.1.1
    ca_file: str | None = None  # mqtts://: the CA that signed the broker's certificate
    cert_file: str | None = None  # client-certificate authentication (optional)
    key_file: str | None = None
    others: tuple[tuple[str, int], ...] = ()  # the cluster's other nodes, in order

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """Every node, the first first."""
        return ((self.host, self.port), *self.others)

    @classmethod
    def parse(cls, url: str, variable: str = "CITYGRID_MQTT_URL") -> MqttUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("mqtt", "mqtts"):
            raise SettingsError(variable, f"{url!r} must start with mqtt:// or mqtts://")
        default = 8883 if scheme == "mqtts" else 1883
        netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            username, password = unquote(user), (unquote(pw) if colon else None)
        nodes = []
        for n, node in enumerate(hosts.split(","), start=1):
            where = f"node {n} of {url!r}" if "," in hosts else repr(url)
            parts = urlsplit(f"{scheme}://{node}")
            if not parts.hostname:
                raise SettingsError(variable, f"{where} has no host")
            try:
                port = parts.port or default
            except ValueError:
                raise SettingsError(variable, f"{where} has an invalid port") from None
            if (parts.hostname, port) in nodes:
                raise SettingsError(variable, f"{where}: {parts.hostname}:{port} is listed "
                                              "twice")
            nodes.append((parts.hostname, port))
        (host, port), *others = nodes
        return cls(host, port, scheme == "mqtts", username, password, others=tuple(others))

    def node(self, i: int) -> MqttUrl:
        """This address with node ``i`` (of ``nodes``) as its host and port."""
        host, port = self.nodes[i % len(self.nodes)]
        return replace(self, host=host, port=port, others=())

    def __str__(self) -> str:
        auth = f"{self.username}:***@" if self.username else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{hosts}"


# CITYGRID_UNKNOWN_DEVICES: a reading from a device the registry does not know is stored
# (and the device listed as unregistered), or quarantined (dead-lettered as unknown_device).
UNKNOWN_DEVICES = ("store", "quarantine")


def _env(name: str) -> str:
    return "CITYGRID_" + name.upper()


@dataclass(frozen=True)
class Settings:
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_protocol: str = "5"  # "3.1.1" for brokers without MQTT 5 (the embedded one)
    mqtt_ca: str | None = None  # CA file for mqtts:// (default: the system's CAs)
    mqtt_cert: str | None = None  # client certificate (PEM), for brokers that require one
    mqtt_key: str | None = None
    influx_url: str = ""
    influx_db: str = "citygrid"
    influx_token: str | None = None
    influx_user: str | None = None
    influx_password: str | None = None
    data_dir: str = "./.citygrid"
    rules: str | None = None
    fleet: str | None = None
    city: str = "copenhagen"
    billing: str | None = None
    lamp_types: str | None = None  # a lamp types file replacing the embedded one (lamps.py)
    raw_retention: str = "30d"  # raw readings (InfluxDB: the default retention policy)
    rollup_retention: str = "1825d"  # hourly rollups, five years
    rollup_horizon: str = "7d"  # aggregates over longer ranges read the rollups
    # Prometheus Alertmanager (API v2): the rule engine posts its alerts there when set.
    alertmanager_url: str = ""
    # The status page's address as operators reach it: alerts link to their light there.
    status_url: str = ""
    unknown_devices: str = "store"  # readings from devices the registry lacks: UNKNOWN_DEVICES
    # The ledger's head is anchored (docs/ledger-anchoring.md) every this many entries.
    ledger_anchor_every: int = 100
    # Where payment agents call back (docs/payments.md): the gateway's callback route as the
    # agents reach it. Empty: derived from status_url (the gateway serves the status page).
    payment_callback_url: str = ""
    mqtt: MqttUrl = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mqtt_protocol not in ("5", "3.1.1"):
            raise SettingsError("CITYGRID_MQTT_PROTOCOL",
                                f"{self.mqtt_protocol!r} must be 5 or 3.1.1")
        if bool(self.mqtt_cert) != bool(self.mqtt_key):
            raise SettingsError("CITYGRID_MQTT_KEY", "CITYGRID_MQTT_CERT and _KEY go together")
        for name in ("mqtt_ca", "mqtt_cert", "mqtt_key", "lamp_types"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise SettingsError(_env(name), f"{path!r} is not a file")
        if self.lamp_types:  # refused at start-up, every error with its file:line
            from citygrid import lamps
            from citygrid.yamlconf import ConfigError

            try:
                lamps.load(self.lamp_types)
            except ConfigError as e:
                raise SettingsError("CITYGRID_LAMP_TYPES", f"not a lamp types file:\n{e}"
                                    ) from None
        object.__setattr__(self, "mqtt", replace(
            MqttUrl.parse(self.mqtt_url), protocol=5 if self.mqtt_protocol == "5" else 4,
            ca_file=self.mqtt_ca, cert_file=self.mqtt_cert, key_file=self.mqtt_key))
        if self.influx_url:
            parts = urlsplit(self.influx_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError("CITYGRID_INFLUX_URL",
                                    f"{self.influx_url!r} must be http(s)://host:port")
        for name in ("alertmanager_url", "status_url", "payment_callback_url"):
            value = getattr(self, name)
            parts = urlsplit(value)
            if value and (parts.scheme not in ("http", "https") or not parts.hostname):
                raise SettingsError(_env(name), f"{value!r} must be http(s)://host[:port]")
        from citygrid.store.lifecycle import hours

        for name in ("raw_retention", "rollup_retention", "rollup_horizon"):
            try:
                hours(getattr(self, name))
            except ValueError as e:
                raise SettingsError(_env(name), str(e)) from None
        if not self.influx_db:
            raise SettingsError("CITYGRID_INFLUX_DB", "must not be empty")
        if self.unknown_devices not in UNKNOWN_DEVICES:
            raise SettingsError("CITYGRID_UNKNOWN_DEVICES",
                                f"{self.unknown_devices!r} must be store or quarantine")
        try:  # from the environment it comes as text
            every = int(str(self.ledger_anchor_every).strip())
        except ValueError:
            every = 0
        if every < 1:
            raise SettingsError("CITYGRID_LEDGER_ANCHOR_EVERY",
                                f"{self.ledger_anchor_every!r} must be a whole number of "
                                "entries, at least 1")
        object.__setattr__(self, "ledger_anchor_every", every)
        if bool(self.influx_user) != bool(self.influx_password):
            raise SettingsError("CITYGRID_INFLUX_PASSWORD",
                                "CITYGRID_INFLUX_USER and _PASSWORD go together")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Environment first, then ``overrides`` (flags) where they are not None."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.init and _env(f.name) in environ:
                values[f.name] = environ[_env(f.name)]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The environment that gives a child process these settings."""
        return {_env(f.name): str(getattr(self, f.name)) for f in fields(self)
                if f.init and getattr(self, f.name) is not None}

    @property
    def payment_callback(self) -> str:
        """The URL payment agents call back: CITYGRID_PAYMENT_CALLBACK_URL, else the gateway's
        callback route under CITYGRID_STATUS_URL, else empty (none known)."""
        if self.payment_callback_url:
            return self.payment_callback_url
        if self.status_url:
            return self.status_url.rstrip("/") + "/api/v1/billing/payments/callback"
        return ""

    @property
    def lifecycle(self):
        """Retention and rollups (citygrid.store.lifecycle.Lifecycle)."""
        from citygrid.store.lifecycle import Lifecycle

        return Lifecycle.parse(self.raw_retention, self.rollup_retention, self.rollup_horizon)
