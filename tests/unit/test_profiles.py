"""Device profiles (adapters/): loading, decoding vendors' documented payloads, commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from adapters import DecodeError, ProfileError, load_profile, load_profiles, parse_profile
from adapters.cli import add_parsers
from adapters.profile import SHIPPED
from adapters.testing import run_file
from citygrid.contract import Ack, decode_readings

VENDORS = Path(__file__).parent.parent / "data" / "vendors"
NOW = 1_800_000_000_000


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers(dest="cmd"), argparse.ArgumentParser(add_help=False))
    args = p.parse_args(list(argv))
    return args.func(args)


def test_every_shipped_profile_loads_and_has_a_test_file():
    profiles = load_profiles()
    assert set(profiles) == {"tasmota-energy", "shelly-em-gen2", "zigbee2mqtt-light",
                             "zigbee2mqtt-plug", "dsmr-reader", "chirpstack-v4",
                             "chirpstack-v4-light", "sparkplug-b"}
    for name in profiles:
        assert (SHIPPED / f"{name}.test.yaml").exists(), name


@pytest.mark.parametrize("test_file", sorted(SHIPPED.glob("*.test.yaml")), ids=lambda p: p.stem)
def test_shipped_profile_tests_pass(test_file):
    results = run_file(test_file)
    assert results and all(r.ok for r in results), [r.failures for r in results]


def test_cli_exit_codes(tmp_path, capsys):
    assert _cli("adapters", "test", str(SHIPPED / "tasmota-energy.test.yaml")) == 0
    failing = (SHIPPED / "tasmota-energy.test.yaml").read_text().replace(
        "energy_kwh: 1.956", "energy_kwh: 2.5").replace("../../tests", str(VENDORS.parent.parent))
    (tmp_path / "f.test.yaml").write_text(failing)
    assert _cli("adapters", "test", str(tmp_path / "f.test.yaml")) == 1
    assert "missing reading" in capsys.readouterr().out
    (tmp_path / "bad.test.yaml").write_text("profile: tasmota-energy\ncases: []\nextra: 1\n")
    assert _cli("adapters", "test", str(tmp_path / "bad.test.yaml")) == 2
    assert "bad.test.yaml:3:1: unknown key 'extra'" in capsys.readouterr().out


def test_unknown_keys_are_refused_with_file_line_column():
    text = ("profile: x\nkind: meter\nmessages:\n  - topic: a/{native_id}\n"
            "    fields:\n      power_w: {path: p, unit: W, colour: red}\n")
    with pytest.raises(ProfileError) as e:
        parse_profile(text, "x.yaml")
    assert str(e.value).startswith("x.yaml:6:")
    assert "colour" in str(e.value)


@pytest.mark.parametrize("field, message", [
    ("energy_kwh: {path: e, unit: W}", "unit of power"),
    ("lux: {path: l}", "not a field of a meter reading"),
    ("energy_kwh: {path: e, unit: furlongs}", "unknown unit"),
])
def test_bad_mappings_are_refused_at_load(field, message):
    text = ("profile: x\nkind: meter\nmessages:\n  - topic: a/{native_id}\n"
            f"    fields:\n      {field}\n")
    with pytest.raises(ProfileError, match=message):
        parse_profile(text, "x.yaml")


def test_a_local_time_needs_a_valid_timezone():
    text = ("profile: x\nkind: meter\nmessages:\n  - topic: a/{native_id}\n"
            "    timestamp: {path: Time, format: local, timezone: Mars/Olympus}\n")
    with pytest.raises(ProfileError, match="x.yaml:5:.*unknown timezone"):
        parse_profile(text, "x.yaml")


def test_operator_directory_overrides_a_shipped_profile(tmp_path):
    text = (SHIPPED / "tasmota-energy.yaml").read_text().replace("Europe/Copenhagen",
                                                                   "Europe/Helsinki")
    (tmp_path / "tasmota-energy.yaml").write_text(text)
    p = load_profiles(tmp_path)["tasmota-energy"]
    out = p.decode("tele/x/SENSOR", (VENDORS / "tasmota/tele-SENSOR-energy.json").read_bytes(),
                   NOW)
    assert out.readings[0]["ts"] == 1516208390000  # 18:59:50 at UTC+2 = 16:59:50Z


def test_tasmota_reading_passes_the_contract_decoder():
    p = load_profile(SHIPPED / "tasmota-energy.yaml")
    out = p.decode("tele/pow/SENSOR", (VENDORS / "tasmota/tele-SENSOR-energy.json").read_bytes(),
                   NOW)
    import orjson
    (r,) = decode_readings("meter", orjson.dumps(out.readings[0]))
    assert r.energy_kwh == 1.956 and r.seq == r.ts  # seq from ts: survives restarts


def test_absent_fields_are_left_out_not_invented():
    p = load_profile(SHIPPED / "zigbee2mqtt-light.yaml")
    out = p.decode("zigbee2mqtt/bulb", (VENDORS / "zigbee2mqtt/light-LED1545G12.json")
                   .read_bytes(), NOW)
    (reading,) = out.readings
    assert set(reading) == {"ts", "seq", "brightness_pct", "unmeasured"}
    assert sorted(reading["unmeasured"]) == ["energy_wh", "lux", "motion", "power_w"]
    # …and the contract takes it: what the bulb measures, nothing invented.
    import orjson

    from citygrid.contract import decode_readings
    (taken,) = decode_readings("streetlight", orjson.dumps(reading), now_ms=NOW)
    assert set(taken.fields()) == {"seq", "brightness_pct"}


def test_ack_for_a_state_report():
    p = load_profile(SHIPPED / "zigbee2mqtt-light.yaml")
    pending = {"id": "c1", "ts": NOW, "brightness_pct": 40.0, "reason": "rule:x"}
    ack = p.ack_for(pending, {"brightness_pct": 40.16}, NOW + 500)
    assert Ack.model_validate(ack).ok is True
    assert p.ack_for(pending, {"brightness_pct": 80}, NOW) is None
    assert p.ack_for(pending, {}, NOW) is None
    refused = p.ack_for(pending, {"ok": False, "error": "lamp fault"}, NOW)
    assert Ack.model_validate(refused).ok is False


def test_native_topics_for_acls():
    p = load_profile(SHIPPED / "zigbee2mqtt-light.yaml")
    assert p.native_topics("bulb-1") == (["zigbee2mqtt/bulb-1"], ["zigbee2mqtt/bulb-1/set"])
    c = load_profile(SHIPPED / "chirpstack-v4.yaml")
    pub, sub = c.native_topics("app-1:0101")
    assert pub == ["application/app-1/device/0101/event/up"]
    assert sub == ["application/app-1/device/0101/command/down"]
    with pytest.raises(ValueError):
        c.native_topics("no-colon")


def test_native_id_from_a_payload_path_and_senml():
    text = ("profile: senml-meter\nkind: meter\nmessages:\n  - topic: meters/{native_id}\n"
            "    format: senml\n  - topic: gw/up\n    native_id: {path: dev.id}\n"
            "    timestamp: {path: t, format: epoch_s}\n    fields:\n"
            "      energy_kwh: {path: wh, unit: Wh}\n      power_w: {path: w}\n")
    p = parse_profile(text, "s.yaml")
    out = p.decode("gw/up", b'{"dev": {"id": "m-9"}, "t": 1767225600, "wh": 5000, "w": 12}',
                   NOW)
    assert out.native_id == "m-9"
    assert out.readings == [{"ts": 1767225600000, "seq": 1767225600000, "energy_kwh": 5.0,
                             "power_w": 12}]
    pack = b'[{"bn": "m-9:", "bt": 1767225600, "n": "energy_kwh", "v": 1.5}, ' \
           b'{"n": "power_w", "v": 3}]'
    out = p.decode("meters/m-9", pack, NOW)
    assert out.readings[0]["energy_kwh"] == 1.5 and out.readings[0]["ts"] == 1767225600000
    with pytest.raises(DecodeError) as e:
        p.decode("gw/up", b'{"t": 1767225600, "wh": 1, "w": 1}', NOW)
    assert e.value.reason == "missing_field"


def test_decode_error_reasons_are_stable():
    p = load_profile(SHIPPED / "tasmota-energy.yaml")
    cases = {b"{": "not_json", b"[1]": "bad_payload",
             b'{"Time": "2022-01-11T21:57:38", "ENERGY": {"Total": 1, "Power": -5}}':
             "bad_payload"}
    for payload, reason in cases.items():
        with pytest.raises(DecodeError) as e:
            p.decode("tele/x/SENSOR", payload, NOW)
        assert e.value.reason == reason, payload
    with pytest.raises(DecodeError) as e:
        p.decode("stat/x/RESULT", b"{}", NOW)
    assert e.value.reason == "no_mapping"
