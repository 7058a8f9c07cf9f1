"""What a rule sees: the names its expressions and message templates look up (the reading,
the device, its light, the sun, local time, the meter), and which devices a rule selects."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from billing import period_of
from citygrid.fleet import FleetDevice
from rules.expr import EvalError
from rules.model import Select

if TYPE_CHECKING:
    from rules.engine import Billing, RuleEngine

TEMPLATE = re.compile(r"\{(reading|device|light|sun|local|meter)\.([A-Za-z_][A-Za-z0-9_]*)\}")


class Context:
    """What an expression sees; attribute lookups go through here (compiled expressions read
    ``reading``, ``device`` and ``light`` directly, and call :meth:`sun_elevation`)."""

    __slots__ = ("reading", "device", "light", "engine", "ts_ms")

    def __init__(self, engine: RuleEngine, ts_ms: int, device: FleetDevice | None = None,
                 reading: dict | None = None):
        self.engine, self.ts_ms, self.device, self.reading = engine, ts_ms, device, reading
        self.light = engine.lights.get(device.device_id) if device else None

    def sun_elevation(self) -> float:
        return self.engine.city_time.sun_elevation(self.ts_ms)

    def lookup(self, root: str, attr: str) -> Any:
        if root == "reading":
            if self.reading is None:
                raise EvalError("no reading here")
            return self.reading.get(attr)
        if root == "device":
            if self.device is None:
                raise EvalError("no device here")
            if attr == "id":
                return self.device.device_id
            if not hasattr(self.device, attr):
                raise EvalError(f"devices have no {attr!r}")
            return getattr(self.device, attr)
        if root == "light":
            if attr != "level":
                raise EvalError("light has only .level")
            if self.light is not None and self.light.level is not None:
                return self.light.level
            return (self.reading or {}).get("brightness_pct")
        if root == "sun":
            if attr != "elevation":
                raise EvalError("sun has only .elevation")
            return self.engine.city_time.sun_elevation(self.ts_ms)
        if root == "meter":
            return meter_value(self.engine.billing, self.device, attr, self.ts_ms,
                               self.engine.city.tz)
        local = self.engine.city_time.local_time(self.ts_ms)
        if attr == "hour":
            return local.hour + local.minute / 60
        if attr in ("minute", "weekday"):
            return local.minute if attr == "minute" else local.weekday()
        raise EvalError(f"local has hour, minute, weekday — not {attr!r}")

    def window(self, kind: str, field: str, seconds: float) -> float | None:
        if self.device is None:
            raise EvalError("windows need a device")
        values = [v for t, v in self.engine.windows[self.device.device_id].get(field, ())
                  if t > self.ts_ms - seconds * 1000]
        if kind == "count":
            return len(values)
        if not values:
            return None
        return {"avg": lambda: sum(values) / len(values), "min": lambda: min(values),
                "max": lambda: max(values)}[kind]()


def meter_value(billing: Billing | None, device: FleetDevice | None, attr: str, ts_ms: int,
                tz: ZoneInfo) -> Any:
    """``meter.unbilled_kwh``, ``meter.unbilled_amount``, ``meter.period_ended``."""
    if billing is None or device is None or device.kind != "meter":
        raise EvalError("meter.* is known for meters, with billing configured")
    info = billing.unbilled(device.device_id)
    if attr == "unbilled_kwh":
        return info["kwh"]
    if attr == "unbilled_amount":
        return info["amount"]
    if attr == "period_ended":  # a month ended with something unbilled, or fixed charges
        current = period_of(ts_ms, tz)
        return any(p is not None and p < current
                   for p in (info["oldest_period"], info.get("uncharged_period")))
    raise EvalError(f"meter has unbilled_kwh, unbilled_amount, period_ended — not {attr!r}")


def selects(select: Select, device: FleetDevice) -> bool:
    if select.kind and device.kind != select.kind:
        return False
    if select.district:
        districts = [select.district] if isinstance(select.district, str) else select.district
        if not any(fnmatchcase(device.district, d) for d in districts):
            return False
    if select.road:
        roads = [select.road] if isinstance(select.road, str) else select.road
        if device.road not in roads:
            return False
    if select.cabinet:
        cabinets = [select.cabinet] if isinstance(select.cabinet, str) else select.cabinet
        if device.cabinet is None or not any(fnmatchcase(device.cabinet, c) for c in cabinets):
            return False
    return not select.devices or any(fnmatchcase(device.device_id, p) for p in select.devices)


def render(template: str, ctx: Context) -> str:
    """A message or topic template with its ``{root.attr}`` filled in (left as written where
    the name is unknown here)."""

    def value(match: re.Match) -> str:
        try:
            v = ctx.lookup(match[1], match[2])
        except EvalError:
            return match[0]
        return f"{v:g}" if isinstance(v, float) else str(v)

    return TEMPLATE.sub(value, template)
