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


def _value(value: object) -> str:
    """``field_value`` with the common types first (called per field per reading)."""
    kind = type(value)
    if kind is float and value - value == 0:
        return repr(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return f"{value}i"
    return field_value(value)


_ENCODERS: dict[tuple, object] = {}


def _bad(value: float) -> None:
    raise ValueError(f"line protocol has no {value}")


def _encoder(names: tuple[str, ...], kinds: tuple[type, ...]):
    """A function that writes the fields of one set of names and value types, made once per
    set (a city has a handful: one per kind and optional field present): one f-string, no
    call per field. The names reach it as values (``n0``…), never as source text."""
    fn = _ENCODERS.get((names, kinds))
    if fn is None:
        if len(_ENCODERS) > 1000:  # points of arbitrary shapes: do not grow without bound
            _ENCODERS.clear()
        scope: dict[str, object] = {"_value": _value, "_bad": _bad, "_STRING": _STRING}
        take, checks, body = [], [], []
        for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
            scope[f"n{i}"] = name
            scope[f"k{i}"] = ("," if i else "") + (_field_keys.get(name) or _field_key(name)) + "="
            take.append(f"    v{i} = f[n{i}]\n")
            if kind is float:  # NaN and ±Infinity: line protocol has neither
                checks.append(f"    if v{i} - v{i} != 0:\n        _bad(v{i})\n")
                body.append(f"{{k{i}}}{{v{i}!r}}")
            elif kind is bool:
                body.append(f"{{k{i}}}{{'true' if v{i} else 'false'}}")
            elif kind is int:
                body.append(f"{{k{i}}}{{v{i}}}i")
            elif kind is str:
                body.append(f'{{k{i}}}\\"{{v{i}.translate(_STRING)}}\\"')
            else:  # what field_value refuses, it refuses here too
                body.append(f"{{k{i}}}{{_value(v{i})}}")
        source = ("def enc(key, f, ts):\n" + "".join(take) + "".join(checks)
                  + f"    return f\"{{key}} {''.join(body)} {{ts}}\"\n")
        exec(compile(source, "<lineproto>", "exec"), scope)  # noqa: S102 (no data in it)
        fn = _ENCODERS[names, kinds] = scope["enc"]
    return fn


def encode(point: Point) -> str:
    measurement, tags, fields, ts_ms, key = point
    if key is None:
        key = series_key(measurement, tags)
    return _encoder(tuple(fields), tuple(map(type, fields.values())))(key, fields, ts_ms)


def encode_batch(points: list[Point]) -> bytes:
    return "\n".join([encode(p) for p in points]).encode()
