"""docs/asyncapi.yaml is generated from the models; it must not drift from them."""

import yaml

from citygrid import asyncapi
from tests.helpers import REPO


def test_committed_document_matches_the_models():
    committed = (REPO / "docs" / "asyncapi.yaml").read_text()
    assert committed == asyncapi.render(), (
        "docs/asyncapi.yaml is stale: run `citygrid contract asyncapi > docs/asyncapi.yaml`")


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_every_reference_resolves():
    doc = yaml.safe_load(asyncapi.render())
    assert doc["asyncapi"] == "3.0.0"
    refs = list(_refs(doc))
    assert refs
    for ref in refs:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref


def test_contract_fields_are_documented():
    schemas = yaml.safe_load(asyncapi.render())["components"]["schemas"]
    light = schemas["StreetlightReading"]
    assert {"ts", "seq", "brightness_pct"} <= set(light["required"])
    # The measured fields: required unless the device lists them in `unmeasured`.
    unless = {c["anyOf"][0]["required"][0] for c in light["allOf"]}
    assert unless == {"power_w", "energy_wh", "lux", "motion"}
    assert light["properties"]["brightness_pct"]["maximum"] == 100
    assert set(schemas["MeterReading"]["required"]) == {"ts", "seq", "energy_kwh"}
    assert [c["anyOf"][0]["required"] for c in schemas["MeterReading"]["allOf"]] == [
        ["power_w"]]


def test_the_adapters_native_channels_are_documented_from_the_profiles():
    from adapters import asyncapi as native
    from adapters import load_profiles

    committed = (REPO / "docs" / "asyncapi-adapters.yaml").read_text()
    assert committed == native.render(), (
        "docs/asyncapi-adapters.yaml is stale: "
        "run `citygrid adapters asyncapi > docs/asyncapi-adapters.yaml`")
    doc = yaml.safe_load(committed)
    for ref in _refs(doc):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    addresses = {c["address"] for c in doc["channels"].values()}
    for name, profile in load_profiles().items():
        assert {m.topic for m in profile.spec.messages} <= addresses, name
        if profile.spec.command:
            assert profile.spec.command.topic in addresses, name
    tasmota = doc["channels"]["tasmota-energy"]
    assert tasmota["address"] == "tele/{native_id}/SENSOR"
    assert "energy_kwh ← `ENERGY.Total` in kWh" in tasmota["description"]
