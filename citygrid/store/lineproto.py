"""InfluxDB line protocol encoding, with the escaping rules of the v1 reference."""

from __future__ import annotations

import math

from citygrid.store.base import Point

_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_TAG = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n"})
_STRING = str.maketrans({'"': r"\"", "\\": "\\\\", "\n": r"\n"})


def escape_measurement(name: str) -> str:
    return name.translate(_MEASUREMENT)


def escape_tag(text: str) -> str:
    """Tag keys, tag values and field keys share one rule."""
    return text.translate(_TAG)


def field_value(value: object) -> str:
    # bool before int: bool is an int subclass, and 1i is not true.
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"line protocol has no {value}")
        return repr(value)
    if isinstance(value, str):
        return '"' + value.translate(_STRING) + '"'
    raise TypeError(f"cannot store {type(value).__name__} {value!r} as a field")


def encode(point: Point) -> str:
    """One line; tags sorted by key, as InfluxDB recommends for write speed."""
    measurement, tags, fields, ts_ms = point
    head = escape_measurement(measurement)
    if tags:
        head += "".join(
            f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v != ""
        )
    body = ",".join(f"{escape_tag(k)}={field_value(v)}" for k, v in fields.items())
    return f"{head} {body} {ts_ms}"


def encode_batch(points: list[Point]) -> bytes:
    return "\n".join(encode(p) for p in points).encode()
