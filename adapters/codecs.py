"""Small codecs the profiles use: JSON paths, units, timestamps, templates, binary encoders."""

from __future__ import annotations

import base64
import re
import struct
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

# The unit each contract field is in, and its dimension.
CONTRACT_UNITS: dict[str, str] = {
    "energy_kwh": "kWh", "energy_export_kwh": "kWh", "energy_wh": "Wh", "power_w": "W",
    "voltage_v": "V", "brightness_pct": "%", "lux": "lx", "temp_c": "C", "no2_ugm3": "ug/m3",
    "pm25_ugm3": "ug/m3",
}
# Native unit → (dimension, factor to the dimension's base unit).
UNITS: dict[str, tuple[str, float]] = {
    "Wh": ("energy", 1.0), "kWh": ("energy", 1000.0), "MWh": ("energy", 1e6),
    "W": ("power", 1.0), "kW": ("power", 1000.0),
    "V": ("voltage", 1.0), "mV": ("voltage", 0.001),
    "%": ("fraction", 1.0), "0-254": ("fraction", 100 / 254), "0-255": ("fraction", 100 / 255),
    "0-1": ("fraction", 100.0), "0-1000": ("fraction", 0.1),
    "lx": ("lux", 1.0), "C": ("temperature", 1.0), "ug/m3": ("concentration", 1.0),
}
# SenML (RFC 8428 §12.1) unit symbols we accept as synonyms.
SENML_UNITS = {"W": "W", "Wh": "Wh", "kWh": "kWh", "V": "V", "%": "%", "lx": "lx", "Cel": "C",
               "/": "0-1"}


def unit_factor(native: str, field: str) -> float:
    """The factor turning a value in ``native`` units into ``field``'s contract unit."""
    target = CONTRACT_UNITS.get(field)
    if target is None:
        raise ValueError(f"{field} has no unit in the contract; drop 'unit' for it")
    if native not in UNITS:
        raise ValueError(f"unknown unit {native!r}; known: {', '.join(UNITS)}")
    dim, factor = UNITS[native]
    tdim, tfactor = UNITS[target]
    if dim != tdim:
        raise ValueError(f"{native} is a unit of {dim}, but {field} is in {target} ({tdim})")
    return factor / tfactor


_MISSING = object()


def get_path(doc: Any, path: str) -> Any:
    """``a.b.0.c`` in a JSON document; a key may contain ':' (``em1:0``). Missing → _MISSING."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def is_missing(value: Any) -> bool:
    return value is _MISSING


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def as_number(value: Any, where: str) -> float:
    """A JSON number, or a string holding a decimal number (DSMR-reader sends "0001.234")."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    raise ValueError(f"{where}: expected a number, got {value!r}")


def parse_time(value: Any, fmt: str, tz: str | None, where: str) -> int:
    """A payload timestamp → epoch ms. ``local`` times carry no offset: ``tz`` gives it."""
    if fmt in ("epoch_s", "epoch_ms"):
        number = as_number(value, where)
        return round(number * 1000) if fmt == "epoch_s" else round(number)
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a time string, got {value!r}")
    text = value.strip().replace(" ", "T", 1)
    # RFC 3339 with nanoseconds (ChirpStack): Python takes at most microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not an ISO 8601 time") from None
    if fmt == "local":
        if parsed.tzinfo is not None:
            return int(parsed.timestamp() * 1000)
        # fold=0: an ambiguous autumn hour is read as its first occurrence.
        return int(parsed.replace(tzinfo=ZoneInfo(tz or "UTC")).timestamp() * 1000)
    if parsed.tzinfo is None:
        raise ValueError(f"{where}: {value!r} has no UTC offset; use format: local with a "
                         "timezone for devices that send local time")
    return int(parsed.timestamp() * 1000)


# --------------------------------------------------------------------------- commands

def command_vars(native_id: str, command: dict[str, Any], id_vars: dict[str, str]
                 ) -> dict[str, Any]:
    """What a command template may use: the contract command's fields and derived levels."""
    pct = float(command["brightness_pct"])
    out: dict[str, Any] = {**id_vars, "native_id": native_id, **command,
                           "level_254": round(pct * 254 / 100), "level_255": round(pct * 255 / 100),
                           "level_1": round(pct / 100, 4), "on_off": "ON" if pct > 0 else "OFF",
                           "on": pct > 0}
    return out


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render(template: Any, values: dict[str, Any]) -> Any:
    """Fill a JSON template: a string that is exactly ``{var}`` takes the value's own type."""
    if isinstance(template, str):
        whole = _VAR.fullmatch(template)
        if whole:
            return values[whole.group(1)]
        return _VAR.sub(lambda m: str(values[m.group(1)]), template)
    if isinstance(template, list):
        return [render(t, values) for t in template]
    if isinstance(template, dict):
        if set(template) == {"base64"}:
            return base64.b64encode(encode_bytes(template["base64"], values)).decode()
        return {k: render(v, values) for k, v in template.items()}
    return template


_PACK = {"u8": ">B", "u16be": ">H", "u16le": "<H", "u32be": ">I", "u32le": "<I", "i16be": ">h"}


def encode_bytes(spec: list[dict[str, Any]], values: dict[str, Any]) -> bytes:
    """A small declared encoder: ``[{u8: brightness_pct}, {u16be: hold_s}, {const: 1}]``."""
    out = b""
    for item in spec:
        (kind, source), = item.items()
        if kind == "const":
            out += struct.pack(">B", int(source))
            continue
        value = values.get(source)
        out += struct.pack(_PACK[kind], int(round(float(value or 0))))
    return out


ENCODER_TYPES = (*_PACK, "const")
