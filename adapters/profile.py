"""Device profiles: how one kind of off-the-shelf device talks, as strict YAML.

A profile names the device's native topics (and where its native id comes from: a topic
level or a payload path), how each payload is read (JSON paths, SenML, ChirpStack v4 event
JSON, Sparkplug B protobuf), how native values map to contract fields (unit and scale), where
the timestamp comes from, and how a contract command goes out and the device's answer comes
back as an ack. A device without a profile speaks the contract itself.

Decisions (docs/devices.md has the operator's version):

- **Fields a device cannot measure are absent, never invented.** A profile lists them under
  ``absent:`` (a zigbee2mqtt bulb: ``lux``, ``motion``, ``power_w``, ``energy_wh``). The reading
  carries only what the device measures. Rule conditions treat an absent field as unknown: a
  comparison with it is false (``reading.lux <= 50`` is false), so rules that need a sensor do
  not fire for a light without one, and the safety floor still applies. A rule that should also
  cover such lights says so: ``not (reading.lux > 50)``. Filling in a value (lux 0) would turn a
  bulb on at noon. The contract's reading models must accept these fields as absent (optional);
  until they do, :meth:`Profile.decode` validates against the contract model with the profile's
  ``absent`` fields relaxed (and nothing else).
- **seq.** The contract wants a per-device sequence number. Devices behind profiles have none
  (or one that wraps, like Sparkplug's 0-255): the adapter sets ``seq`` to the reading's ``ts`` in
  epoch milliseconds. It increases with the device's time, survives an adapter restart (no
  counter to keep), and a repeated message has a repeated seq; it does not reveal lost
  messages. A profile may instead take it from the payload (``seq: {path: fCnt}``).
- **Acks.** Most devices do not answer a command: they report their state. ``decode`` returns
  that state (``Decoded.state``, contract names: ``brightness_pct``); the service keeps the
  pending command and asks :meth:`Profile.ack_for` whether the state confirms it (the level
  within the profile's ``ack.tolerance``), or passes ``pending=`` to ``decode`` and gets
  ``Decoded.acks``.
- **Messages that carry half a reading** (Shelly sends power and the energy register on two
  topics; Sparkplug DDATA sends only changed metrics) are merged per device with the last
  values seen (at most ``merge.max_age`` old). Until every required field is known the decode
  returns no reading and says why in ``Decoded.held``; anything that cannot be mapped at all
  raises :class:`DecodeError`.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapters import codecs
from citygrid.contract import KINDS, ContractError, decode_readings, validate_reading
from citygrid.fleet import PROFILE_PATTERN
from citygrid.yamlconf import ConfigError, ConfigProblem, parse, validate

SHIPPED = Path(__file__).parent / "profiles"

# DecodeError reasons (``unknown_native_device`` is the service's).
NOT_JSON = "not_json"
MISSING_FIELD = "missing_field"
BAD_UNIT = "bad_unit"
BAD_PAYLOAD = "bad_payload"
NO_MAPPING = "no_mapping"
REASONS = (NOT_JSON, MISSING_FIELD, BAD_UNIT, BAD_PAYLOAD, NO_MAPPING)


class ProfileError(ValueError):
    """A profile file refused; the message starts ``file:line:column: ``."""

    def __init__(self, problems: list[ConfigProblem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class DecodeError(ValueError):
    """A native message that cannot become contract readings; ``reason`` is in REASONS."""

    def __init__(self, reason: str, detail: str, topic: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic


@dataclass
class Decoded:
    """What one native message says, in contract terms."""

    native_id: str | None
    readings: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    status: str | None = None  # "online" / "offline" (Sparkplug BIRTH / DEATH)
    state: dict[str, Any] = field(default_factory=dict)  # e.g. {"brightness_pct": 40.0}
    affected: list[str] = field(default_factory=list)  # native ids a node-level status covers
    held: str | None = None  # why a mapped message produced no reading yet


# --------------------------------------------------------------------------- the file format

_FORBID = ConfigDict(extra="forbid", frozen=True)
TEMPLATE_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class FieldMap(BaseModel):
    """Where one contract field comes from."""

    model_config = _FORBID
    path: str | None = None  # dotted JSON path, e.g. ENERGY.Total
    sum: list[str] | None = None  # the sum of several paths (two tariff registers)
    metric: str | None = None  # a Sparkplug metric name
    const: float | bool | str | None = None
    unit: str | None = None  # the native unit; converted to the contract field's
    scale: float | None = None  # an extra factor after the unit
    map: dict[str, Any] | None = None  # value mapping, e.g. {"ON": true}
    optional: bool = False  # not in every message: leave the field out when missing

    @model_validator(mode="after")
    def _one_source(self) -> FieldMap:
        sources = [x for x in (self.path, self.sum, self.metric, self.const) if x is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of path, sum, metric, const")
        if self.unit is not None and self.unit not in codecs.UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; known: {', '.join(codecs.UNITS)}")
        return self


class TimeSpec(BaseModel):
    model_config = _FORBID
    path: str | None = None  # None with source receipt
    source: Literal["payload", "receipt"] = "payload"
    format: Literal["rfc3339", "local", "epoch_s", "epoch_ms"] = "rfc3339"
    timezone: str | None = None  # for format local: the device's zone (Tasmota)

    @model_validator(mode="after")
    def _check(self) -> TimeSpec:
        if self.source == "payload" and not self.path:
            raise ValueError("a payload timestamp needs a path (or source: receipt)")
        if self.format == "local":
            if not self.timezone:
                raise ValueError("format local needs a timezone, e.g. Europe/Copenhagen")
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown timezone {self.timezone!r}") from None
        return self


class SeqSpec(BaseModel):
    model_config = _FORBID
    path: str


class Message(BaseModel):
    """One kind of native message: its topic and how to read it."""

    model_config = _FORBID
    topic: str  # MQTT topic with {var} levels, e.g. tele/{native_id}/SENSOR
    format: Literal["json", "senml", "sparkplug"] = "json"
    sparkplug: Literal["NBIRTH", "DBIRTH", "DDATA", "NDATA", "NDEATH", "DDEATH"] | None = None
    native_id: FieldMap | None = None  # from the payload (path) instead of the topic
    timestamp: TimeSpec = TimeSpec(source="receipt")
    fields: dict[str, FieldMap] = {}
    passthrough: str | None = None  # a path whose object's keys are contract field names
    state: dict[str, FieldMap] = {}  # what the device reports about itself (for acks)
    reading: bool = True  # False: a state/status-only message
    status: Literal["online", "offline"] | None = None
    require: dict[str, Any] = {}  # path → value the payload must have (else no_mapping)


class Command(BaseModel):
    model_config = _FORBID
    topic: str
    format: Literal["json", "sparkplug"] = "json"
    payload: Any = None  # a JSON template: "{brightness_pct}", "{level_254}", {base64: [...]}
    metrics: dict[str, Any] = {}  # sparkplug: metric name → template


class AckSpec(BaseModel):
    model_config = _FORBID
    tolerance: Annotated[float, Field(ge=0)] = 1.0  # % points between commanded and reported


class MergeSpec(BaseModel):
    model_config = _FORBID
    max_age_s: Annotated[float, Field(gt=0)] = 300.0


class ProfileFile(BaseModel):
    model_config = _FORBID
    profile: Annotated[str, Field(pattern=PROFILE_PATTERN)]
    kind: Literal["streetlight", "meter"]
    description: str = ""
    source: str = ""  # the vendor document the profile follows
    native_id: str = "{native_id}"  # template over the topic's {vars}
    messages: Annotated[list[Message], Field(min_length=1)]
    absent: list[str] = []  # contract fields this device cannot measure
    seq: SeqSpec | None = None
    merge: MergeSpec | None = None
    command: Command | None = None
    ack: AckSpec = AckSpec()

    @model_validator(mode="after")
    def _check(self) -> ProfileFile:
        model = KINDS[self.kind]
        names = set(model.model_fields) | {"energy_export_kwh"}
        for name in self.absent:
            if name not in model.model_fields or name in ("ts", "seq"):
                raise ValueError(f"absent: {name!r} is not a field of a {self.kind} reading")
        id_vars = set(TEMPLATE_VAR.findall(self.native_id))
        for i, m in enumerate(self.messages):
            for name, fm in m.fields.items():
                if name not in names or name in ("ts", "seq"):
                    raise ValueError(f"messages[{i}].fields: {name!r} is not a field of a "
                                     f"{self.kind} reading")
                if fm.unit:
                    try:
                        codecs.unit_factor(fm.unit, name)
                    except ValueError as e:
                        raise ValueError(f"messages[{i}].fields.{name}: {e}") from None
                if name in self.absent:
                    raise ValueError(f"messages[{i}].fields: {name} is also listed as absent")
            topic_vars = set(TEMPLATE_VAR.findall(m.topic))
            if m.native_id is None and not id_vars <= topic_vars and m.sparkplug != "NDEATH" \
                    and m.sparkplug != "NBIRTH":
                raise ValueError(f"messages[{i}].topic: the native id {self.native_id} needs "
                                 f"{sorted(id_vars - topic_vars)} from the topic (or give "
                                 "native_id: {path: ...})")
            if (m.format == "sparkplug") != (m.sparkplug is not None):
                raise ValueError(f"messages[{i}]: format sparkplug and sparkplug: <type> go "
                                 "together")
        if self.command is not None:
            used = set(TEMPLATE_VAR.findall(self.command.topic))
            extra = used - id_vars - {"native_id"}
            if extra:
                raise ValueError(f"command.topic: {sorted(extra)} are not in the native id "
                                 f"template {self.native_id}")
        return self


# --------------------------------------------------------------------------- topics


def _topic_regex(template: str) -> re.Pattern[str]:
    out, pos = "", 0
    for m in TEMPLATE_VAR.finditer(template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>[^/+#]+?)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + r"\Z")


def _topic_filter(template: str) -> str:
    return "/".join("+" if TEMPLATE_VAR.search(level) else level for level in template.split("/"))


# --------------------------------------------------------------------------- the profile


@dataclass
class _Compiled:
    message: Message
    regex: re.Pattern[str]


class Profile:
    """A loaded profile: decode native messages, encode commands. Keeps per-device memory
    (Sparkplug aliases, the last values for merging) in the instance: one per service."""

    def __init__(self, spec: ProfileFile, source: str = "<profile>"):
        self.spec = spec
        self.source = source
        self.name = spec.profile
        self.kind = spec.kind
        self._messages = [_Compiled(m, _topic_regex(m.topic)) for m in spec.messages]
        self._id_regex = _topic_regex(spec.native_id)
        model = self._model = KINDS[spec.kind]
        # What a reading of this kind must carry: the required fields and the measured ones,
        # less those the device has no sensor for (declared in the reading's `unmeasured`).
        self._required = [n for n, f in model.model_fields.items()
                          if (f.is_required() or n in model._measured)
                          and n not in ("ts", "seq") and n not in spec.absent]
        self._unmeasured = list(spec.absent)
        self._last: dict[str, dict[str, tuple[Any, int]]] = {}  # native id → field → (v, ts)
        from adapters.sparkplug import SparkplugState
        self._sparkplug = SparkplugState()

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, kind={self.kind!r}, from {self.source})"

    # ----------------------------------------------------------------- topics

    def subscriptions(self) -> list[str]:
        """MQTT topic filters covering every device of this profile."""
        seen: list[str] = []
        for c in self._messages:
            f = _topic_filter(c.message.topic)
            if f not in seen:
                seen.append(f)
        return seen

    def id_vars(self, native_id: str) -> dict[str, str]:
        m = self._id_regex.match(native_id)
        if not m:
            raise ValueError(f"{native_id!r} is not a native id of the form {self.spec.native_id}")
        return {"native_id": native_id, **m.groupdict()}

    def _fill(self, template: str, values: dict[str, str]) -> str:
        return TEMPLATE_VAR.sub(lambda m: values.get(m.group(1), "+"), template)

    def native_topics(self, native_id: str) -> tuple[list[str], list[str]]:
        """(what one device may publish, what it may subscribe to): per-device broker ACLs.

        A message whose native id comes from its payload cannot be narrowed to one device:
        its topic keeps ``+`` for the unknown levels.
        """
        values = self.id_vars(native_id)
        publish: list[str] = []
        for c in self._messages:
            t = self._fill(c.message.topic, values)
            if t not in publish:
                publish.append(t)
        subscribe = [self._fill(self.spec.command.topic, values)] if self.spec.command else []
        return publish, subscribe

    # ----------------------------------------------------------------- decoding

    def match(self, topic: str) -> tuple[Message, dict[str, str]] | None:
        for c in self._messages:
            m = c.regex.match(topic)
            if m:
                return c.message, m.groupdict()
        return None

    def decode(self, topic: str, payload: bytes, now_ms: int,
               pending: dict[str, Any] | None = None) -> Decoded:
        """One native message → contract readings (and state, status, acks).

        Raises :class:`DecodeError` for a message this profile cannot map.
        """
        found = self.match(topic)
        if found is None:
            raise DecodeError(NO_MAPPING, f"{topic!r} matches none of {self.name}'s topics "
                              f"({', '.join(m.message.topic for m in self._messages)})", topic)
        message, topic_vars = found
        try:
            if message.format == "sparkplug":
                from adapters.sparkplug import decode_sparkplug
                out = decode_sparkplug(self, message, topic_vars, payload, now_ms)
            else:
                out = self._decode_json(message, topic_vars, payload, now_ms)
        except DecodeError as e:
            e.topic = topic
            raise
        if pending is not None and out.state:
            ack = self.ack_for(pending, out.state, now_ms)
            if ack is not None:
                out.acks.append(ack)
        return out

    def _native_id(self, message: Message, topic_vars: dict[str, str], doc: Any) -> str:
        if message.native_id is not None:
            value = self._value(message.native_id, doc, "native_id")
            if value is None:
                raise DecodeError(MISSING_FIELD, f"native id: no {message.native_id.path!r} in "
                                  "the payload")
            return str(value)
        return TEMPLATE_VAR.sub(lambda m: topic_vars[m.group(1)], self.spec.native_id)

    def _decode_json(self, message: Message, topic_vars: dict[str, str], payload: bytes,
                     now_ms: int) -> Decoded:
        if message.format == "senml":
            return self._decode_senml(message, topic_vars, payload, now_ms)
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            raise DecodeError(NOT_JSON, f"payload is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise DecodeError(BAD_PAYLOAD, f"payload is a JSON {type(doc).__name__}, "
                              "not an object")
        for path, want in message.require.items():
            got = codecs.get_path(doc, path)
            if got != want:
                raise DecodeError(NO_MAPPING, f"{path} is {got!r} here, {want!r} expected "
                                  "(not a message this profile reads)")
        native_id = self._native_id(message, topic_vars, doc)
        values: dict[str, Any] = {}
        for name, fm in message.fields.items():
            v = self._value(fm, doc, name)
            if v is None:
                if fm.optional:
                    continue
                raise DecodeError(MISSING_FIELD, f"{name}: no {fm.path or fm.sum!r} in the "
                                  "payload")
            values[name] = v
        if message.passthrough:
            obj = codecs.get_path(doc, message.passthrough)
            if codecs.is_missing(obj) or not isinstance(obj, dict):
                raise DecodeError(MISSING_FIELD, f"no object at {message.passthrough!r}")
            known = set(KINDS[self.kind].model_fields) - {"ts", "seq"} - set(self.spec.absent)
            values.update({k: v for k, v in obj.items() if k in known})
        state = {name: v for name, fm in message.state.items()
                 if (v := self._value(fm, doc, name)) is not None}
        if "brightness_pct" in values and "brightness_pct" not in state:
            state["brightness_pct"] = values["brightness_pct"]
        out = Decoded(native_id, state=state, status=message.status)
        if not message.reading:
            return out
        ts = self._timestamp(message.timestamp, doc, now_ms)
        seq = None
        if self.spec.seq is not None:
            raw = codecs.get_path(doc, self.spec.seq.path)
            if codecs.is_missing(raw) or not isinstance(raw, int) or isinstance(raw, bool):
                raise DecodeError(MISSING_FIELD, f"seq: no integer at {self.spec.seq.path!r}")
            seq = raw
        self._emit(out, values, ts, seq)
        return out

    def _decode_senml(self, message: Message, topic_vars: dict[str, str], payload: bytes,
                      now_ms: int) -> Decoded:
        """A SenML pack whose record names are contract fields (the contract's decoder)."""
        native_id = self._native_id(message, topic_vars, {})
        try:
            readings = decode_readings(self.kind, _with_seq(payload), now_ms=now_ms)
        except ContractError as e:
            reason = {"not_json": NOT_JSON, "missing_field": MISSING_FIELD}.get(e.reason,
                                                                                 BAD_PAYLOAD)
            raise DecodeError(reason, e.detail) from None
        out = Decoded(native_id)
        for r in readings:
            values = r.fields()
            values.pop("seq", None)
            out.readings.append(self._finish(values, r.ts_ms, None))
        if out.readings and "brightness_pct" in out.readings[-1]:
            out.state["brightness_pct"] = out.readings[-1]["brightness_pct"]
        return out

    def _value(self, fm: FieldMap, doc: Any, name: str) -> Any:
        """One mapped value, converted; None when the payload does not have it."""
        if fm.const is not None:
            return fm.const
        if fm.sum is not None:
            parts = [codecs.get_path(doc, p) for p in fm.sum]
            if any(codecs.is_missing(p) or p is None for p in parts):
                return None
            try:
                raw: Any = sum(codecs.as_number(p, f"{name} ({path})")
                               for p, path in zip(parts, fm.sum, strict=True))
            except ValueError as e:
                raise DecodeError(BAD_PAYLOAD, str(e)) from None
        else:
            raw = codecs.get_path(doc, fm.path) if fm.path else codecs._MISSING
            if codecs.is_missing(raw) or raw is None:
                return None
        return self._convert(fm, raw, name)

    def _convert(self, fm: FieldMap, raw: Any, name: str) -> Any:
        if fm.map is not None:
            key = str(raw).lower() if isinstance(raw, bool) else str(raw)
            if key not in fm.map:
                raise DecodeError(BAD_PAYLOAD, f"{name}: {raw!r} is not one of "
                                  f"{sorted(fm.map)}")
            return fm.map[key]
        if fm.unit is None and fm.scale is None:
            if isinstance(raw, str) and name in codecs.CONTRACT_UNITS:
                try:
                    return codecs.as_number(raw, name)
                except ValueError as e:
                    raise DecodeError(BAD_PAYLOAD, str(e)) from None
            return raw
        try:
            number = codecs.as_number(raw, f"{name} ({fm.path or fm.metric or fm.sum})")
        except ValueError as e:
            raise DecodeError(BAD_PAYLOAD, str(e)) from None
        factor = codecs.unit_factor(fm.unit, name) if fm.unit else 1.0
        return round(number * factor * (fm.scale if fm.scale is not None else 1.0), 9)

    def _timestamp(self, spec: TimeSpec, doc: Any, now_ms: int) -> int:
        if spec.source == "receipt":
            return now_ms
        raw = codecs.get_path(doc, spec.path)
        if codecs.is_missing(raw) or raw is None:
            raise DecodeError(MISSING_FIELD, f"timestamp: no {spec.path!r} in the payload")
        try:
            return codecs.parse_time(raw, spec.format, spec.timezone, f"timestamp ({spec.path})")
        except ValueError as e:
            raise DecodeError(BAD_PAYLOAD, str(e)) from None

    def _emit(self, out: Decoded, values: dict[str, Any], ts: int, seq: int | None) -> None:
        """Merge with the device's last values (when the profile merges) and emit a reading."""
        if self.spec.merge is not None and out.native_id is not None:
            last = self._last.setdefault(out.native_id, {})
            for k, v in values.items():
                last[k] = (v, ts)
            max_age = self.spec.merge.max_age_s * 1000
            values = {k: v for k, (v, when) in last.items() if ts - when <= max_age}
            missing = [n for n in self._required if n not in values]
            if missing:
                out.held = (f"waiting for {', '.join(missing)} (sent on another topic) before "
                            "a complete reading")
                return
        else:
            missing = [n for n in self._required if n not in values]
            if missing:
                raise DecodeError(MISSING_FIELD, f"the profile maps no {', '.join(missing)} "
                                  f"for this message, and a {self.kind} reading needs them")
        out.readings.append(self._finish(values, ts, seq))

    def _finish(self, values: dict[str, Any], ts: int, seq: int | None) -> dict[str, Any]:
        reading = {"ts": ts, "seq": ts if seq is None else seq, **values}
        if self._unmeasured:
            reading["unmeasured"] = self._unmeasured
        try:
            validate_reading(self.kind, reading)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"]) or "reading"
            reason = MISSING_FIELD if err["type"] == "missing" else BAD_PAYLOAD
            raise DecodeError(reason, f"{where}: {err['msg']} (got {err.get('input')!r})"
                              ) from None
        return reading

    # ----------------------------------------------------------------- commands and acks

    def encode_command(self, native_id: str, command: dict[str, Any]) -> list[tuple[str, bytes]]:
        """A contract command (citygrid.contract.Command as a dict) → native (topic, payload)s."""
        spec = self.spec.command
        if spec is None:
            raise DecodeError(NO_MAPPING, f"profile {self.name} has no command: this device "
                              "takes no commands")
        if "brightness_pct" not in command:
            raise DecodeError(MISSING_FIELD, "the command has no brightness_pct")
        id_vars = self.id_vars(native_id)
        values = codecs.command_vars(native_id, command, id_vars)
        topic = TEMPLATE_VAR.sub(lambda m: str(values[m.group(1)]), spec.topic)
        if spec.format == "sparkplug":
            from adapters.sparkplug import encode_dcmd
            metrics = {name: codecs.render(t, values) for name, t in spec.metrics.items()}
            return [(topic, encode_dcmd(metrics, int(command.get("ts") or 0)))]
        body = codecs.render(spec.payload, values)
        data = body.encode() if isinstance(body, str) else orjson.dumps(body)
        return [(topic, data)]

    def ack_for(self, pending: dict[str, Any], state: dict[str, Any], now_ms: int
                ) -> dict[str, Any] | None:
        """The contract ack a state report gives a pending command, or None (not yet).

        A report whose level is within ``ack.tolerance`` of the commanded level confirms the
        command; an explicit failure in the state (``ok: false``) refuses it.
        """
        if state.get("ok") is False:
            return {"id": pending["id"], "ts": now_ms, "ok": False,
                    "brightness_pct": float(state.get("brightness_pct",
                                                      pending["brightness_pct"])),
                    "error": str(state.get("error") or "the device refused the command")[:256]}
        level = state.get("brightness_pct")
        if level is None:
            return None
        if abs(float(level) - float(pending["brightness_pct"])) <= self.spec.ack.tolerance:
            return {"id": pending["id"], "ts": now_ms, "brightness_pct": float(level),
                    "ok": True}
        return None


def _with_seq(payload: bytes) -> bytes:
    """A SenML pack with a ``seq`` record at each of its times (the contract requires one;
    the adapter sets it from ts afterwards). Anything odd is left to the contract's decoder."""
    try:
        pack = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload
    if not isinstance(pack, list) or not all(isinstance(r, dict) for r in pack):
        return payload
    bt, times, has_seq = 0.0, [], False
    for r in pack:
        bt = r.get("bt", bt)
        if not isinstance(bt, int | float):
            return payload
        if str(r.get("n", "")).endswith("seq"):
            has_seq = True
        if "n" in r or any(k in r for k in ("v", "vb", "vs")):
            t = r.get("t", 0)
            if isinstance(t, int | float) and bt + t not in times:
                times.append(bt + t)
    if has_seq or not times:
        return payload
    return orjson.dumps(pack + [{"n": "seq", "v": 0, "t": when - bt} for when in times])


# --------------------------------------------------------------------------- loading


def parse_profile(text: str, name: str = "<profile>") -> Profile:
    try:
        data, marks = parse(text, name)
        if not isinstance(data, dict):
            raise ConfigError([ConfigProblem(name, 1, 1, "a profile is a mapping with "
                                             "'profile:', 'kind:' and 'messages:'")])
        spec = validate(ProfileFile, data, marks, name)
    except ConfigError as e:
        raise ProfileError(e.problems) from None
    return Profile(spec, name)  # type: ignore[arg-type]


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError([ConfigProblem(str(path), 1, 1, f"cannot read: {e}")]) from None
    return parse_profile(text, str(path))


def profile_files(directory: str | Path) -> list[Path]:
    """Profile files in a folder: ``*.yaml`` except the ``*.test.yaml`` test files."""
    return sorted(p for p in Path(directory).glob("*.yaml") if not p.name.endswith(".test.yaml"))


def load_profiles(directory: str | Path | None = None) -> dict[str, Profile]:
    """The shipped profiles, plus (or overridden by) those in an operator's ``directory``.

    Every problem in every file is reported at once.
    """
    dirs = [SHIPPED] + ([Path(directory)] if directory is not None else [])
    out: dict[str, Profile] = {}
    problems: list[ConfigProblem] = []
    for d in dirs:
        if not d.is_dir():
            problems.append(ConfigProblem(str(d), 1, 1, "not a folder of profiles"))
            continue
        seen: dict[str, str] = {}
        for f in profile_files(d):
            try:
                p = load_profile(f)
            except ProfileError as e:
                problems += e.problems
                continue
            if p.name in seen:
                problems.append(ConfigProblem(str(f), 1, 1, f"profile {p.name!r} is also "
                                              f"defined in {seen[p.name]}"))
            seen[p.name] = str(f)
            out[p.name] = p  # an operator's profile of the same name overrides the shipped one
    if problems:
        raise ProfileError(problems)
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
