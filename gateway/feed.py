"""What the gateway learns from the wire, kept in memory for the API and the status page.

Each device's newest reading (asking InfluxDB for `last()` over 10,000 series takes ~0.5 s,
docs/platform-facts.md, so it is loaded from the store once and then kept fresh from the
telemetry topics), each light's newest command with its reason, and the latest commands and
settlements. A version number counts changes, so the status page's stream sends only
what changed since it last looked.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections import deque
from typing import Any, Protocol

from citygrid.contract import Topic
from citygrid.settings import Settings
from citygrid.store import StoreError
from rules import read_lights

LIGHT_FIELDS = ("brightness_pct", "power_w", "motion", "lux", "fault")
METER_FIELDS = ("power_w", "energy_kwh")


class Feed(Protocol):
    """What the API and the status page ask of the live feed (``create_app`` takes any)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def snapshot(self) -> dict[str, dict[str, Any]]: ...

    def changes(self, since: int) -> dict[str, Any]: ...

    def newest_ts(self) -> int | None: ...

    def node(self) -> str | None:
        """The broker node the live feed is connected to (host:port), None while it is not."""
        ...


class CityFeed:
    def __init__(self, settings: Settings, store: Any, kinds: dict[str, str] | None = None):
        self.settings, self.store = settings, store
        self.kinds = kinds or {}  # device_id → kind, for devices not yet heard from
        self.latest: dict[str, dict[str, Any]] = {}
        self.commanded: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.changed: dict[str, int] = {}
        self.commands: deque[dict[str, Any]] = deque(maxlen=200)
        self.settlements: deque[dict[str, Any]] = deque(maxlen=100)
        self._lock = threading.Lock()
        self._client = None
        self._started = False

    # ------------------------------------------------------------------ wire

    def start(self) -> None:
        """Subscribe and load the newest stored readings (once; later calls do nothing)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        from citygrid import mqtt

        with contextlib.suppress(OSError):
            self._client = mqtt.watch_city(self.settings.mqtt, self._on_event)
        for kind in ("streetlight", "meter"):
            with contextlib.suppress(StoreError):
                for device_id, p in self.store.latest(kind).items():
                    self._reading(device_id, p.ts_ms, p.fields)
        self._load_commanded()

    def node(self) -> str | None:
        c = self._client
        return c.node if c is not None and c.connected.is_set() else None

    def _load_commanded(self) -> None:
        """Each light's commanded level and reason as the rule engine last saved them."""
        try:
            rows = read_lights(self.settings.data_dir)
        except sqlite3.Error:
            return
        with self._lock:
            for row in rows:
                self.commanded.setdefault(row.device_id, {"v": 0, "ts": None,
                                                          "device_id": row.device_id,
                                                          "level": row.level,
                                                          "reason": row.reason})
                self.changed.setdefault(row.device_id, 1)

    def close(self) -> None:
        if self._client is not None:
            self._client.stop()

    def _on_event(self, t: Topic, readings: list | None, body: dict | None) -> None:
        if readings is not None:
            for r in readings:
                self._reading(t.device_id, r.ts, r.fields())
            return
        with self._lock:
            self.version += 1
            if t.channel == "cmd":
                cmd = {"v": self.version, "ts": body.get("ts"), "device_id": t.device_id,
                       "district": t.district, "level": body.get("brightness_pct"),
                       "reason": body.get("reason"), "hold_s": body.get("hold_s")}
                self.commands.append(cmd)
                old = self.commanded.get(t.device_id)
                if old is None or (old["ts"] or 0) <= (cmd["ts"] or 0):
                    self.commanded[t.device_id] = cmd
                    self.changed[t.device_id] = self.version
            elif t.channel == "settlement":
                self.settlements.append({"v": self.version, **body})

    def _reading(self, device_id: str, ts: int, fields: dict[str, Any]) -> None:
        with self._lock:
            old = self.latest.get(device_id)
            if old is not None and old["ts"] > ts:
                return  # an older reading arriving late changes nothing
            self.latest[device_id] = {"ts": ts, **fields}
            self.version += 1
            self.changed[device_id] = self.version

    # ------------------------------------------------------------------ views

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The newest reading of every device heard from."""
        self.start()
        with self._lock:
            return dict(self.latest)

    def _state(self, device_id: str) -> dict[str, Any]:
        reading = self.latest.get(device_id) or {}
        if "brightness_pct" not in reading and device_id not in self.commanded:
            return {"ts": reading.get("ts"), **{k: reading[k] for k in METER_FIELDS
                                               if k in reading}}
        out = {"ts": reading.get("ts"), **{k: reading[k] for k in LIGHT_FIELDS if k in reading}}
        level = reading.get("brightness_pct")
        cmd = self.commanded.get(device_id)
        if cmd is not None:
            out["commanded"], out["reason"] = cmd["level"], cmd["reason"]
            # A command as new as the last reading (the rules answer a reading with a command
            # stamped with its time) is what the light is doing now, or about to: shown at
            # once, marked pending until a reading confirms it.
            if reading.get("ts") is None or (cmd["ts"] or 0) >= reading["ts"]:
                level = cmd["level"]
                out["pending"] = cmd["level"] != reading.get("brightness_pct")
        out["level"] = level
        return out

    def changes(self, since: int) -> dict[str, Any]:
        """What changed after version ``since`` (0: everything), and the version now."""
        self.start()
        with self._lock:
            ids = [d for d, v in self.changed.items() if v > since]
            return {"version": self.version,
                    "devices": {d: self._state(d) for d in ids},
                    "commands": [c for c in self.commands if c["v"] > since][-50:],
                    "settlements": [s for s in self.settlements if s["v"] > since][-20:]}

    def newest_ts(self) -> int | None:
        with self._lock:
            return max((r["ts"] for r in self.latest.values()), default=None)
