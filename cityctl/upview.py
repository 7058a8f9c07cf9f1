"""What `citygrid up` shows while it runs: the city as seen on the wire and in the state files.

`CityWatch` listens to the broker like any other client (MQTT 3.1.1, QoS 0, it is only a
view) and reads the state databases the services write: the rule engine's alerts, the
ingest dead-letter counts. `render` draws it with rich; `line` is the one-line form for
logs and pipes.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import Counter, deque
from datetime import datetime
from pathlib import Path
from typing import Any

from cityctl.supervisor import Supervisor
from citygrid.contract import Topic
from citygrid.settings import Settings
from ingest import read_dead_letter_counts
from rules import read_alerts


def level_band(level: float) -> str:
    if level <= 0:
        return "off"
    if level < 50:
        return "dimmed"
    if level < 100:
        return "bright"
    return "full"


class CityWatch:
    def __init__(self, settings: Settings, tz: Any):
        self.settings, self.tz = settings, tz
        self.data = Path(settings.data_dir)
        self.readings = 0
        self._window: deque[tuple[float, int]] = deque(maxlen=20)
        self.levels: dict[str, float] = {}
        self.sim_ms: int | None = None
        self.commands = 0
        self.reasons: Counter[str] = Counter()
        self.recent_commands: deque[tuple[int, str, float, str]] = deque(maxlen=6)
        self.settlements = 0
        self.billed_minor = 0
        self.recent_settlements: deque[dict] = deque(maxlen=4)
        self._lock = threading.Lock()
        self._client = None

    # ------------------------------------------------------------------ MQTT

    def start(self) -> None:
        from citygrid import mqtt

        self._client = mqtt.watch_city(self.settings.mqtt, self._on_event)

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()

    def _on_event(self, t: Topic, readings: list | None, body: dict | None) -> None:
        with self._lock:
            if readings is not None:
                self.readings += len(readings)
                for r in readings:
                    self.sim_ms = max(self.sim_ms or 0, r.ts)
                    level = getattr(r, "brightness_pct", None)
                    if level is not None:
                        self.levels[t.device_id] = level
            elif t.channel == "cmd":
                self.commands += 1
                reason = str(body.get("reason", "?"))
                self.reasons[reason] += 1
                self.recent_commands.appendleft((int(body.get("ts", 0)), t.device_id,
                                                 float(body.get("brightness_pct", 0)), reason))
            elif t.channel == "settlement":
                self.settlements += 1
                self.billed_minor += int(body.get("amount_minor", 0) or 0)
                self.recent_settlements.appendleft(body)

    # ------------------------------------------------------------------ state files

    def alerts(self) -> list[tuple[str, str]]:
        """(severity, message) of the active alerts, newest first (the rules' read API)."""
        with contextlib.suppress(sqlite3.Error):
            return [(a.severity, a.message) for a in
                    read_alerts(self.data, active=True, limit=1000)]
        return []

    def dead_letters(self) -> dict[str, int]:
        with contextlib.suppress(sqlite3.Error):
            return read_dead_letter_counts(self.data)
        return {}

    # ------------------------------------------------------------------ figures

    def rate(self) -> float:
        """Readings per second over the last ~10 s."""
        now = time.monotonic()
        with self._lock:
            self._window.append((now, self.readings))
            while len(self._window) > 2 and now - self._window[0][0] > 10:
                self._window.popleft()
            (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def bands(self) -> Counter[str]:
        with self._lock:
            return Counter(level_band(v) for v in self.levels.values())

    def sim_time(self) -> str:
        if self.sim_ms is None:
            return "—"
        return datetime.fromtimestamp(self.sim_ms / 1000, self.tz).strftime("%a %H:%M")

    def line(self) -> str:
        bands = self.bands()
        dead = sum(self.dead_letters().values())
        return (f"city time {self.sim_time()} | {self.rate():.0f} readings/s "
                f"({self.readings} in all) | lights " + " ".join(
                    f"{k} {bands.get(k, 0)}" for k in ("off", "dimmed", "bright", "full"))
                + f" | commands {self.commands} | settlements {self.settlements} | "
                f"alerts {len(self.alerts())} | dead letters {dead}")


def render(watch: CityWatch, supervisor: Supervisor, header: str):
    """The live terminal view (rich renderable)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    bands = watch.bands()
    top = Table.grid(padding=(0, 3))
    top.add_row(f"[b]city time[/] {watch.sim_time()}",
                f"[b]readings[/] {watch.rate():.0f}/s ({watch.readings:,} in all)",
                f"[b]commands[/] {watch.commands:,}", f"[b]settlements[/] {watch.settlements:,}"
                f" ({watch.billed_minor / 100:,.2f} billed)")
    lights = Table(title="lights by level", show_edge=False)
    for band, colour in (("off", "grey50"), ("dimmed", "yellow4"), ("bright", "yellow"),
                         ("full", "bright_yellow")):
        lights.add_column(band, style=colour, justify="right")
    lights.add_row(*(str(bands.get(b, 0)) for b in ("off", "dimmed", "bright", "full")))
    reasons = Table(title="commands by reason", show_edge=False)
    reasons.add_column("reason")
    reasons.add_column("count", justify="right")
    for reason, n in watch.reasons.most_common(5):
        reasons.add_row(reason, str(n))
    recent = Table(title="latest commands", show_edge=False)
    for col in ("light", "level", "reason"):
        recent.add_column(col)
    for _, device, level, reason in list(watch.recent_commands):
        recent.add_row(device, f"{level:.0f} %", reason)
    alerts = watch.alerts()
    dead = watch.dead_letters()
    lower = Table.grid(padding=(0, 2))
    lower.add_row(
        f"[b]alerts[/] {len(alerts)} active" + "".join(
            f"\n  [{'red' if s in ('critical', 'major') else 'yellow'}]{s}[/] {m[:70]}"
            for s, m in alerts[:4]),
        "[b]dead letters[/] " + (", ".join(f"{k} {v}" for k, v in sorted(dead.items()))
                                 or "none"))
    services = " ".join(
        f"[{'green' if s.running else 'red'}]{name}[/]"
        + (f"[dim](↻{s.restarts})[/]" if s.restarts else "")
        for name, s in supervisor.services.items())
    events = [f"[red]{time.strftime('%H:%M:%S', time.localtime(t))} {m}[/]"
              for t, m in list(supervisor.events)[-3:]]
    body = Group(top, "", _row(lights, reasons, recent), lower,
                 f"services: {services}", *events)
    return Panel(body, title=header, subtitle="Ctrl-C stops everything; the state is kept")


def _row(*tables):
    from rich.columns import Columns

    return Columns(tables, padding=(0, 4))
