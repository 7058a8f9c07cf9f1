import orjson
import pytest

from citygrid import contract
from citygrid.contract import ContractError, Topic, decode_readings

TS = 1_790_000_000_000  # 2026-09-21


def reasons(kind: str, payload: bytes) -> str:
    with pytest.raises(ContractError) as e:
        decode_readings(kind, payload)
    return e.value.reason


class TestTopic:
    def test_build_and_parse_round_trip(self):
        t = Topic("norrebro", "streetlight", "sl-0001")
        assert str(t) == "city/v1/norrebro/streetlight/sl-0001/telemetry"
        assert Topic.parse(str(t)) == t
        assert str(t.with_channel("cmd")) == "city/v1/norrebro/streetlight/sl-0001/cmd"

    @pytest.mark.parametrize("bad_id", ["", "+", "#", "a/b", "a+b", "x" * 65, "æ"])
    def test_ids_with_wildcards_slashes_or_empty_are_rejected(self, bad_id):
        with pytest.raises(ContractError) as e:
            Topic("norrebro", "meter", bad_id)
        assert e.value.reason == contract.BAD_TOPIC
        assert "device_id" in str(e.value)

    @pytest.mark.parametrize("topic, reason", [
        ("city/v1/norrebro/streetlight/sl-1", contract.BAD_TOPIC),
        ("city/v2/norrebro/streetlight/sl-1/telemetry", contract.BAD_TOPIC),
        ("town/v1/norrebro/streetlight/sl-1/telemetry", contract.BAD_TOPIC),
        ("city/v1/norrebro/toaster/sl-1/telemetry", contract.UNKNOWN_KIND),
        ("city/v1/norrebro/streetlight/sl-1/telemetry/x", contract.BAD_TOPIC),
        ("city/v1//streetlight/sl-1/telemetry", contract.BAD_TOPIC),
        ("city/v1/norrebro/streetlight/sl-1/stats", contract.BAD_TOPIC),
    ])
    def test_parse_rejects(self, topic, reason):
        with pytest.raises(ContractError) as e:
            Topic.parse(topic)
        assert e.value.reason == reason
        assert e.value.topic == topic

    def test_filter(self):
        assert contract.topic_filter() == "city/v1/+/+/+/telemetry"
        assert contract.topic_filter("cmd", "norrebro") == "city/v1/norrebro/+/+/cmd"


class TestReadings:
    def test_streetlight_object(self):
        [r] = decode_readings("streetlight", orjson.dumps(
            {"ts": TS, "seq": 7, "brightness_pct": 40, "power_w": 24.5, "energy_wh": 100,
             "lux": 3, "motion": True, "fault": "lamp_failure"}))
        assert r.ts == TS
        assert r.fields() == {"seq": 7, "brightness_pct": 40.0, "power_w": 24.5,
                              "energy_wh": 100.0, "lux": 3.0, "motion": True,
                              "fault": "lamp_failure"}
        # Numbers are stored as floats whatever the device sent: InfluxDB fixes a field's type.
        assert isinstance(r.fields()["brightness_pct"], float)

    def test_rfc3339_time_and_unknown_fields(self):
        [r] = decode_readings("meter", b'{"ts":"2026-11-28T06:30:00.250Z","seq":1,'
                                       b'"energy_kwh":12.5,"power_w":300,"firmware":"2.1"}')
        assert r.ts == 1_795_847_400_250
        assert "firmware" not in r.fields()

    def test_offset_time_is_converted_to_utc(self):
        [r] = decode_readings("meter", b'{"ts":"2026-11-28T07:30:00+01:00","seq":1,'
                                       b'"energy_kwh":1,"power_w":1}')
        assert r.ts == 1_795_847_400_000

    @pytest.mark.parametrize("payload, reason", [
        (b'{"ts":1790000000000,"seq":1,"energy_kwh":NaN,"power_w":1}', contract.NON_FINITE),
        (b'{"ts":1790000000000,"seq":1,"energy_kwh":Infinity,"power_w":1}', contract.NON_FINITE),
        (b'{"ts":1790000000000,"seq":1,"energy_kwh":1e999,"power_w":1}', contract.NON_FINITE),
        (b'{"ts":1790000000000,"seq":1,"energy_kwh":-1,"power_w":1}', contract.OUT_OF_RANGE),
        (b'{"ts":1790000000000,"seq":-1,"energy_kwh":1,"power_w":1}', contract.OUT_OF_RANGE),
        (b'{"ts":12,"seq":1,"energy_kwh":1,"power_w":1}', contract.OUT_OF_RANGE),
        (b'{"ts":"yesterday","seq":1,"energy_kwh":1,"power_w":1}', contract.OUT_OF_RANGE),
        (b'{"ts":"2026-11-28T06:30:00","seq":1,"energy_kwh":1,"power_w":1}',
         contract.OUT_OF_RANGE),
        (b'{"ts":1790000000000,"seq":1,"energy_kwh":"12","power_w":1}', contract.WRONG_TYPE),
        (b'{"ts":1790000000000,"seq":1.5,"energy_kwh":1,"power_w":1}', contract.WRONG_TYPE),
        (b'{"ts":1790000000000,"seq":true,"energy_kwh":1,"power_w":1}', contract.WRONG_TYPE),
        (b'{"ts":1790000000000,"seq":1,"power_w":1}', contract.MISSING_FIELD),
        (b'{"ts":1790000000000,"seq":1,', contract.NOT_JSON),
        (b'hello', contract.NOT_JSON),
        (b'42', contract.NOT_JSON),
        (b'', contract.NOT_JSON),
        (b'{"a":"' + b"x" * 20000 + b'"}', contract.OVERSIZE),
    ])
    def test_meter_rejections(self, payload, reason):
        assert reasons("meter", payload) == reason

    def test_streetlight_brightness_above_100_and_motion_as_number(self):
        base = {"ts": TS, "seq": 1, "brightness_pct": 101, "power_w": 1, "energy_wh": 1,
                "lux": 1, "motion": False}
        assert reasons("streetlight", orjson.dumps(base)) == contract.OUT_OF_RANGE
        base.update(brightness_pct=50, motion=1)
        assert reasons("streetlight", orjson.dumps(base)) == contract.WRONG_TYPE

    def test_error_says_which_field(self):
        with pytest.raises(ContractError) as e:
            decode_readings("meter", b'{"ts":1790000000000,"seq":1,"energy_kwh":-3,"power_w":1}')
        assert "energy_kwh" in e.value.detail
        assert "greater than or equal to 0" in e.value.detail

    def test_every_problem_is_listed(self):
        with pytest.raises(ContractError) as e:
            decode_readings("meter", b'{"ts":1,"seq":1}')
        assert e.value.reason == contract.OUT_OF_RANGE  # the first problem names the reason
        assert "ts: epoch milliseconds outside" in e.value.detail
        assert "energy_kwh: Field required" in e.value.detail
        assert "power_w: Field required" in e.value.detail

    def test_unknown_kind(self):
        assert reasons("toaster", b"{}") == contract.UNKNOWN_KIND


class TestSenML:
    def test_pack_with_two_times_gives_two_readings(self):
        pack = [
            {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": TS / 1000},
            {"n": "seq", "v": 1},
            {"n": "energy_kwh", "u": "kWh", "v": 10.5},
            {"n": "power_w", "u": "W", "v": 230},
            {"n": "seq", "t": 10, "v": 2},
            {"n": "energy_kwh", "t": 10, "v": 10.6},
            {"n": "power_w", "t": 10, "v": 240},
        ]
        readings = decode_readings("meter", orjson.dumps(pack))
        assert [(r.ts, r.seq, r.energy_kwh) for r in readings] == [
            (TS, 1, 10.5), (TS + 10_000, 2, 10.6)]

    def test_bool_and_string_values(self):
        pack = [{"bt": TS / 1000, "n": "seq", "v": 3}, {"n": "brightness_pct", "v": 30},
                {"n": "power_w", "v": 18}, {"n": "energy_wh", "v": 5}, {"n": "lux", "v": 1},
                {"n": "motion", "vb": True}, {"n": "fault", "vs": "lamp_failure"}]
        [r] = decode_readings("streetlight", orjson.dumps(pack))
        assert r.motion is True and r.fault == "lamp_failure"

    @pytest.mark.parametrize("pack, reason", [
        (b"[]", contract.BAD_SENML),
        (b"[1, 2]", contract.BAD_SENML),
        (b'[{"n":"seq","v":1}]', contract.BAD_SENML),  # relative time: no device clock
        (b'[{"bt":1790000000,"n":"power_w","v":1,"vb":true}]', contract.BAD_SENML),
        (b'[{"bt":1790000000,"n":"seq","v":1},{"n":"energy_kwh","v":NaN},'
         b'{"n":"power_w","v":1}]', contract.NON_FINITE),
        (b'[{"bt":1790000000,"n":"seq","v":1},{"n":"power_w","v":1}]', contract.MISSING_FIELD),
        (b'[{"bt":1790000000,"n":"seq","v":1},{"n":"power_w","v":-1},'
         b'{"n":"energy_kwh","v":1}]', contract.OUT_OF_RANGE),
        (b'[{"bt":', contract.NOT_JSON),
    ])
    def test_rejections(self, pack, reason):
        assert reasons("meter", pack) == reason


def test_command_validation():
    c = contract.validate_command(b'{"id":"c1","ts":1790000000000,"brightness_pct":30,'
                                  b'"reason":"rule:motion-boost","hold_s":60}')
    assert c.brightness_pct == 30.0
    with pytest.raises(ContractError) as e:
        contract.validate_command(b'{"id":"c1","ts":1790000000000,"brightness_pct":130,'
                                  b'"reason":"x"}')
    assert e.value.reason == contract.OUT_OF_RANGE
