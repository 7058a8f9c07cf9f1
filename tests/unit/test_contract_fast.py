"""The contract's fast path (a reading decoded without a model object) is held to the models:
whatever it takes, the model takes too, with the same fields and time; what it declines, the
model decides (and names the problem)."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from citygrid.contract import _FAST, KINDS, FastReading, decode_readings

VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10, max_value=2_000_000),
    st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e13, max_value=1e13),
    st.floats(min_value=-100, max_value=300), st.text(max_size=70),
    st.lists(st.integers(), max_size=2))
TS = st.one_of(st.integers(min_value=900_000_000_000, max_value=4_200_000_000_000), st.booleans(),
               st.floats(min_value=1e12, max_value=2e12), st.just("2026-11-28T06:30:00Z"))


@st.composite
def objects(draw, kind: str):
    names = [n for n in KINDS[kind].model_fields if n != "ts"] + ["extra", "unmeasured"]
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    body = {n: draw(VALUES) for n in chosen}
    if draw(st.booleans()):
        body["ts"] = draw(TS)
    return body


def check(kind: str, body: dict) -> bool:
    payload = json.dumps(body).encode()  # any integer, where orjson stops at 64 bits
    fast = _FAST[kind](payload)
    try:
        model = KINDS[kind].model_validate_json(payload)
    except ValidationError:
        model = None
    if fast is not None:
        assert model is not None, f"fast path took what the model refuses: {body}"
        assert fast.ts == model.ts and fast.fields() == model.fields(), body
        assert [type(v) for v in fast.fields().values()] == \
            [type(v) for v in model.fields().values()], body
    return fast is not None


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(KINDS)).flatmap(lambda k: st.tuples(st.just(k), objects(k))))
def test_the_fast_path_never_takes_what_the_model_refuses(case):
    check(*case)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_valid_readings_take_the_fast_path_with_the_same_result(data):
    base = {"ts": 1_790_000_000_000, "seq": data.draw(st.integers(0, 10**12)),
            "brightness_pct": data.draw(st.floats(0, 100) | st.integers(0, 100)),
            "power_w": data.draw(st.floats(0, 1e6)), "energy_wh": 1.5,
            "lux": data.draw(st.floats(0, 200_000)), "motion": data.draw(st.booleans())}
    if data.draw(st.booleans()):
        base["temp_c"] = data.draw(st.floats(-60, 90))
    if data.draw(st.booleans()):
        base["fault"] = data.draw(st.text(max_size=64))
    assert check("streetlight", base)
    [r] = decode_readings("streetlight", orjson.dumps(base))
    assert isinstance(r, FastReading) and r.fields()["motion"] is base["motion"]


def test_a_reading_with_unmeasured_or_a_string_time_goes_to_the_models():
    light = {"ts": 1_790_000_000_000, "seq": 1, "brightness_pct": 30, "power_w": 1,
             "energy_wh": 1, "motion": False, "unmeasured": ["lux"]}
    [r] = decode_readings("streetlight", orjson.dumps(light))
    assert not isinstance(r, FastReading) and r.lux is None
    meter = {"ts": "2026-11-28T06:30:00Z", "seq": 1, "energy_kwh": 1, "power_w": 1}
    [m] = decode_readings("meter", orjson.dumps(meter))
    assert not isinstance(m, FastReading) and m.ts == 1_795_847_400_000
