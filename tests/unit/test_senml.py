"""SenML packs resolved as RFC 8428 §4 says — base fields, relative times, versions — and
values taken in their field's unit: converted where the conversion is exact, else bad_unit.

The RFC's own examples (§5.1) are in tests/data/senml/."""

from __future__ import annotations

import json
import typing

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.accounting import MeterState, account, to_mwh
from citygrid import contract
from citygrid.contract import ContractError, decode_readings, resolve_senml
from tests.helpers import REPO

EXAMPLES = REPO / "tests" / "data" / "senml"
NOW_MS = 1_790_000_000_123  # the time of receipt: 2026-09-21, with milliseconds
T = 1_789_999_000  # an absolute base time, epoch seconds, before NOW_MS
METER = "urn:dev:mac:0024befffe804ff1:"


def example(name: str) -> list:
    return json.loads((EXAMPLES / f"rfc8428-{name}.json").read_text())


def resolved_json(pack: list, now_ms: int | None = None) -> list[dict]:
    """Resolved records in the RFC's JSON form (§5.1.4): n, u, t (seconds), v/vb/vs/vd."""
    out = []
    for r in resolve_senml(pack, now_ms):
        record = {"n": r.name, "u": r.unit, "t": r.ts_ms / 1000, r.label: r.value}
        out.append({k: v for k, v in record.items() if v is not None})
    return out


def decode(kind: str, pack: list, now_ms: int | None = NOW_MS) -> list[contract.Reading]:
    return decode_readings(kind, orjson.dumps(pack), now_ms=now_ms)


def refusal(kind: str, pack: list, now_ms: int | None = NOW_MS) -> ContractError:
    with pytest.raises(ContractError) as e:
        decode_readings(kind, json.dumps(pack).encode(), now_ms=now_ms)
    return e.value


def meter_pack(*records: dict, bt: float = T) -> list[dict]:
    """A meter's pack at ``bt``: seq and power first, then ``records``."""
    return [{"bn": METER, "bt": bt, "n": "seq", "v": 1}, {"n": "power_w", "v": 500}, *records]


# --------------------------------------------------------------------------- RFC 8428 §5.1


def test_5_1_3_resolves_to_the_resolved_data_of_5_1_4():
    """§4.6: bn prepended, bt added, bu applied where a record has no u — the RFC's own pair."""
    assert resolved_json(example("5.1.3-multiple-measurements")) == example(
        "5.1.4-resolved-data")


def test_5_1_2_base_unit_base_time_and_negative_times():
    records = resolve_senml(example("5.1.2-multiple-data-points-relative-times"))
    assert [(r.name.rsplit(":", 1)[1], r.unit, r.ts_ms, r.value) for r in records] == [
        ("voltage", "V", 1_276_020_076_001, 120.1),  # its own u wins over bu
        ("current", "A", 1_276_020_071_001, 1.2),    # bt + t: -5 s
        ("current", "A", 1_276_020_072_001, 1.3),
        ("current", "A", 1_276_020_073_001, 1.4),
        ("current", "A", 1_276_020_074_001, 1.5),
        ("current", "A", 1_276_020_075_001, 1.6),
        ("current", "A", 1_276_020_076_001, 1.7),
    ]
    assert [r.unit_from_base for r in records] == [False] + [True] * 6


@pytest.mark.parametrize("name", ["5.1.1-single-data-point", "5.1.2-multiple-data-points",
                                  "5.1.7-thermostat"])
def test_a_pack_without_times_was_measured_now(name):
    """§4.5.3: no bt and no t is time 0, relative to "now": the time of receipt."""
    records = resolve_senml(example(name), NOW_MS)
    assert records and all(r.ts_ms == NOW_MS for r in records)
    with pytest.raises(ContractError) as e:
        resolve_senml(example(name))  # no time of receipt to resolve against
    assert e.value.reason == contract.BAD_SENML and "relative time" in e.value.detail


def test_5_1_5_the_value_types():
    records = resolve_senml(example("5.1.5-multiple-data-types"), NOW_MS)
    assert [(r.name, r.label, r.value) for r in records] == [
        ("urn:dev:ow:10e2073a01080063:temp", "v", 23.1),
        ("urn:dev:ow:10e2073a01080063:label", "vs", "Machine Room"),
        ("urn:dev:ow:10e2073a01080063:open", "vb", False),
        ("urn:dev:ow:10e2073a01080063:nfv-reader", "vd", "aGkgCg"),
    ]


def test_5_1_6_a_new_base_name_keeps_the_base_time():
    assert resolved_json(example("5.1.6-collection-of-resources")) == [
        {"n": "2001:db8::2/temperature", "u": "Cel", "t": 1.320078429e9, "v": 25.2},
        {"n": "2001:db8::2/humidity", "u": "%RH", "t": 1.320078429e9, "v": 30},
        {"n": "2001:db8::1/temperature", "u": "Cel", "t": 1.320078429e9, "v": 12.3},
        {"n": "2001:db8::1/humidity", "u": "%RH", "t": 1.320078429e9, "v": 67},
    ]
    # As telemetry it names two devices: one pack carries one device.
    error = refusal("meter", example("5.1.6-collection-of-resources"))
    assert error.reason == contract.BAD_SENML and "one device" in error.detail


def test_5_1_7_a_base_only_record_and_times_after_the_base_time():
    assert [r.name for r in resolve_senml(example("5.1.7-thermostat"), NOW_MS)] == [
        "urn:dev:ow:10e2073a01080063:temp", "urn:dev:ow:10e2073a01080063:heat",
        "urn:dev:ow:10e2073a01080063:fan"]
    assert resolved_json(example("5.1.7-two-lights-on")) == [
        {"n": "2001:db8::3", "u": "/", "t": 1.320078429e9, "v": 1},
        {"n": "2001:db8::4", "u": "/", "t": 1.320078429e9, "v": 1}]
    off = resolve_senml(example("5.1.7-two-lights-off"))
    assert [(r.name, r.ts_ms - 1_320_078_429_000, r.value) for r in off] == [
        ("2001:db8::3", 0, 0.5), ("2001:db8::4", 0, 0.5),
        ("2001:db8::3", 100, 0), ("2001:db8::4", 100, 0)]


# --------------------------------------------------------------------------- base value


def test_bv_is_added_to_an_energy_register_exactly():
    """A meter sends its register as a base and increments: 4211.1 + 0.01 is 4211.11 (a float
    sum would store 4211.110000000001), and bv holds for the records after it."""
    pack = [{"bn": METER, "bt": T, "n": "seq", "v": 1}, {"n": "power_w", "v": 500},
            {"n": "seq", "t": 60, "v": 2}, {"n": "power_w", "t": 60, "v": 520},
            {"bv": 4211.1, "n": "energy_kwh", "u": "kWh", "v": 0.01},
            {"n": "energy_kwh", "t": 60, "v": 0.02}]
    readings = decode("meter", pack)
    assert [(r.ts, r.seq, r.energy_kwh, r.power_w) for r in readings] == [
        (T * 1000, 1, 4211.11, 500.0), (T * 1000 + 60_000, 2, 4211.12, 520.0)]
    assert 4211.1 + 0.01 != 4211.11


def test_bv_applies_to_every_later_value_until_changed():
    pack = [{"bn": METER, "bt": T, "bv": 100, "n": "seq", "v": 1}, {"n": "power_w", "v": 5},
            {"bv": 0, "n": "energy_kwh", "v": 7.5}]
    [r] = decode("meter", pack)
    assert (r.seq, r.power_w, r.energy_kwh) == (101, 105.0, 7.5)
    assert isinstance(r.seq, int)  # integers stay integers


@pytest.mark.parametrize(("bv", "reason"), [
    ("4211", contract.BAD_SENML), (True, contract.BAD_SENML), ([1], contract.BAD_SENML),
    (1e308, contract.NON_FINITE),      # 1e308 + 1e308 overflows: not a finite value
    (1e12, contract.OUT_OF_RANGE),     # a register beyond 10¹²
    (-5000, contract.OUT_OF_RANGE),    # a negative register
])
def test_a_bad_base_value_is_refused_with_a_reason(bv, reason):
    pack = meter_pack({"bv": bv, "n": "energy_kwh", "v": 1e308 if bv == 1e308 else 1})
    assert refusal("meter", pack).reason == reason


# --------------------------------------------------------------------------- units


def test_a_wh_register_is_billed_as_kwh_over_1000():
    """The bug this fixes: a register sent in Wh was stored, and billed, as kWh."""
    first, second = (decode("meter", meter_pack({"n": "energy_kwh", "u": "Wh", "v": wh},
                                                bt=T + dt))[0]
                     for wh, dt in ((1_000_000, -3600), (1_000_500, 0)))
    assert (first.energy_kwh, second.energy_kwh) == (1000.0, 1000.5)
    state = MeterState()
    account(state, first.ts, to_mwh(first.energy_kwh), max_power_w=10_000)
    used = account(state, second.ts, to_mwh(second.energy_kwh), max_power_w=10_000)
    assert used.intervals == [(first.ts, second.ts, 500_000)]  # 0.5 kWh in mWh, not 500 kWh


@pytest.mark.parametrize(("kind", "field", "unit", "sent", "stored"), [
    ("meter", "energy_kwh", "Wh", 1234, 1.234),
    ("meter", "energy_kwh", "Wh", 2.1, 0.0021),          # 2.1 / 1000 is 0.0021000000000000003
    ("meter", "energy_kwh", "kWh", 2.1, 2.1),
    ("meter", "energy_kwh", "J", 3_600_000, 1.0),
    ("streetlight", "energy_wh", "kWh", 2.01, 2010.0),   # 2.01 * 1000 is 2009.9999999999998
    ("streetlight", "energy_wh", "J", 7200, 2.0),
    ("meter", "power_w", "kW", 0.61, 610.0),
    ("meter", "power_w", "W", 610, 610.0),
    ("streetlight", "power_w", "kW", 0.0245, 24.5),
    ("streetlight", "brightness_pct", "/", 0.07, 7.0),  # a ratio; 0.07 * 100 is 7.000000000000001
    ("streetlight", "brightness_pct", "/100", 40, 40.0),
    ("streetlight", "brightness_pct", "/1000", 405, 40.5),
    ("streetlight", "temp_c", "K", 296.25, 23.1),
    ("streetlight", "temp_c", "Cel", 23.1, 23.1),
    ("streetlight", "no2_ugm3", "kg/m3", 2.5e-8, 25.0),
    ("meter", "voltage_v", "mV", 230_100, 230.1),
])
def test_a_value_in_another_unit_of_its_quantity_is_converted_exactly(kind, field, unit, sent,
                                                                      stored):
    [r] = decode(kind, with_field(kind, field, {"n": field, "u": unit, "v": sent}))
    assert r.fields()[field] == stored


def with_field(kind: str, field: str, record: dict) -> list[dict]:
    """A complete pack of ``kind`` at T whose ``field`` record is ``record``."""
    base = {"seq": 1, "power_w": 20, "energy_kwh": 1, "energy_wh": 1, "brightness_pct": 30,
            "lux": 1}
    names = ["seq", "power_w", "energy_kwh"] if kind == "meter" else [
        "seq", "brightness_pct", "power_w", "energy_wh", "lux"]
    pack = [{"bt": T, "n": "motion", "vb": False}] if kind == "streetlight" else [{"bt": T}]
    pack += [{"n": n, "v": base[n]} for n in names if n != field]
    return [*pack, record]


@pytest.mark.parametrize(("field", "unit", "why"), [
    ("power_w", "Cel", "send power_w in one of W, kW"),       # another quantity
    ("power_w", "Wh", "send power_w in one of W, kW"),        # energy is not power
    ("energy_kwh", "W", "one of kWh, J, Wh"),
    ("energy_kwh", "MWh", "one of kWh"),                      # not a SenML unit name
    ("energy_kwh", "kwh", "one of kWh"),                      # unit names are case-sensitive
    ("seq", "W", "send seq in one of count"),
])
def test_a_unit_that_cannot_be_converted_is_bad_unit_naming_record_and_unit(field, unit, why):
    error = refusal("meter", with_field("meter", field, {"n": field, "u": unit, "v": 1}))
    assert error.reason == contract.BAD_UNIT
    assert f"record 3 ({field}): unit {unit!r}" in error.detail and why in error.detail


def test_celsius_for_power_is_bad_unit():
    pack = meter_pack({"n": "energy_kwh", "v": 1}, {"n": "power_w", "u": "Cel", "v": 21})
    error = refusal("meter", pack)
    assert error.reason == contract.BAD_UNIT
    assert error.detail.startswith("record 3 (power_w): unit 'Cel' cannot be converted to "
                                   "power_w's 'W'")


def test_percent_sign_is_refused_as_ambiguous():
    """RFC 8428 §12.1: '%' is the ratio '/' (0..1), NOT a percentage — yet devices mean
    percent by it. Either reading silently scales by 100, so it is refused, saying why."""
    error = refusal("streetlight", with_field("streetlight", "brightness_pct",
                                              {"n": "brightness_pct", "u": "%", "v": 40}))
    assert error.reason == contract.BAD_UNIT
    assert "'/100' for percent" in error.detail


def test_base_unit_is_the_unit_of_records_without_one_until_changed():
    pack = [{"bn": METER, "bt": T, "n": "seq", "v": 1},
            {"bu": "kW", "n": "power_w", "v": 0.5},           # bu: kW
            {"n": "power_w", "t": 60, "v": 0.52},             # still kW
            {"n": "power_w", "t": 120, "u": "W", "v": 530},   # its own u wins
            {"bu": "Wh", "n": "energy_kwh", "v": 1500},       # bu changed: Wh
            {"n": "energy_kwh", "t": 60, "v": 1510},
            {"n": "energy_kwh", "t": 120, "v": 1520.5},
            {"n": "seq", "t": 60, "u": "count", "v": 2}, {"n": "seq", "t": 120, "u": "count",
                                                           "v": 3}]
    readings = decode("meter", pack)
    assert [(r.seq, r.power_w, r.energy_kwh) for r in readings] == [
        (1, 500.0, 1.5), (2, 520.0, 1.51), (3, 530.0, 1.5205)]


def test_a_base_unit_inherited_by_a_field_of_another_quantity_is_bad_unit_from_bu():
    pack = [{"bn": METER, "bt": T, "bu": "W", "n": "power_w", "v": 500}, {"n": "seq", "v": 1},
            {"n": "energy_kwh", "u": "kWh", "v": 1}]
    error = refusal("meter", pack)
    assert error.reason == contract.BAD_UNIT
    assert "record 1 (seq): unit 'W' (from bu)" in error.detail


def test_units_on_boolean_and_string_values_and_unknown_fields_are_ignored():
    """A unit is the unit of a number (RFC 8428 §4.2); a boolean or a string has none to
    convert, and a field CityGrid does not know is dropped whatever its unit."""
    pack = [{"bt": T, "n": "seq", "v": 1}, {"n": "brightness_pct", "v": 30},
            {"n": "power_w", "v": 20}, {"n": "energy_wh", "v": 1}, {"n": "lux", "v": 1},
            {"bu": "W", "n": "motion", "vb": True}, {"n": "fault", "vs": "lamp_failure"},
            {"n": "humidity", "u": "%RH", "v": 50}]
    [r] = decode("streetlight", pack)
    assert (r.motion, r.fault, r.lux) == (True, "lamp_failure", 1.0)
    assert "humidity" not in r.fields()
    error = refusal("streetlight", [*pack, {"n": "lux", "v": 3}])  # a number: W is not lx
    assert error.reason == contract.BAD_UNIT and "record 8 (lux): unit 'W' (from bu)" in (
        error.detail)


def test_a_field_of_another_kind_is_not_unit_checked():
    """energy_wh is a streetlight's: a meter drops it, so its unit does not refuse the pack."""
    [r] = decode("meter", meter_pack({"n": "energy_kwh", "v": 1},
                                     {"n": "energy_wh", "u": "Cel", "v": 1}))
    assert "energy_wh" not in r.fields()


def test_every_numeric_contract_field_has_a_unit():
    """A new numeric field without a unit here would take any unit unconverted."""
    for model in contract.KINDS.values():
        for name, info in model.model_fields.items():
            types = set(typing.get_args(info.annotation)) or {info.annotation}
            if name != "ts" and types & {int, float} and bool not in types:
                assert name in contract.FIELD_UNITS, f"{model.__name__}.{name} has no unit"
    for field, unit in contract.FIELD_UNITS.items():
        assert contract.units_for(field)[0] == unit


# --------------------------------------------------------------------------- times


def test_relative_times_resolve_against_the_time_of_receipt():
    """No bt, or a bt below 2**28: seconds relative to now (RFC 8428 §4.5.3)."""
    pack = [{"bn": METER, "n": "seq", "v": 2}, {"n": "power_w", "v": 500},
            {"n": "energy_kwh", "v": 10.5},
            {"n": "seq", "t": -60, "v": 1}, {"n": "power_w", "t": -60, "v": 480},
            {"n": "energy_kwh", "t": -60, "v": 10.49}]
    readings = decode("meter", pack)
    assert [(r.ts, r.seq) for r in readings] == [(NOW_MS, 2), (NOW_MS - 60_000, 1)]
    relative_bt = [{"bt": -30.5, **pack[0]}, *pack[1:3]]
    assert [r.ts for r in decode("meter", relative_bt)] == [NOW_MS - 30_500]


def test_records_with_one_resolved_time_form_one_reading():
    pack = [{"bn": METER, "bt": -10, "n": "seq", "v": 1}, {"bt": -15, "t": 5, "n": "power_w",
                                                            "v": 500},
            {"bt": 0, "t": -10, "n": "energy_kwh", "v": 1}]
    [r] = decode("meter", pack)
    assert (r.ts, r.seq, r.power_w, r.energy_kwh) == (NOW_MS - 10_000, 1, 500.0, 1.0)


def test_a_relative_time_without_a_time_of_receipt_is_refused():
    error = refusal("meter", meter_pack({"n": "energy_kwh", "v": 1}, bt=0), now_ms=None)
    assert error.reason == contract.BAD_SENML and "time of receipt" in error.detail


def test_a_relative_time_far_ahead_is_a_clock_fault():
    error = refusal("meter", meter_pack({"n": "energy_kwh", "v": 1}, bt=3600))
    assert error.reason == contract.OUT_OF_RANGE and "ahead" in error.detail


def test_an_absolute_time_keeps_its_milliseconds():
    [r] = decode("meter", meter_pack({"n": "energy_kwh", "v": 1}, bt=1.789999000001e9))
    assert r.ts == 1_789_999_000_001


# --------------------------------------------------------------------------- version, sums


@pytest.mark.parametrize("bver", [10, 26, 5])
def test_versions_10_26_and_older_are_read(bver):
    """26 is 10 plus RFC 9100's secondary-units feature (kWh, kW, Wh); 5 is in §5.1.2."""
    [r] = decode("meter", [{"bver": bver, **meter_pack()[0]}, *meter_pack()[1:],
                           {"n": "energy_kwh", "u": "kWh", "v": 1}])
    assert r.energy_kwh == 1.0


@pytest.mark.parametrize(("bver", "detail"), [
    (11, "version 11 is not one CityGrid reads"), (42, "version 42"), (2**60, "version"),
    (0, "positive integer"), (-10, "positive integer"), ("10", "positive integer"),
    (10.0, "positive integer"), (True, "positive integer"), (None, "positive integer"),
])
def test_a_version_it_cannot_read_is_refused(bver, detail):
    error = refusal("meter", [{"bver": bver, **meter_pack()[0]}, *meter_pack()[1:],
                              {"n": "energy_kwh", "v": 1}])
    assert error.reason == contract.BAD_SENML and detail in error.detail


@pytest.mark.parametrize("records", [
    [{"bver": 26, "n": "energy_kwh", "v": 1}],       # after records of version 10
    [{"n": "energy_kwh", "v": 1}, {"bver": 5}],
])
def test_all_records_of_a_pack_have_one_version(records):
    error = refusal("meter", meter_pack(*records))
    assert error.reason == contract.BAD_SENML and "one version" in error.detail


def test_a_later_bver_that_agrees_is_fine():
    first = {"bver": 10, **meter_pack()[0]}
    assert decode("meter", [first, *meter_pack()[1:], {"bver": 10, "n": "energy_kwh", "v": 1}])


def test_sums_are_ignored():
    """CityGrid stores registers, not integrals over time: s and bs set no field."""
    [r] = decode("meter", meter_pack({"bs": 100, "n": "energy_kwh", "v": 2, "s": 7}))
    assert r.energy_kwh == 2.0 and "s" not in r.fields()
    sum_only = refusal("meter", meter_pack({"n": "energy_kwh", "s": 3600}))
    assert sum_only.reason == contract.MISSING_FIELD and "energy_kwh" in sum_only.detail
    assert refusal("meter", meter_pack({"bs": "x", "n": "energy_kwh", "v": 1})).reason == (
        contract.BAD_SENML)


def test_a_label_that_must_be_understood_is_refused_and_unknown_ones_ignored():
    """RFC 8428 §4.4: a label ending in '_' must be understood; others may be ignored."""
    error = refusal("meter", meter_pack({"n": "energy_kwh", "v": 1, "ct_": "60"}))
    assert error.reason == contract.BAD_SENML and "'ct_' must be understood" in error.detail
    [r] = decode("meter", meter_pack({"n": "energy_kwh", "v": 1, "ut": 60, "ct": "60"}))
    assert r.energy_kwh == 1.0


def test_binary_data_sets_no_field():
    error = refusal("meter", meter_pack({"n": "energy_kwh", "vd": "aGkgCg"}))
    assert error.reason == contract.MISSING_FIELD


@pytest.mark.parametrize(("pack", "detail"), [
    ([{"bt": T, "n": "seq", "v": 1, "vd": "aGk"}], "record 0 (seq) needs exactly one of v, vb"),
    ([{"bt": T, "n": "seq"}], "record 0 (seq) needs exactly one of v, vb, vs, vd"),
    ([{"bt": T, "n": "seq", "v": 1, "u": 5}], "record 0: u must be a string"),
    ([{"bt": T, "bu": ["W"], "n": "seq", "v": 1}], "record 0: bu must be a string"),
    ([{"bt": T, "v": 1}], "record 0 has no name"),
    ([{"bn": METER, "bt": T, "v": 1}], "record 0: its name 'urn:dev:mac:0024befffe804ff1:' "
                                       "ends without a field name"),
    ([{"bn": METER, "bu": "W", "bv": 1, "bs": 1, "bver": 10}], "the pack carries no values"),
])
def test_malformed_records_are_bad_senml_saying_which_record(pack, detail):
    error = refusal("meter", pack)
    assert error.reason == contract.BAD_SENML and detail in error.detail


# --------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**1100, 2**1100)
    | st.floats() | st.text(max_size=8)
    | st.sampled_from(["W", "kW", "Wh", "kWh", "J", "Cel", "%", "/", "count", "seq", "power_w",
                       "energy_kwh", "urn:dev:x:", 10, 26, 2**28, T, -60]),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)
labels = st.sampled_from(["bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vb", "vs", "vd",
                          "s", "t", "ut", "x_"])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.dictionaries(labels, json_values, max_size=6), max_size=8),
       st.sampled_from(["meter", "streetlight"]), st.sampled_from([NOW_MS, None]))
def test_any_pack_with_any_senml_label_decodes_or_is_refused_with_a_reason(pack, kind, now):
    payload = json.dumps(pack).encode()  # NaN and Infinity as JSON literals
    try:
        readings = decode_readings(kind, payload, now_ms=now)
    except ContractError as e:
        assert e.reason in contract.REASONS and e.detail
        return
    latest = contract.TS_MAX_MS if now is None else now + contract.MAX_AHEAD_MS
    assert readings and all(contract.TS_MIN_MS <= r.ts <= latest for r in readings)
