"""MQTT device contract v1 (DESIGN.md §2): topics, payload models, decoding.

Lenient with devices (unknown fields are dropped), strict with what we know:
a known field with the wrong type, NaN/Infinity or an impossible value is
rejected with a :class:`ContractError` that says which field and why.
"""

from __future__ import annotations

import decimal
import math
import re
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, NamedTuple

import orjson
import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

CONTRACT_VERSION = "v1"
TOPIC_ROOT = "city"
CHANNELS = ("telemetry", "cmd", "ack", "status", "settlement", "override")
ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ID = re.compile(ID_PATTERN)

# Readings older than 2000 or beyond 2100 are clock faults, not measurements.
TS_MIN_MS = 946_684_800_000
TS_MAX_MS = 4_102_444_800_000
MAX_PAYLOAD_BYTES = 16 * 1024
# Readings from the future are clock faults too; ten minutes allow for devices' clock drift.
MAX_AHEAD_MS = 10 * 60 * 1000

# Dead-letter reasons: stable names, counted per reason.
BAD_TOPIC = "bad_topic"
UNKNOWN_KIND = "unknown_kind"
OVERSIZE = "oversize"
NOT_JSON = "not_json"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"
WRONG_TYPE = "wrong_type"
MISSING_FIELD = "missing_field"
BAD_SENML = "bad_senml"
BAD_UNIT = "bad_unit"
STORE_REJECTED = "store_rejected"
REASONS = (BAD_TOPIC, UNKNOWN_KIND, OVERSIZE, NOT_JSON, NON_FINITE, OUT_OF_RANGE,
           WRONG_TYPE, MISSING_FIELD, BAD_SENML, BAD_UNIT, STORE_REJECTED)
# Not a contract error but the inventory's: a device the registry does not know (ingest's
# quarantine, the adapters' unknown native id). Dead-lettered with this reason.
UNKNOWN_DEVICE = "unknown_device"


class ContractError(ValueError):
    """A message that breaks the contract; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str, topic: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic


# --------------------------------------------------------------------------- topics


@dataclass(frozen=True, slots=True)
class Topic:
    """``city/v1/{district}/{kind}/{device_id}/{channel}`` as a value."""

    district: str
    kind: str
    device_id: str
    channel: str = "telemetry"

    def __post_init__(self) -> None:
        for name in ("district", "device_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ID.fullmatch(value):
                raise ContractError(
                    BAD_TOPIC, f"{name} {value!r} must match {ID_PATTERN} (no '+', '#' or '/')"
                )
        if self.kind not in KINDS:
            raise ContractError(UNKNOWN_KIND, f"kind {self.kind!r} is not one of {sorted(KINDS)}")
        if self.channel not in CHANNELS:
            raise ContractError(BAD_TOPIC, f"channel {self.channel!r} is not one of {CHANNELS}")

    def __str__(self) -> str:
        return (f"{TOPIC_ROOT}/{CONTRACT_VERSION}/{self.district}/{self.kind}/"
                f"{self.device_id}/{self.channel}")

    def with_channel(self, channel: str) -> Topic:
        return Topic(self.district, self.kind, self.device_id, channel)

    @classmethod
    def parse(cls, topic: str) -> Topic:
        parts = topic.split("/")
        if len(parts) != 6 or parts[0] != TOPIC_ROOT or parts[1] != CONTRACT_VERSION:
            raise ContractError(
                BAD_TOPIC,
                f"{topic!r} is not {TOPIC_ROOT}/{CONTRACT_VERSION}/"
                "{district}/{kind}/{device_id}/{channel}",
                topic,
            )
        try:
            return cls(parts[2], parts[3], parts[4], parts[5])
        except ContractError as e:
            e.topic = topic
            raise


def topic_filter(channel: str = "telemetry", district: str = "+", kind: str = "+") -> str:
    """A subscription filter over the contract's topics."""
    return f"{TOPIC_ROOT}/{CONTRACT_VERSION}/{district}/{kind}/+/{channel}"


# --------------------------------------------------------------------------- payload models


def _to_epoch_ms(value: int | str) -> int:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an RFC 3339 time like 2026-11-28T06:30:00Z") from None
        if parsed.tzinfo is None:
            raise ValueError("RFC 3339 time needs an offset (Z for UTC)")
        value = int(parsed.timestamp() * 1000)
    if not TS_MIN_MS <= value <= TS_MAX_MS:
        raise ValueError("epoch milliseconds outside 2000-01-01..2100-01-01")
    return value


_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)
NonNeg = Annotated[float, Field(ge=0)]
Percent = Annotated[float, Field(ge=0, le=100)]
# Plausibility bounds: beyond these a value is a device or decoding fault, not a measurement.
INT64_MAX = 2**63 - 1  # InfluxDB's integers
Power = Annotated[float, Field(ge=0, le=1_000_000)]  # 1 MW: more than any luminaire or meter
Register = Annotated[float, Field(ge=0, le=1e12)]
Lux = Annotated[float, Field(ge=0, le=200_000)]  # full sun is ~120,000 lx
Timestamp = Annotated[
    int | str,
    Field(description="Measurement time: RFC 3339 UTC string or integer epoch milliseconds."),
]


def _measured_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """JSON Schema for "required unless listed in ``unmeasured``", one clause per field."""
    measured = getattr(model, "_measured", ())
    schema["required"] = [n for n in schema.get("required", []) if n not in measured]
    schema["allOf"] = [{"anyOf": [
        {"required": [name]},
        {"required": ["unmeasured"], "properties": {"unmeasured": {"contains": {"const": name}}}},
    ]} for name in getattr(model, "_measured", ())]
    if not schema["allOf"]:
        del schema["allOf"]


class _Declared(BaseModel):
    """What a kind's *declared* model adds (a reading with ``unmeasured``): its measured fields
    may be absent, but only those it lists."""

    @model_validator(mode="after")
    def _measured_or_declared(self) -> _Declared:
        measured: tuple[str, ...] = getattr(self, "_measured", ())
        declared = getattr(self, "unmeasured", None) or ()
        unknown = [n for n in declared if n not in measured]
        if unknown:
            raise ValueError(f"unmeasured: {', '.join(map(repr, unknown))} cannot be "
                             f"unmeasured (only {', '.join(measured) or 'none'})")
        missing = [n for n in measured if getattr(self, n) is None and n not in declared]
        if missing:
            raise PydanticCustomError(
                "missing", "{fields}: field required (a device without the sensor lists it "
                "in unmeasured)", {"fields": ", ".join(missing)})
        return self


class Reading(BaseModel):
    """Fields every reading carries."""

    model_config = ConfigDict(**_STRICT, json_schema_extra=_measured_schema)
    kind: ClassVar[str]
    _optional: ClassVar[tuple[str, ...]] = ()

    # Fields the kind requires unless the device declares it cannot measure them: a reading
    # with `unmeasured` is validated by the kind's declared model (`_declared`), where they
    # may be absent; every other reading by the kind's own, strict and fast.
    _measured: ClassVar[tuple[str, ...]] = ()
    _declared: ClassVar[type[Reading] | None] = None

    ts: Timestamp
    seq: Annotated[int, Field(ge=0, le=INT64_MAX,
                              description="Increases by one per message per device.")]
    unmeasured: Annotated[list[str], Field(
        max_length=8, description="Fields this device has no sensor for (a zigbee bulb has "
        "no lux sensor): they are absent, never invented, and a rule condition on one is "
        "false. Only the kind's measured fields may be listed.")] | None = None

    @field_validator("ts")
    @classmethod
    def _ts(cls, value: int | str) -> int:
        return _to_epoch_ms(value)

    @property
    def ts_ms(self) -> int:
        return self.ts  # type: ignore[return-value]  # normalised by the validator

    def fields(self) -> dict[str, Any]:
        """The values to store: everything but ``ts``, absent optional fields left out."""
        values = self.__dict__.copy()  # on the ingest hot path: cheaper than a comprehension
        del values["ts"]
        del values["unmeasured"]  # what the device lacks is no value to store
        for name in self._optional:
            if values[name] is None:
                del values[name]
        return values


KINDS: dict[str, type[Reading]] = {}


def _optional_of(info: Any) -> Any:
    """A field's type with its constraints, or None."""
    ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return ann | None


def validate_reading(kind: str, values: dict[str, Any]) -> Reading:
    """A reading from a JSON object's values (the adapters' output): the kind's model, or its
    declared one when the object lists ``unmeasured``. Raises ValidationError."""
    model = KINDS[kind]
    if model._declared is not None and values.get("unmeasured"):
        return model._declared.model_validate(values)
    return model.model_validate(values)


def register_kind(name: str):
    """Register a device kind's reading model under its topic name."""

    def wrap(model: type[Reading]) -> type[Reading]:
        model.kind = name
        model._optional = tuple(k for k, f in model.model_fields.items()
                                if not f.is_required() and k != "unmeasured")
        if model._measured:
            declared = create_model(f"{model.__name__}Declared", __base__=(model, _Declared),
                                    **{n: (_optional_of(model.model_fields[n]), None)
                                       for n in model._measured})
            declared.kind = name
            declared._optional = (*model._optional, *model._measured)
            model._declared = declared
        KINDS[name] = model
        return model

    return wrap


@register_kind("streetlight")
class StreetlightReading(Reading):
    """A streetlight's reading: its output, consumption and what its sensors see."""

    _measured = ("power_w", "energy_wh", "lux", "motion")

    brightness_pct: Annotated[Percent, Field(description="Current light output, %.")]
    power_w: Annotated[Power, Field(description="Electrical power now, W. Required unless "
                                    "listed in unmeasured.")]
    energy_wh: Annotated[Register, Field(description="Cumulative energy register, Wh. "
                                         "Required unless listed in unmeasured.")]
    lux: Annotated[Lux, Field(description="Ambient light, lx. Required unless listed in "
                              "unmeasured.")]
    motion: Annotated[bool, Field(description="Presence detected during the interval. "
                                  "Required unless listed in unmeasured.")]
    motion_count: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    temp_c: Annotated[float, Field(ge=-60, le=90)] | None = None
    no2_ugm3: NonNeg | None = None
    pm25_ugm3: NonNeg | None = None
    fault: Annotated[str, Field(max_length=64, description="e.g. lamp_failure")] | None = None


@register_kind("meter")
class MeterReading(Reading):
    """An electricity meter's reading."""

    _measured = ("power_w",)

    energy_kwh: Annotated[Register, Field(description="Cumulative import register, kWh.")]
    power_w: Annotated[Power, Field(description="Import power now, W. Required unless listed "
                                    "in unmeasured.")]
    energy_export_kwh: Annotated[Register, Field(
        description="Cumulative export register (solar back-feed), kWh.")] | None = None
    voltage_v: Annotated[float, Field(ge=0, le=1000)] | None = None


class Command(BaseModel):
    """Platform → streetlight: the level to apply and the reason that won."""

    model_config = _STRICT
    id: Annotated[str, Field(min_length=1, max_length=128)]
    ts: Timestamp
    brightness_pct: Percent
    reason: Annotated[str, Field(min_length=1, max_length=128,
                                 description="e.g. rule:motion-boost, override:operator")]
    hold_s: Annotated[float, Field(ge=0)] | None = None


class Ack(BaseModel):
    """Device → platform: the command was applied (or not) and the level now."""

    model_config = _STRICT
    id: Annotated[str, Field(min_length=1, max_length=128)]
    ts: Timestamp
    brightness_pct: Percent
    ok: bool
    error: Annotated[str, Field(max_length=256)] | None = None


class Settlement(BaseModel):
    """Platform → world: a meter's consumption billed (one hash-chained ledger entry)."""

    model_config = _STRICT
    seq: Annotated[int, Field(ge=1, description="Position in the ledger.")]
    key: Annotated[str, Field(description="Idempotency key: meter:from_ms:to_ms.")]
    meter: str
    account: str
    tariff: str
    period: Annotated[str, Field(description="YYYY-MM in the city's timezone.")]
    from_ms: int
    to_ms: int
    kwh: Annotated[str, Field(description="Decimal kWh imported and billed, e.g. 10.042000 "
                                          "(under net metering, net of export).")]
    energy_amount: Annotated[str, Field(description="Exact price of the energy (with grid "
                                                    "charges and export credit), currency units.")]
    standing_charge: str
    amount_minor: Annotated[int, Field(description="Debited, in minor units (øre, cents).")]
    currency: str
    settled_at_ms: int
    lines: Annotated[list[dict[str, str]] | None, Field(
        description="The bill's parts (docs/tariffs.md): kind (energy|grid|export|fixed|"
                    "demand), label, quantity, unit (kWh|day|month|kW|carry), unit_price and "
                    "amount (decimal, excluding VAT; export credit negative, credit carried "
                    "forward positive).")] = None
    net_amount: Annotated[str | None, Field(description="Sum of the lines, excl. VAT.")] = None
    vat_rate: Annotated[str | None, Field(description="The tariff's VAT rate, e.g. 0.25.")] = None
    vat_amount: Annotated[str | None, Field(description="net_amount × vat_rate.")] = None
    export_kwh: Annotated[str | None, Field(description="Decimal kWh exported and credited "
                                                        "(or netted).")] = None
    balance_after_minor: int
    prev_hash: Annotated[str, Field(description="SHA-256 of the previous entry.")]
    hash: Annotated[str, Field(description="SHA-256 of this entry's canonical encoding "
                                           "(sorted keys, no whitespace), without `hash`.")]


class Override(BaseModel):
    """Gateway → rule engine: an operator's level for a light (or its end: ``clear``)."""

    model_config = _STRICT
    level: Percent | None = None
    expires_in_s: Annotated[float, Field(gt=0)] | None = None
    who: Annotated[str, Field(min_length=1, max_length=64)] = "operator"
    clear: bool = False


class Status(BaseModel):
    """Retained device presence; the Last Will sets ``online`` to false."""

    model_config = _STRICT
    online: bool


# --------------------------------------------------------------------------- decoding

_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "too_long", "too_short", "string_too_long", "string_too_short"}


def _error_from(e: ValidationError, topic: str | None, prefix: str = "") -> ContractError:
    first = e.errors(include_url=False)[0]
    kind = first["type"]
    if kind == "json_invalid":
        return ContractError(NOT_JSON, first["msg"], topic)
    if kind == "finite_number":
        reason = NON_FINITE
    elif kind == "missing":
        reason = MISSING_FIELD
    elif kind in _RANGE_ERRORS or (kind == "value_error" and first["loc"] == ("ts",)):
        reason = OUT_OF_RANGE
    else:
        reason = WRONG_TYPE
    parts = []
    for err in e.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return ContractError(reason, prefix + "; ".join(parts) + more, topic)


def decode_readings(kind: str, payload: bytes, topic: str | None = None, *,
                    now_ms: int | None = None) -> list[Reading]:
    """Decode one telemetry message: a JSON object or a SenML pack (RFC 8428).

    With ``now_ms`` (the platform's clock: ingest and the rule engine pass it), a reading
    more than MAX_AHEAD_MS ahead of it is refused as a clock fault, and a SenML pack's
    relative times (RFC 8428 §4.5.3) are resolved against it; without it they are refused.
    """
    readings = _decode(kind, payload, topic, now_ms)
    if now_ms is not None:
        for r in readings:
            if r.ts > now_ms + MAX_AHEAD_MS:
                raise ContractError(OUT_OF_RANGE, f"ts: {(r.ts - now_ms) / 60_000:.0f} minutes "
                                    "ahead of the platform's clock (a device clock fault?)",
                                    topic)
    return readings


def _decode(kind: str, payload: bytes, topic: str | None,
            now_ms: int | None) -> list[Reading]:
    model = KINDS.get(kind)
    if model is None:
        raise ContractError(UNKNOWN_KIND, f"kind {kind!r} is not one of {sorted(KINDS)}", topic)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(OVERSIZE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}", topic)
    start = payload.lstrip()[:1]
    if start == b"[":
        return _decode_senml(model, payload, topic, now_ms)
    if start != b"{":
        raise ContractError(NOT_JSON, "payload must be a JSON object or a SenML array", topic)
    fast = _FAST.get(kind)
    if fast is not None:
        reading = fast(payload)
        if reading is not None:
            return [reading]
    try:
        return [model.model_validate_json(payload)]
    except ValidationError as e:
        if model._declared is not None and b'"unmeasured"' in payload:
            # A device that lists what it cannot measure (the rare case: adapters' devices).
            try:
                return [model._declared.model_validate_json(payload)]
            except ValidationError as declared:
                raise _error_from(declared, topic) from None
        raise _error_from(e, topic) from None


# --------------------------------------------------------------------------- the fast path

class FastReading:
    """A valid JSON-object reading decoded without a model object (the hot path: ingest, the
    rule engine, the feeds). It answers what a ``Reading`` does there: ``ts``, ``ts_ms``,
    ``fields()`` (a new dict per reading, the caller's to keep) and each field by name."""

    __slots__ = ("ts", "_fields", "_names")

    def __init__(self, ts: int, fields: dict[str, Any], names: frozenset[str]):
        self.ts, self._fields, self._names = ts, fields, names

    @property
    def ts_ms(self) -> int:
        return self.ts

    def fields(self) -> dict[str, Any]:
        return self._fields

    def __getattr__(self, name: str) -> Any:
        if name in self._names:
            return self._fields.get(name)
        raise AttributeError(name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FastReading | Reading):
            return self.ts == other.ts and self._fields == other.fields()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like the frozen models' field dicts


def _field_spec(model: type[Reading], name: str) -> tuple | None:
    """(type, ge, le, max_len, required) of a simple field, or None if the fast path cannot
    check it exactly as the model does."""
    from annotated_types import Ge, Le, MaxLen

    info = model.model_fields[name]
    annotation, metadata = info.annotation, list(info.metadata)
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[Annotated[T, FieldInfo(...)]]
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return None
        annotation = inner[0]
        if typing.get_origin(annotation) is Annotated:
            annotation, *extra = typing.get_args(annotation)
            for e in extra:
                metadata += getattr(e, "metadata", [])
    if annotation not in (float, int, bool, str):
        return None
    ge = le = max_len = None
    for m in metadata:
        if isinstance(m, Ge):
            ge = m.ge
        elif isinstance(m, Le):
            le = m.le
        elif isinstance(m, MaxLen):
            max_len = m.max_length
        else:
            return None
    return annotation, ge, le, max_len, info.is_required()


def _fast_decoder(model: type[Reading]):
    """A decoder that takes a reading the model would take and returns exactly its
    ``fields()`` and ``ts`` — or None for anything else (then the model decides, and names
    the problem). It is stricter, never looser: a property test holds it to the model."""
    specs = []
    for name in model.model_fields:
        if name in ("ts", "unmeasured"):
            continue
        spec = _field_spec(model, name)
        if spec is None:
            return None
        specs.append((name, *spec))
    names = frozenset(n for n, *_ in specs)
    required = [(n, k, ge, le, ml) for n, k, ge, le, ml, req in specs if req]
    optional = [(n, k, ge, le, ml) for n, k, ge, le, ml, req in specs if not req]
    plain = len(required) + 1  # the keys of a reading with no optional field: these and ts
    loads = orjson.loads

    def decode(payload: bytes) -> FastReading | None:
        try:
            d = loads(payload)
        except orjson.JSONDecodeError:
            return None
        if type(d) is not dict:
            return None
        ts = d.get("ts")
        if type(ts) is not int or not TS_MIN_MS <= ts <= TS_MAX_MS:
            return None
        fields = {}
        for name, kind, ge, le, max_len in required:
            v = d.get(name)
            t = type(v)
            if kind is float:
                if t is int:
                    v = float(v)
                elif t is not float:
                    return None
            elif t is not kind:  # int, bool and str as themselves (bool is no int here)
                return None
            if (ge is not None and v < ge) or (le is not None and v > le):
                return None
            if max_len is not None and len(v) > max_len:
                return None
            fields[name] = v
        if len(d) == plain:  # nothing else in it (the common case): done
            return FastReading(ts, fields, names)
        if "unmeasured" in d:
            return None
        for name, kind, ge, le, max_len in optional:
            v = d.get(name)
            if v is None:
                continue
            t = type(v)
            if kind is float:
                if t is int:
                    v = float(v)
                elif t is not float:
                    return None
            elif t is not kind:
                return None
            if (ge is not None and v < ge) or (le is not None and v > le):
                return None
            if max_len is not None and len(v) > max_len:
                return None
            fields[name] = v
        return FastReading(ts, fields, names)

    return decode


_FAST: dict[str, Any] = {}


def _build_fast() -> None:
    for kind, model in KINDS.items():
        decoder = _fast_decoder(model)
        if decoder is not None:
            _FAST[kind] = decoder


def validate_command(payload: bytes) -> Command:
    try:
        return Command.model_validate_json(payload)
    except ValidationError as e:
        raise _error_from(e, None) from None


# --------------------------------------------------------------------------- SenML (RFC 8428)

SENML_VERSION = 10  # RFC 8428's version number; older (draft) versions read the same
SENML_SECONDARY_UNITS = 1 << 4  # RFC 9100 §4: the "Secondary Units" feature bit (bver 26)
RELATIVE_TIME_LIMIT = 2**28  # RFC 8428 §4.5.3: a resolved time below it is relative to "now"
_VALUE_LABELS = ("v", "vb", "vs", "vd")
_BASE_LABELS = ("bn", "bt", "bu", "bv", "bs", "bver")
# Arithmetic on the numbers as the device wrote them (4211 + 0.07 is 4211.07, not
# 4211.070000000001); no traps, so NaN and infinities flow on to be refused as non_finite.
_DECIMAL = decimal.Context(prec=34, traps=[])


class SenMLRecord(NamedTuple):
    """One record of a pack, resolved as RFC 8428 §4.6 says: its base fields applied.

    ``label`` names the value field (``v``, ``vb``, ``vs`` or ``vd``) and ``value`` holds it,
    ``bv`` added to a ``v``; ``label`` is None for a record that carries only a sum. ``ts_ms``
    is the time (bt + t) in epoch milliseconds, a relative time resolved against the time of
    receipt. ``index`` is the record's position in the pack, for error details.
    """

    index: int
    name: str
    ts_ms: int
    unit: str | None
    label: str | None
    value: Any
    sum: Any = None
    unit_from_base: bool = False  # the unit is the pack's bu, not the record's own u


def _is_number(x: Any) -> bool:
    return type(x) is float or type(x) is int  # JSON's numbers; not bool, an int subclass


def _decimal(x: int | float) -> decimal.Decimal:
    return decimal.Decimal(x) if isinstance(x, int) else decimal.Decimal(repr(x))


def _plus(base: int | float | None, x: Any) -> Any:
    """``base + x`` for a base field (RFC 8428 §4.5.4): exact, then the nearest float.

    No base leaves ``x`` as sent; integers stay integers (``seq``); anything but a number
    is left as it is, for the reading's model to refuse with its field's name.
    """
    if base is None or not _is_number(x):
        return x
    if isinstance(base, int) and isinstance(x, int):
        return base + x
    return float(_DECIMAL.add(_decimal(base), _decimal(x)))


def _senml_error(detail: str, topic: str | None) -> ContractError:
    return ContractError(BAD_SENML, detail, topic)


@dataclass(slots=True)
class _Bases:
    """The base fields in force while a pack is read (RFC 8428 §4.1): each holds from the
    record that sets it until a later record changes it."""

    name: str = ""
    time: int | float = 0
    unit: str | None = None
    value: int | float | None = None
    sum: int | float | None = None
    version: int | None = None  # None: no record has been read yet

    def update(self, i: int, record: dict[str, Any], topic: str | None) -> None:
        """Take the base fields record ``i`` sets; BAD_SENML for one of the wrong type."""
        if "bver" in record:
            self.version = _check_version(i, record["bver"], self.version, topic)
        elif self.version is None:
            self.version = SENML_VERSION
        if "bn" in record:
            self.name = _typed(i, record, "bn", str, "a string", topic)
        if "bt" in record:
            self.time = _typed(i, record, "bt", int | float, "a number", topic)
        if "bu" in record:
            self.unit = _typed(i, record, "bu", str, "a string", topic)
        if "bv" in record:
            self.value = _typed(i, record, "bv", int | float, "a number", topic)
        if "bs" in record:
            self.sum = _typed(i, record, "bs", int | float, "a number", topic)


def _typed(i: int, record: dict[str, Any], label: str, kind: Any, what: str,
           topic: str | None) -> Any:
    value = record[label]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _senml_error(f"record {i}: {label} must be {what}, not {value!r}", topic)
    return value


def _check_version(i: int, bver: Any, version: int | None, topic: str | None) -> int:
    """The pack's version from record ``i`` on: RFC 8428 §4.4 says all records carry one
    version and a reader MUST NOT use a pack newer than it understands. CityGrid reads
    version 10 and, with RFC 9100's feature bits, 26 (10 plus secondary units, which it
    converts); any other feature bit is refused. Older (draft) versions read as 10.
    """
    if not isinstance(bver, int) or isinstance(bver, bool) or bver < 1:
        raise _senml_error(f"record {i}: bver must be a positive integer, not {bver!r}", topic)
    if bver > SENML_VERSION and bver != SENML_VERSION | SENML_SECONDARY_UNITS:
        raise _senml_error(
            f"record {i}: SenML version {bver} is not one CityGrid reads (10, or 26 for "
            "secondary units, RFC 9100); a reader must not use a newer pack (RFC 8428 §4.4)",
            topic)
    if version is not None and bver != version:
        raise _senml_error(f"record {i}: bver {bver}, but the records before it are version "
                           f"{version}: all records of a pack have one version "
                           "(RFC 8428 §4.4)", topic)
    return bver


def _resolve_ms(i: int, base_time: int | float, t: int | float, now_ms: int | None,
                topic: str | None) -> int:
    """bt + t in epoch milliseconds (RFC 8428 §4.5.3); below 2**28 s it is relative to now."""
    when = _DECIMAL.add(_decimal(base_time), _decimal(t))
    when_ms = _DECIMAL.multiply(when, 1000)
    if not math.isfinite(float(when_ms)):  # SenML times are IEEE doubles (RFC 8428 §5)
        raise _senml_error(f"record {i}: its time bt + t is not a finite number", topic)
    ms = int(when_ms.to_integral_value(decimal.ROUND_HALF_EVEN))
    if when >= RELATIVE_TIME_LIMIT:
        return ms
    if now_ms is None:
        raise _senml_error(f"record {i}: relative time {when}s (below 2**28, RFC 8428 §4.5.3) "
                           "needs the time of receipt, which this decoder was not given; "
                           "send absolute times (bt/t in epoch seconds)", topic)
    return now_ms + ms


def resolve_senml(pack: list[Any], now_ms: int | None = None,
                  topic: str | None = None) -> list[SenMLRecord]:
    """The records of a SenML pack, resolved (RFC 8428 §4.1–4.6); ContractError(BAD_SENML)
    for a pack that breaks RFC 8428.

    Base fields apply to their record and every later one until changed: ``bn`` is prepended
    to ``n``, ``bt`` added to ``t``, ``bu`` is the unit of records without ``u``, ``bv`` is
    added to ``v`` and ``bs`` to ``s``. A resolved time below 2**28 s is relative to "now",
    here ``now_ms``, the time of receipt (without it such a pack is refused). A record with
    base fields only sets them; labels ending in ``_`` must be understood (§4.4), so they are
    refused; others unknown are ignored.
    """
    if not pack:
        raise _senml_error("empty SenML pack", topic)
    resolved: list[SenMLRecord] = []
    bases = _Bases()
    times: dict[tuple[Any, Any], int] = {}  # (bt, t) → ms: most records share one time
    for i, record in enumerate(pack):
        if not isinstance(record, dict):
            raise _senml_error(f"record {i} is not an object", topic)
        for label in record:
            if label.endswith("_"):
                raise _senml_error(f"record {i}: {label!r} must be understood "
                                   "(RFC 8428 §4.4) and CityGrid does not know it", topic)
        bases.update(i, record, topic)
        labels = [k for k in _VALUE_LABELS if k in record]
        if not labels and "s" not in record and "n" not in record and any(
                k in record for k in _BASE_LABELS):
            continue  # a base-only record
        n = record.get("n", "")
        if not isinstance(n, str):
            raise _senml_error(f"record {i}: n must be a string", topic)
        name = bases.name + n
        if not name:
            raise _senml_error(f"record {i} has no name (n, or a bn before it)", topic)
        if len(labels) > 1 or not (labels or "s" in record or bases.sum is not None):
            raise _senml_error(f"record {i} ({name}) needs exactly one of v, vb, vs, vd "
                               "(or a sum s alone)", topic)
        unit = record.get("u", bases.unit)
        if not (unit is None or isinstance(unit, str)):
            raise _senml_error(f"record {i}: u must be a string, not {unit!r}", topic)
        if "s" in record and not _is_number(record["s"]):
            raise _senml_error(f"record {i}: s must be a number, not {record['s']!r}", topic)
        t = record.get("t", 0)
        if not _is_number(t):
            raise _senml_error(f"record {i}: t must be a number, not {t!r}", topic)
        ms = times.get((bases.time, t))
        if ms is None:
            ms = times[bases.time, t] = _resolve_ms(i, bases.time, t, now_ms, topic)
        label = labels[0] if labels else None
        value = record[label] if label else None
        resolved.append(SenMLRecord(
            index=i, name=name, ts_ms=ms, unit=unit, label=label,
            value=_plus(bases.value, value) if label == "v" else value,
            sum=_plus(bases.sum, record["s"]) if "s" in record else bases.sum,
            unit_from_base="u" not in record and unit is not None))
    return resolved


# SenML unit names as (quantity, scale, offset): value × scale + offset is the quantity in its
# reference unit. Primary names from RFC 8428 §12.1; secondary ones (kW, Wh, kWh, mV, ug/m3,
# /100, /1000) from RFC 8798 §3, accepted in any version (RFC 9100 would want bver 26).
_UNITS: dict[str, tuple[str, decimal.Decimal, decimal.Decimal]] = {
    name: (quantity, decimal.Decimal(scale), decimal.Decimal(offset))
    for name, quantity, scale, offset in (
        ("W", "power", "1", "0"), ("kW", "power", "1000", "0"),
        ("J", "energy", "1", "0"), ("Wh", "energy", "3600", "0"),
        ("kWh", "energy", "3600000", "0"),
        ("/", "ratio", "1", "0"), ("/100", "ratio", "0.01", "0"),
        ("/1000", "ratio", "0.001", "0"),
        ("lx", "illuminance", "1", "0"),
        ("K", "temperature", "1", "0"), ("Cel", "temperature", "1", "273.15"),
        ("V", "voltage", "1", "0"), ("mV", "voltage", "0.001", "0"),
        ("kg/m3", "mass concentration", "1", "0"), ("ug/m3", "mass concentration", "1e-9", "0"),
        ("count", "count", "1", "0"),
    )
}
# Each numeric contract field's own unit. A record in another unit of the same quantity is
# converted to it (exactly: Wh → kWh is ÷ 1000 in decimal); any other unit is refused.
FIELD_UNITS: dict[str, str] = {
    "seq": "count", "brightness_pct": "/100", "power_w": "W", "energy_wh": "Wh",
    "energy_kwh": "kWh", "energy_export_kwh": "kWh", "lux": "lx", "motion_count": "count",
    "temp_c": "Cel",
    "no2_ugm3": "ug/m3", "pm25_ugm3": "ug/m3", "voltage_v": "V",
}
# '%' is not in the table: RFC 8428 §12.1 makes it a synonym of the ratio '/', yet devices
# mean percent by it, and either reading would be a silent factor of 100.
_PERCENT_SIGN = ("RFC 8428 §12.1 defines '%' as the ratio '/' (0..1), not a percentage, so "
                 "it is ambiguous: send '/' for a ratio or '/100' for percent (RFC 8798)")


def units_for(field: str) -> list[str]:
    """The SenML units a value of ``field`` may be sent in (its own first)."""
    own = FIELD_UNITS[field]
    return [own] + [u for u, q in _UNITS.items() if q[0] == _UNITS[own][0] and u != own]


def _in_field_unit(record: SenMLRecord, field: str, topic: str | None) -> Any:
    """A ``v`` record's value in ``field``'s own unit; ContractError(BAD_UNIT) if its unit is
    another quantity, or a name this table does not know. No unit means the field's own
    (RFC 8428 §4.5.2: then the application context tells the unit)."""
    own = FIELD_UNITS[field]
    unit = record.unit
    if unit is None or unit == own:
        return record.value
    if unit not in _UNITS or _UNITS[unit][0] != _UNITS[own][0]:
        source = " (from bu)" if record.unit_from_base else ""
        hint = f"send {field} in one of {', '.join(units_for(field))}"
        if unit == "%" and _UNITS[own][0] == "ratio":
            hint = _PERCENT_SIGN
        raise ContractError(BAD_UNIT, f"record {record.index} ({field}): unit {unit!r}{source} "
                            f"cannot be converted to {field}'s {own!r}; {hint}", topic)
    if not _is_number(record.value):
        return record.value  # the model refuses it, naming the field
    _, scale, offset = _UNITS[unit]
    _, own_scale, own_offset = _UNITS[own]
    reference = _DECIMAL.add(_DECIMAL.multiply(_decimal(record.value), scale), offset)
    return float(_DECIMAL.divide(_DECIMAL.subtract(reference, own_offset), own_scale))


def _decode_senml(model: type[Reading], payload: bytes, topic: str | None,
                  now_ms: int | None) -> list[Reading]:
    """A pack's readings: its records resolved, then grouped by time, one reading per time.

    A record's field is the last ':', '/' or ';' part of its name; one pack carries one
    device. Values are converted to their field's unit (:data:`FIELD_UNITS`). Sums (``s``,
    ``bs``) are ignored: CityGrid stores registers, not integrals over time, so a record with
    a sum alone sets no field; nor does binary data (``vd``): no contract field takes it.
    """
    try:
        pack = pydantic_core.from_json(payload, allow_inf_nan=True)
    except ValueError as e:
        raise ContractError(NOT_JSON, str(e), topic) from None
    by_time: dict[int, dict[str, Any]] = {}
    first_device: str | None = None
    converted = FIELD_UNITS.keys() & model.model_fields.keys()  # fields of this kind only
    for record in resolve_senml(pack, now_ms, topic):
        # Names like "urn:dev:mac:0024befffe804ff1:power_w": the field is the last part.
        field = re.split(r"[:/;]", record.name)[-1]
        if not field:
            raise _senml_error(f"record {record.index}: its name {record.name!r} ends "
                               "without a field name", topic)
        # One pack, one device (the topic's): records naming two devices would mix their
        # values into one reading.
        device = record.name[:len(record.name) - len(field)]
        if first_device is None:
            first_device = device
        elif device != first_device:
            raise _senml_error(f"record {record.index} names {device!r} but the pack began "
                               f"with {first_device!r}: one pack carries one device", topic)
        if record.label in (None, "vd"):
            continue
        value = record.value
        if record.label == "v" and field in converted:
            value = _in_field_unit(record, field, topic)
        by_time.setdefault(record.ts_ms, {"ts": record.ts_ms})[field] = value
    if not by_time:
        raise _senml_error("the pack carries no values (base fields or sums only)", topic)
    out = []
    for ts, values in by_time.items():
        try:
            out.append(model.model_validate(values))
        except ValidationError as e:
            raise _error_from(e, topic, prefix=f"SenML t={ts / 1000}: ") from None
    return out


_build_fast()  # after every kind is registered
