"""Lamp types: what a streetlight's luminaire should draw at each dimming level, how far a
measurement may stray from that, and how long the lamp lasts (CITYGRID_LAMP_TYPES).

A streetlight names its type in the inventory (``lamp_type``, citygrid/fleet.py); one without
gets a generic type made from its ``rated_w`` on the simulator's curve (the rated power plus
8 % driver loss at 100 %, 0.5 W standby, linear in between). The embedded file
(citygrid/lamptypes.yaml) holds the types of the lights the simulator and the demo city use;
CITYGRID_LAMP_TYPES names a file that replaces it, refused whole (every error with its
file:line:column) if anything in it is wrong.

The rule engine's lamp monitor (rules/lampmon.py) compares readings with these types; the
registry refuses a ``lamp_type`` the types do not name (``Catalogue.lamp_types``).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from citygrid.fleet import PROFILE_PATTERN, FleetDevice
from citygrid.yamlconf import ConfigError, ConfigProblem, parse, validate

EMBEDDED = Path(__file__).parent / "lamptypes.yaml"
STANDBY_W = 0.5  # the simulator's node: what a light draws off (and with a failed lamp)
DRIVER_LOSS = 0.08  # the simulator's driver: 8 % on top of the lamp's own power
# The generic type's figures, and every type's where its file leaves them out.
TOLERANCE_PCT = 15.0
WARMUP_S = 60.0
RATED_LIFE_H = 100_000.0

_NAME = re.compile(PROFILE_PATTERN)
_STRICT = ConfigDict(extra="forbid", frozen=True)
Level = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Watts = Annotated[float, Field(ge=0, le=5000, allow_inf_nan=False)]


class _LampTypeModel(BaseModel):
    model_config = _STRICT
    description: Annotated[str, Field(max_length=200)] | None = None
    wattage_w: Annotated[float, Field(gt=0, le=2000, allow_inf_nan=False)]
    power_w: dict[Level, Watts]
    min_output_pct: Level = 0.0
    tolerance_pct: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = TOLERANCE_PCT
    warmup_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = WARMUP_S
    rated_life_h: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] = RATED_LIFE_H

    @field_validator("power_w")
    @classmethod
    def _curve(cls, curve: dict[float, float]) -> dict[float, float]:
        if 0 not in curve or 100 not in curve:
            raise ValueError("give the power at 0 (standby) and at 100 %, e.g. {0: 0.5, 100: "
                             "59.9}; levels in between are optional")
        levels = sorted(curve)
        if any(curve[a] > curve[b] for a, b in zip(levels, levels[1:], strict=False)):
            raise ValueError("power must not fall as the level rises")
        return curve


class _LampTypesFile(BaseModel):
    model_config = _STRICT
    version: Literal[1] = 1
    lamp_types: dict[str, _LampTypeModel]


@dataclass(frozen=True, slots=True)
class LampType:
    """One luminaire: its power curve (level % → W, linear in between) and its limits."""

    name: str
    wattage_w: float
    curve: tuple[tuple[float, float], ...]  # (level, W), rising levels, 0 and 100 included
    min_output_pct: float = 0.0
    tolerance_pct: float = TOLERANCE_PCT
    warmup_s: float = WARMUP_S
    rated_life_h: float = RATED_LIFE_H
    description: str | None = None

    @property
    def standby_w(self) -> float:
        return self.curve[0][1]

    def expected_w(self, level: float) -> float:
        """What the light should draw at ``level`` (a non-zero level below the lowest it dims
        to gives that lowest output)."""
        if level <= 0:
            return self.curve[0][1]
        level = min(max(level, self.min_output_pct), 100.0)
        levels = [c[0] for c in self.curve]
        i = bisect.bisect_left(levels, level)
        if levels[i] == level:
            return self.curve[i][1]
        (l0, p0), (l1, p1) = self.curve[i - 1], self.curve[i]
        return p0 + (p1 - p0) * (level - l0) / (l1 - l0)

    @classmethod
    def generic(cls, rated_w: float) -> LampType:
        """The type of a light that names none: the simulator's curve for its rated power."""
        return cls(f"generic-{rated_w:g}w", rated_w,
                   ((0.0, STANDBY_W), (100.0, rated_w * (1 + DRIVER_LOSS) + STANDBY_W)),
                   description=f"generic lamp of {rated_w:g} W (no lamp_type)")


class LampTypes(Mapping[str, LampType]):
    """The lamp types by name, and the one a given light has."""

    def __init__(self, types: Mapping[str, LampType], source: str = "<lamp types>"):
        self._types = dict(types)
        self.source = source

    def __getitem__(self, name: str) -> LampType:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def for_device(self, device: FleetDevice) -> LampType:
        """The light's type: the one it names (a name not known here counts as none), else a
        generic one from its rated power."""
        if device.lamp_type is not None:
            known = self._types.get(device.lamp_type)
            if known is not None:
                return known
        return _generic(device.rated_w or 0.0)


@lru_cache(maxsize=256)
def _generic(rated_w: float) -> LampType:
    return LampType.generic(rated_w)


def parse_text(text: str, name: str = "<lamp types>") -> LampTypes:
    """A lamp types file's text; raises :class:`ConfigError` with every problem located."""
    data, marks = parse(text, name)
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(name, 1, 1, "a lamp types file is a mapping with "
                                         "'lamp_types:'")])
    names = data.get("lamp_types") if isinstance(data.get("lamp_types"), dict) else {}
    bad = [ConfigProblem(name, *marks.at(("lamp_types", n), key=True),
                         f"lamp type name {n!r} must match {PROFILE_PATTERN} (lower case, "
                         "digits, dashes)") for n in names
           if not isinstance(n, str) or not _NAME.match(n)]
    try:
        model: _LampTypesFile = validate(_LampTypesFile, data, marks, name)  # type: ignore
    except ConfigError as e:
        raise ConfigError(sorted(bad + e.problems, key=lambda p: (p.line, p.column))) from None
    if bad:
        raise ConfigError(bad)
    return LampTypes({n: LampType(n, t.wattage_w, tuple(sorted(t.power_w.items())),
                                  t.min_output_pct, t.tolerance_pct, t.warmup_s,
                                  t.rated_life_h, t.description)
                      for n, t in model.lamp_types.items()}, name)


def load(path: str | Path | None = None) -> LampTypes:
    """The lamp types of ``path`` (CITYGRID_LAMP_TYPES), or the embedded ones."""
    if path is None:
        return _embedded()
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([ConfigProblem(str(path), 1, 1, f"cannot read: {e}")]) from None
    return parse_text(text, str(path))


@lru_cache(maxsize=1)
def _embedded() -> LampTypes:
    return parse_text(EMBEDDED.read_text(), str(EMBEDDED))


__all__ = ["EMBEDDED", "STANDBY_W", "LampType", "LampTypes", "load", "parse_text"]
