"""Bad input, fuzzed: every payload, topic, rule file and billing file either decodes or is
refused with a stable reason — never another exception, never a hang."""

from __future__ import annotations

import json
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import config as billing_config
from citygrid import contract
from citygrid.contract import ContractError, Topic, decode_readings
from rules.loader import RuleFileError, parse_text

NOW_MS = int(time.time() * 1000)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=20)
field_names = st.sampled_from(["ts", "seq", "brightness_pct", "power_w", "energy_wh", "lux",
                               "motion", "fault", "energy_kwh", "temp_c", "no2_ugm3"])
readingish = st.dictionaries(field_names, json_values | st.integers(-2**70, 2**70), max_size=9)


def outcome(kind: str, payload: bytes) -> str:
    try:
        readings = decode_readings(kind, payload, now_ms=int(time.time() * 1000))
    except ContractError as e:
        assert e.reason in contract.REASONS, e.reason
        assert e.detail  # says what is wrong
        return e.reason
    assert readings
    for r in readings:
        assert contract.TS_MIN_MS <= r.ts <= NOW_MS + contract.MAX_AHEAD_MS + 60_000
    return "ok"


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["streetlight", "meter", "toaster"]))
def test_any_bytes_decode_or_are_refused_with_a_reason(payload, kind):
    outcome(kind, payload)


@FUZZ
@given(readingish, st.sampled_from(["streetlight", "meter"]))
def test_any_json_object_decodes_or_is_refused_with_a_reason(obj, kind):
    outcome(kind, json.dumps(obj).encode())


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["bn", "bt", "n", "t", "v", "vb", "vs", "u"]),
                                json_values, max_size=5), max_size=8))
def test_any_senml_pack_decodes_or_is_refused_with_a_reason(pack):
    outcome("meter", json.dumps(pack).encode())


def light(**changes) -> bytes:
    reading = {"ts": NOW_MS - 1000, "seq": 1, "brightness_pct": 30.0, "power_w": 20.0,
               "energy_wh": 1.0, "lux": 1.0, "motion": False}
    reading.update(changes)
    return json.dumps(reading, separators=(",", ":")).encode()  # big ints too


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe{\"ts\": 1}", contract.NOT_JSON),                        # invalid UTF-8
    (light()[:-1] + b"\xc3\x28}", contract.NOT_JSON),                    # broken UTF-8 inside
    (b"{" + b" " * (contract.MAX_PAYLOAD_BYTES + 1) + b"}", contract.OVERSIZE),
    (light().replace(b'"power_w":20.0', b'"power_w":NaN'), contract.NON_FINITE),
    (light().replace(b'"power_w":20.0', b'"power_w":Infinity'), contract.NON_FINITE),
    (light().replace(b'"power_w":20.0', b'"power_w":1e999'), contract.NON_FINITE),
    (light(power_w=1e300), contract.OUT_OF_RANGE),
    (light(seq=2**70), contract.OUT_OF_RANGE),
    (light(brightness_pct="full"), contract.WRONG_TYPE),
    (light(motion="yes"), contract.WRONG_TYPE),
    (light(ts=NOW_MS + 86_400_000), contract.OUT_OF_RANGE),              # tomorrow: clock fault
    (light(ts=4_200_000_000_000), contract.OUT_OF_RANGE),                # year 2103
    (light(ts=631_152_000_000), contract.OUT_OF_RANGE),                  # 1990
    (light(ts="2026-13-40T99:00:00Z"), contract.OUT_OF_RANGE),
])
def test_each_kind_of_bad_payload_has_its_reason(payload, reason):
    assert outcome("streetlight", payload) == reason


def test_a_reading_a_few_minutes_ahead_is_accepted_as_clock_drift():
    assert outcome("streetlight", light(ts=NOW_MS + 5 * 60_000)) == "ok"


def test_a_replayed_reading_is_the_same_point():
    """Identity is device + ts: a replay (same seq, same ts) overwrites itself, stores nothing
    new (the ingest integration test stores exactly the distinct points)."""
    [a], [b] = decode_readings("streetlight", light()), decode_readings("streetlight", light())
    assert (a.ts, a.fields()) == (b.ts, b.fields())


@pytest.mark.parametrize("pack", [
    [{"bt": 2**28, "t": 1e308, "n": "seq", "v": 1}, {"bt": 2**28, "t": 1e308, "n": "power_w",
                                                     "v": 1}],  # bt + t overflows to inf
    [{"bt": float("nan"), "n": "seq", "v": 1}],
    [{"bt": float("inf"), "n": "seq", "v": 1}],
])
def test_a_senml_time_that_is_not_finite_is_refused(pack):
    with pytest.raises(ContractError) as e:
        decode_readings("meter", json.dumps(pack).encode())  # NaN/Infinity as JSON literals
    assert e.value.reason == contract.BAD_SENML and "finite" in e.value.detail


def test_a_senml_pack_of_base_records_only_is_refused():
    """Found by the fuzzer: it decoded to no reading at all, acknowledged and gone."""
    with pytest.raises(ContractError) as e:
        decode_readings("meter", b'[{"bn": "urn:dev:mac:aaaa:", "bt": 1795000000}]')
    assert e.value.reason == contract.BAD_SENML


def test_a_senml_pack_naming_two_devices_is_refused():
    pack = [{"bn": "urn:dev:mac:aaaa:", "bt": NOW_MS / 1000 - 10, "n": "seq", "v": 1},
            {"n": "energy_kwh", "v": 10.5}, {"n": "power_w", "v": 230},
            {"bn": "urn:dev:mac:bbbb:", "n": "power_w", "v": 9999}]
    with pytest.raises(ContractError) as e:
        decode_readings("meter", orjson.dumps(pack))
    assert e.value.reason == contract.BAD_SENML and "one device" in e.value.detail


@pytest.mark.parametrize("bad", ["sl+1", "sl#1", "sl/1", "sl\x001", "sl\n1", "sl 1", "",
                                 "x" * 65, "sl-ü"])
def test_ids_with_wildcards_separators_or_control_characters_are_refused(bad):
    with pytest.raises(ContractError) as e:
        Topic("norrebro", "streetlight", bad)
    assert e.value.reason == contract.BAD_TOPIC
    with pytest.raises(ContractError) as e:
        Topic(bad, "streetlight", "sl-1")
    assert e.value.reason == contract.BAD_TOPIC
    with pytest.raises(ContractError):
        Topic.parse(f"city/v1/{bad}/streetlight/sl-1/telemetry")


@FUZZ
@given(st.text(max_size=120))
def test_any_topic_parses_or_is_refused(text):
    try:
        t = Topic.parse(text)
    except ContractError as e:
        assert e.reason in (contract.BAD_TOPIC, contract.UNKNOWN_KIND)
        return
    assert str(t) == text


# --------------------------------------------------------------------------- YAML files

YAML_BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
DEEP_FLOW = "rules: " + "[" * 10_000 + "]" * 10_000
DEEP_BLOCK = "rules:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 80))


@pytest.mark.parametrize("text", [YAML_BOMB, DEEP_FLOW, DEEP_BLOCK, "x" * 1_000_001])
@pytest.mark.parametrize("loader", ["rules", "billing"])
def test_yaml_bombs_and_deep_nesting_are_refused_quickly_with_a_location(text, loader):
    started = time.monotonic()
    error = RuleFileError if loader == "rules" else billing_config.ConfigError
    with pytest.raises(error) as e:
        (parse_text if loader == "rules" else billing_config.parse_text)(text, "evil.yaml")
    assert time.monotonic() - started < 2.0
    assert str(e.value).startswith("evil.yaml:")
    assert "refused" in str(e.value) or "limit" in str(e.value)


@FUZZ
@given(st.text(max_size=400))
def test_any_text_is_a_rule_file_or_a_located_refusal(text):
    try:
        parse_text(text, "fuzz.yaml")
    except RuleFileError as e:
        assert e.problems and all(p.file == "fuzz.yaml" and p.line >= 1 for p in e.problems)


@FUZZ
@given(st.dictionaries(st.sampled_from(["version", "rules", "settings", "id", "when", "if",
                                        "then", "set_light", "alert"]), json_values,
                       max_size=4))
def test_any_yaml_structure_is_a_rule_file_or_a_located_refusal(doc):
    import yaml

    try:
        parse_text(yaml.safe_dump(doc), "fuzz.yaml")
    except RuleFileError as e:
        assert e.problems


@FUZZ
@given(st.text(max_size=400))
def test_any_text_is_a_billing_file_or_a_located_refusal(text):
    try:
        billing_config.parse_text(text, "fuzz.yaml")
    except billing_config.ConfigError as e:
        assert e.problems and all(p.file == "fuzz.yaml" for p in e.problems)
