"""Lighting arbitration (DESIGN.md §6): who gets to set a light, and why.

Every rule that wants a light holds a *wish*: a priority class, a level, the
reason, and maybe an expiry. The effective level is the wish of the highest
class (override > safety > sensor > program > default); within a class the
highest level wins. At night a safety floor lifts anything but an operator
override. A command goes out only when the effective level changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLASSES = ("override", "safety", "sensor", "program", "default")
RANK = {name: len(CLASSES) - i for i, name in enumerate(CLASSES)}  # override highest


@dataclass(frozen=True)
class Wish:
    key: str  # who holds it: "rule:motion-boost@sl-00012" or "override:operator"
    cls: str
    level: float
    reason: str
    expires_ms: int | None = None
    since_ms: int = 0

    def alive(self, now_ms: int) -> bool:
        return self.expires_ms is None or now_ms < self.expires_ms


@dataclass(frozen=True)
class Decision:
    level: float
    reason: str
    winner: Wish | None
    floored: bool = False


@dataclass
class LightState:
    device_id: str
    wishes: dict[str, Wish] = field(default_factory=dict)
    level: float | None = None  # the level last commanded
    reason: str | None = None

    def decide(self, now_ms: int, default_level: float, floor: float | None) -> Decision:
        # The first alive wish with the highest (class, level) — what max() would pick.
        winner = None
        rank = level = 0
        for w in self.wishes.values():
            if w.expires_ms is not None and now_ms >= w.expires_ms:
                continue
            r = RANK[w.cls]
            if winner is None or r > rank or (r == rank and w.level > level):
                winner, rank, level = w, r, w.level
        if winner is None:
            level, reason = default_level, "default"
        else:
            level, reason = winner.level, winner.reason
        if floor is not None and level < floor and (winner is None or winner.cls != "override"):
            return Decision(floor, "safety:night-floor", winner, floored=True)
        return Decision(level, reason, winner)

    def expire(self, now_ms: int) -> bool:
        """Drop wishes that have run out; True if any did."""
        dead = None
        for k, w in self.wishes.items():
            if w.expires_ms is not None and now_ms >= w.expires_ms:  # not w.alive(now_ms)
                if dead is None:
                    dead = [k]
                else:
                    dead.append(k)
        if dead is None:
            return False
        for k in dead:
            del self.wishes[k]
        return True

    def next_expiry(self) -> int | None:
        times = [w.expires_ms for w in self.wishes.values() if w.expires_ms is not None]
        return min(times) if times else None
