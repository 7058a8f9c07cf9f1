"""Sparkplug B (Eclipse Sparkplug 3.0): BIRTH aliases, DATA, DEATH as offline, DCMD out.

Payloads are protobuf, decoded with ``protobuf`` and Eclipse Tahu's ``sparkplug_b.proto``
(compiled into ``adapters/sparkplug_b_pb2.py``; see the .proto's header to regenerate).

- NBIRTH resets the edge node's alias table and remembers its ``bdSeq``; DBIRTH adds the
  device's metric names ↔ aliases (aliases are unique per edge node) and its current values;
  DDATA metrics are resolved by alias (or by name when sent without one).
- DDATA reports by exception (only changed metrics): values are merged with the last ones
  the device sent (the profile's ``merge``), so each reading is complete.
- DDEATH: that device offline. NDEATH: every device of the node seen in a DBIRTH offline —
  unless its ``bdSeq`` is not the one of the node's current session (a late Last Will of an
  earlier connection), which is ignored.
- A DDATA whose alias was never born cannot be read: ``no_mapping`` (the spec's answer is a
  rebirth request, an NCMD ``Node Control/Rebirth`` the service may send).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError as ProtobufDecodeError

from adapters import sparkplug_b_pb2 as pb

if TYPE_CHECKING:
    from adapters.profile import Decoded, Message, Profile

# Sparkplug B datatypes (the spec's §6.4.16 / Tahu's comment block).
INT32, INT64, UINT32, UINT64, FLOAT, DOUBLE, BOOLEAN, STRING = 3, 4, 7, 8, 9, 10, 11, 12


@dataclass
class _Node:
    aliases: dict[int, str] = field(default_factory=dict)
    bd_seq: int | None = None
    devices: set[str] = field(default_factory=set)


class SparkplugState:
    """What a host remembers per edge node between messages."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], _Node] = {}


def _value(metric: Any) -> Any:
    if metric.HasField("is_null") and metric.is_null:
        return None
    which = metric.WhichOneof("value")
    return None if which is None else getattr(metric, which)


def decode_sparkplug(profile: Profile, message: Message, topic_vars: dict[str, str],
                     payload: bytes, now_ms: int) -> Decoded:
    from adapters.profile import BAD_PAYLOAD, MISSING_FIELD, NO_MAPPING, Decoded, DecodeError

    p = pb.Payload()
    try:
        p.ParseFromString(payload)
    except ProtobufDecodeError as e:
        raise DecodeError(BAD_PAYLOAD, f"not a Sparkplug B payload: {e}") from None
    group, node_id = topic_vars.get("group", ""), topic_vars.get("node", "")
    node = profile._sparkplug.nodes.setdefault((group, node_id), _Node())
    kind = message.sparkplug

    if kind == "NBIRTH":
        node.aliases.clear()
        node.bd_seq = None
        for m in p.metrics:
            if m.HasField("alias") and m.name:
                node.aliases[m.alias] = m.name
            if m.name == "bdSeq":
                node.bd_seq = int(_value(m) or 0)
        return Decoded(None, status="online", state={"node": f"{group}:{node_id}"})
    if kind == "NDEATH":
        bd = next((int(_value(m) or 0) for m in p.metrics if m.name == "bdSeq"), None)
        if node.bd_seq is not None and bd is not None and bd != node.bd_seq:
            return Decoded(None, state={"node": f"{group}:{node_id}"},
                           held=f"NDEATH bdSeq {bd} is not the current session's "
                           f"({node.bd_seq}): a late will, ignored")
        affected = sorted(node.devices)
        for d in affected:
            profile._last.pop(d, None)
        return Decoded(None, status="offline", affected=affected,
                       state={"node": f"{group}:{node_id}"})

    native_id = profile._native_id(message, topic_vars, {})
    if kind == "DDEATH":
        profile._last.pop(native_id, None)
        return Decoded(native_id, status="offline", affected=[native_id])

    by_name: dict[str, Any] = {}
    stamps: list[int] = []
    for m in p.metrics:
        name = m.name
        if m.HasField("alias"):
            if kind == "DBIRTH" and name:
                node.aliases[m.alias] = name
            elif not name:
                name = node.aliases.get(m.alias, "")
                if not name:
                    raise DecodeError(NO_MAPPING, f"metric alias {m.alias} was never born "
                                      f"(no NBIRTH/DBIRTH for {group}/{node_id} seen): "
                                      "request a rebirth")
        if not name:
            raise DecodeError(BAD_PAYLOAD, "a metric with neither name nor alias")
        by_name[name] = _value(m)
        if m.HasField("timestamp"):
            stamps.append(m.timestamp)
    if kind == "DBIRTH":
        node.devices.add(native_id)

    values: dict[str, Any] = {}
    for fname, fm in message.fields.items():
        if fm.metric is None:
            if fm.const is not None:
                values[fname] = fm.const
            continue
        if fm.metric not in by_name or by_name[fm.metric] is None:
            if fm.optional or profile.spec.merge is not None:
                continue
            raise DecodeError(MISSING_FIELD, f"{fname}: no metric {fm.metric!r}")
        values[fname] = profile._convert(fm, by_name[fm.metric], fname)
    state = {}
    for sname, fm in message.state.items():
        if fm.metric in by_name and by_name[fm.metric] is not None:
            state[sname] = profile._convert(fm, by_name[fm.metric], sname)
    if "brightness_pct" in values and "brightness_pct" not in state:
        state["brightness_pct"] = values["brightness_pct"]
    out = Decoded(native_id, state=state, status="online" if kind == "DBIRTH" else None)
    if not values:
        raise DecodeError(NO_MAPPING, f"none of the metrics {sorted(by_name)} is mapped by "
                          f"profile {profile.name}")
    if message.timestamp.source == "receipt":
        ts = now_ms
    else:
        ts = max(stamps) if stamps else (p.timestamp if p.HasField("timestamp") else now_ms)
    profile._emit(out, values, int(ts), None)
    return out


def _set(metric: Any, value: Any) -> None:
    if isinstance(value, bool):
        metric.datatype, metric.boolean_value = BOOLEAN, value
    elif isinstance(value, int):
        metric.datatype, metric.long_value = INT64, value
    elif isinstance(value, float):
        metric.datatype, metric.double_value = DOUBLE, value
    else:
        metric.datatype, metric.string_value = STRING, str(value)


def encode_dcmd(metrics: dict[str, Any], ts_ms: int) -> bytes:
    """A DCMD payload writing ``metrics`` (by name: commands carry names, §6.4.4)."""
    p = pb.Payload(timestamp=ts_ms)
    for name, value in metrics.items():
        m = p.metrics.add()
        m.name = name
        m.timestamp = ts_ms
        _set(m, value)
    return p.SerializeToString()


def encode_payload(metrics: list[dict[str, Any]], ts_ms: int, seq: int) -> bytes:
    """A Sparkplug payload from ``[{name?, alias?, value, datatype?, timestamp?}]`` (tests)."""
    p = pb.Payload(timestamp=ts_ms, seq=seq)
    for spec in metrics:
        m = p.metrics.add()
        if "name" in spec:
            m.name = spec["name"]
        if "alias" in spec:
            m.alias = spec["alias"]
        m.timestamp = spec.get("timestamp", ts_ms)
        value = spec["value"]
        dt = spec.get("datatype")
        if dt in (FLOAT,):
            m.datatype, m.float_value = dt, float(value)
        elif dt in (DOUBLE,):
            m.datatype, m.double_value = dt, float(value)
        elif dt in (INT32, UINT32):
            m.datatype, m.int_value = dt, int(value)
        elif dt in (INT64, UINT64):
            m.datatype, m.long_value = dt, int(value)
        else:
            _set(m, value)
    return p.SerializeToString()
