"""InfluxDB line protocol encoding, with the escaping rules of the v1 reference.

The hot path (ingest) hands in points whose series key is already encoded
(``Point.key``), and field names are escaped once and remembered.
"""

from __future__ import annotations

from citygrid.store.base import Point

_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_TAG = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n"})
_STRING = str.maketrans({'"': r"\"", "\\": "\\\\", "\n": r"\n"})
_field_keys: dict[str, str] = {}


def escape_measurement(name: str) -> str:
    return name.translate(_MEASUREMENT)


def escape_tag(text: str) -> str:
    """Tag keys, tag values and field keys share one rule."""
    return text.translate(_TAG)


def series_key(measurement: str, tags: dict[str, str]) -> str:
    """``measurement,k=v,…`` with tags sorted by key, as InfluxDB recommends."""
    return escape_measurement(measurement) + "".join(
        f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != "")


def field_value(value: object) -> str:
    kind = type(value)
    if kind is float:
        if value - value != 0:  # NaN and ±Infinity; line protocol has neither
            raise ValueError(f"line protocol has no {value}")
        return repr(value)
    # bool before int: bool is an int subclass, and 1i is not true.
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return f"{value}i"
    if kind is str:
        return '"' + value.translate(_STRING) + '"'
    raise TypeError(f"cannot store {kind.__name__} {value!r} as a field")


def _field_key(name: str) -> str:
    key = _field_keys.get(name)
    if key is None:
        key = _field_keys[name] = escape_tag(name)
    return key


def encode(point: Point) -> str:
    measurement, tags, fields, ts_ms, key = point
    if key is None:
        key = series_key(measurement, tags)
    parts = []
    for name, value in fields.items():
        # field_value() inlined for the common types: this loop runs per field per reading.
        kind = type(value)
        if kind is float and value - value == 0:
            text = repr(value)
        elif kind is bool:
            text = "true" if value else "false"
        elif kind is int:
            text = f"{value}i"
        else:
            text = field_value(value)
        parts.append(f"{_field_keys.get(name) or _field_key(name)}={text}")
    return f"{key} {','.join(parts)} {ts_ms}"


def encode_batch(points: list[Point]) -> bytes:
    return "\n".join([encode(p) for p in points]).encode()
