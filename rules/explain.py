"""Why a light is at its level: the wish that won arbitration, every other wish still alive
with its rule and expiry, whether the safety floor lifted it, and the lighting calendar's
entry and program for it (`citygrid rules explain`,
the gateway's explain route)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rules.arbitration import RANK, LightState, Wish
from rules.calendar import explain_light

if TYPE_CHECKING:
    from rules.engine import RuleEngine


def explain(engine: RuleEngine, device_id: str, now_ms: int | None = None) -> dict[str, Any]:
    now = now_ms if now_ms is not None else (engine.watermark or 0)
    state = engine.lights.get(device_id, LightState(device_id))
    floor = engine.floor_active(now)
    decision = state.decide(now, engine.default_level, engine.floor_level if floor else None)
    wishes = sorted((w for w in state.wishes.values() if w.alive(now)),
                    key=lambda w: (-RANK[w.cls], -w.level))
    return {
        "device_id": device_id, "at_ms": now, "level": decision.level,
        "commanded": state.level, "reason": decision.reason,
        "safety_floor": {"active": floor, "level": engine.floor_level,
                         "applied": decision.floored},
        "winner": _wish_dict(decision.winner, now) if decision.winner else None,
        "wishes": [_wish_dict(w, now) for w in wishes],
        # the calendar's entry and program for the light, with the day's steps (None: no
        # calendar in the rules)
        "calendar": explain_light(engine, device_id, now),
    }


def _wish_dict(w: Wish, now: int) -> dict[str, Any]:
    return {"class": w.cls, "level": w.level, "reason": w.reason, "key": w.key,
            "since_ms": w.since_ms, "expires_ms": w.expires_ms,
            "expires_in_s": None if w.expires_ms is None else (w.expires_ms - now) / 1000}
