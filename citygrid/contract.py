"""MQTT device contract v1 (DESIGN.md §2): topics, payload models, decoding.

Lenient with devices (unknown fields are dropped), strict with what we know:
a known field with the wrong type, NaN/Infinity or an impossible value is
rejected with a :class:`ContractError` that says which field and why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
STORE_REJECTED = "store_rejected"
REASONS = (BAD_TOPIC, UNKNOWN_KIND, OVERSIZE, NOT_JSON, NON_FINITE, OUT_OF_RANGE,
           WRONG_TYPE, MISSING_FIELD, BAD_SENML, STORE_REJECTED)


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


class Reading(BaseModel):
    """Fields every reading carries."""

    model_config = _STRICT
    kind: ClassVar[str]
    _optional: ClassVar[tuple[str, ...]] = ()

    ts: Timestamp
    seq: Annotated[int, Field(ge=0, le=INT64_MAX,
                              description="Increases by one per message per device.")]

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
        for name in self._optional:
            if values[name] is None:
                del values[name]
        return values


KINDS: dict[str, type[Reading]] = {}


def register_kind(name: str):
    """Register a device kind's reading model under its topic name."""

    def wrap(model: type[Reading]) -> type[Reading]:
        model.kind = name
        model._optional = tuple(k for k, f in model.model_fields.items() if not f.is_required())
        KINDS[name] = model
        return model

    return wrap


@register_kind("streetlight")
class StreetlightReading(Reading):
    """A streetlight's reading: its output, consumption and what its sensors see."""

    brightness_pct: Annotated[Percent, Field(description="Current light output, %.")]
    power_w: Annotated[Power, Field(description="Electrical power now, W.")]
    energy_wh: Annotated[Register, Field(description="Cumulative energy register, Wh.")]
    lux: Annotated[Lux, Field(description="Ambient light, lx.")]
    motion: Annotated[bool, Field(description="Presence detected during the interval.")]
    motion_count: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    temp_c: Annotated[float, Field(ge=-60, le=90)] | None = None
    no2_ugm3: NonNeg | None = None
    pm25_ugm3: NonNeg | None = None
    fault: Annotated[str, Field(max_length=64, description="e.g. lamp_failure")] | None = None


@register_kind("meter")
class MeterReading(Reading):
    """An electricity meter's reading."""

    energy_kwh: Annotated[Register, Field(description="Cumulative import register, kWh.")]
    power_w: Annotated[Power, Field(description="Import power now, W.")]
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
    kwh: Annotated[str, Field(description="Decimal kWh billed, e.g. 10.042000.")]
    energy_amount: Annotated[str, Field(description="Exact price of the energy, currency units.")]
    standing_charge: str
    amount_minor: Annotated[int, Field(description="Debited, in minor units (øre, cents).")]
    currency: str
    settled_at_ms: int
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
    more than MAX_AHEAD_MS ahead of it is refused as a clock fault.
    """
    readings = _decode(kind, payload, topic)
    if now_ms is not None:
        for r in readings:
            if r.ts > now_ms + MAX_AHEAD_MS:
                raise ContractError(OUT_OF_RANGE, f"ts: {(r.ts - now_ms) / 60_000:.0f} minutes "
                                    "ahead of the platform's clock (a device clock fault?)",
                                    topic)
    return readings


def _decode(kind: str, payload: bytes, topic: str | None) -> list[Reading]:
    model = KINDS.get(kind)
    if model is None:
        raise ContractError(UNKNOWN_KIND, f"kind {kind!r} is not one of {sorted(KINDS)}", topic)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(OVERSIZE, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}", topic)
    start = payload.lstrip()[:1]
    if start == b"[":
        return _decode_senml(model, payload, topic)
    if start != b"{":
        raise ContractError(NOT_JSON, "payload must be a JSON object or a SenML array", topic)
    try:
        return [model.model_validate_json(payload)]
    except ValidationError as e:
        raise _error_from(e, topic) from None


def _decode_senml(model: type[Reading], payload: bytes, topic: str | None) -> list[Reading]:
    try:
        pack = pydantic_core.from_json(payload, allow_inf_nan=True)
    except ValueError as e:
        raise ContractError(NOT_JSON, str(e), topic) from None
    if not pack:
        raise ContractError(BAD_SENML, "empty SenML pack", topic)
    by_time: dict[float, dict[str, Any]] = {}
    base_name, base_time = "", 0.0
    first_device: str | None = None
    for i, record in enumerate(pack):
        if not isinstance(record, dict):
            raise ContractError(BAD_SENML, f"record {i} is not an object", topic)
        base_name = record.get("bn", base_name)
        base_time = record.get("bt", base_time)
        if not isinstance(base_name, str) or not isinstance(base_time, int | float) or isinstance(
            base_time, bool
        ):
            raise ContractError(BAD_SENML, f"record {i}: bn must be a string, bt a number", topic)
        values = [record[k] for k in ("v", "vb", "vs") if k in record]
        if not values and "n" not in record and ("bn" in record or "bt" in record):
            continue  # a base-only record
        if not isinstance(record.get("n", ""), str):
            raise ContractError(BAD_SENML, f"record {i}: n must be a string", topic)
        name = base_name + record.get("n", "")
        # Names like "urn:dev:mac:0024befffe804ff1:power_w": the field is the last part.
        field = re.split(r"[:/;]", name)[-1]
        if not field:
            raise ContractError(BAD_SENML, f"record {i} has no name", topic)
        # One pack, one device (the topic's): records naming two devices would mix their
        # values into one reading.
        device = name[:len(name) - len(field)]
        if first_device is None:
            first_device = device
        elif device != first_device:
            raise ContractError(BAD_SENML, f"record {i} names {device!r} but the pack began "
                                f"with {first_device!r}: one pack carries one device", topic)
        if len(values) != 1:
            raise ContractError(BAD_SENML, f"record {i} ({field}) needs exactly one of v, vb, vs",
                                topic)
        t = record.get("t", 0)
        if not isinstance(t, int | float) or isinstance(t, bool):
            raise ContractError(BAD_SENML, f"record {i}: t must be a number", topic)
        when = base_time + t
        if not math.isfinite(when * 1000):
            raise ContractError(BAD_SENML, f"record {i}: its time is not a finite number", topic)
        if when < 2**28:  # RFC 8428 §4.5.3: a relative time; we need the device's clock
            raise ContractError(BAD_SENML, f"record {i}: relative time {when}s is not accepted; "
                                "send absolute times (bt/t in epoch seconds)", topic)
        reading = by_time.setdefault(when, {"ts": round(when * 1000)})
        reading[field] = values[0]
    if not by_time:
        raise ContractError(BAD_SENML, "the pack has base records only, no values", topic)
    out = []
    for when, values in by_time.items():
        try:
            out.append(model.model_validate(values))
        except ValidationError as e:
            raise _error_from(e, topic, prefix=f"SenML t={when}: ") from None
    return out


def validate_command(payload: bytes) -> Command:
    try:
        return Command.model_validate_json(payload)
    except ValidationError as e:
        raise _error_from(e, None) from None

