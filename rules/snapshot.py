"""The engine's state as plain data: what :meth:`RuleEngine.snapshot` hands out (what changed
since the last snapshot) and :meth:`RuleEngine.restore` takes back (all that was saved) —
lights with their wishes, rule instances, alerts, the lamp monitor's counters, the watermark.
rules/state.py keeps it in SQLite."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from rules.alerts import AlertState
from rules.arbitration import LightState, Wish


class SavedLight(NamedTuple):
    level: float | None  # the level last commanded
    reason: str | None
    wishes: list[dict[str, Any]]  # each: key, cls, level, reason, expires_ms, since_ms


class SavedInstance(NamedTuple):
    fingerprint: str
    active: bool
    pending_since: int | None


class SavedAlert(NamedTuple):
    rule_id: str
    severity: str
    message: str
    scope: str
    since_ms: int
    sources: list[str]  # sorted
    active: bool
    cleared_ms: int | None


class SavedLamp(NamedTuple):
    lamp_type: str  # the type's name when saved (a generic one: generic-50w)
    rated_life_h: float
    burning_ms: int  # time burning since the lamp was new (or counting began)
    switch_ons: int
    replaced_ms: int | None  # when the lamp was last replaced


@dataclass
class Snapshot:
    """Lights and instances that are gone map to None (alerts are kept once raised)."""

    lights: dict[str, SavedLight | None] = field(default_factory=dict)
    instances: dict[tuple[str, str], SavedInstance | None] = field(default_factory=dict)
    alerts: dict[str, SavedAlert] = field(default_factory=dict)
    watermark: int | None = None
    lamps: dict[str, SavedLamp] = field(default_factory=dict)


def saved_light(state: LightState) -> SavedLight:
    return SavedLight(state.level, state.reason, [
        {"key": w.key, "cls": w.cls, "level": w.level, "reason": w.reason,
         "expires_ms": w.expires_ms, "since_ms": w.since_ms} for w in state.wishes.values()])


def saved_alert(a: AlertState) -> SavedAlert:
    return SavedAlert(a.rule_id, a.severity, a.message, a.scope, a.since_ms, sorted(a.sources),
                      a.active, a.cleared_ms)


def alert_state(key: str, a: SavedAlert) -> AlertState:
    return AlertState(key, a.rule_id, a.severity, a.message, a.scope, a.since_ms,
                      set(a.sources), a.active, a.cleared_ms)


def wish(saved: dict[str, Any]) -> Wish:
    return Wish(**saved)
