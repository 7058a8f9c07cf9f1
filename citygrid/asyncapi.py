"""The AsyncAPI 3 document of the MQTT contract, generated from the payload models."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic.json_schema import models_json_schema

from citygrid import contract

_ID_PARAM = {"description": f"Matches {contract.ID_PATTERN}; no '+', '#' or '/'."}

SENML_PACK = {
    "type": "array",
    "title": "SenMLPack",
    "description": (
        "RFC 8428 SenML JSON pack, resolved as its §4 says: the base fields bn, bt, bu, bv and "
        "bs apply to their record and every later one until changed (bn is prepended to n, bt "
        "added to t, bu is the unit of records without u, bv added to v, bs to s). A resolved "
        "time (bt + t) below 2**28 is relative to the time of receipt; otherwise absolute epoch "
        "seconds. Records with the same resolved time form one reading; a record's name (bn + "
        "n, last ':' or '/' part) is the reading's field name, e.g. brightness_pct; one pack "
        "carries one device. Each reading needs a seq record. A value with no unit is in its "
        "field's own unit; one in another unit of the same quantity is converted exactly, any "
        "other unit is refused as bad_unit, '%' included (RFC 8428 defines it as a ratio, "
        "devices mean percent). Each field's units, its own first: "
        + "; ".join(f"{f}: {', '.join(contract.units_for(f))}" for f in contract.FIELD_UNITS)
        + ". bver 10 (the default), 26 (10 plus RFC 9100's secondary units) and older drafts' "
        "versions are read; other versions are refused as bad_senml, as are labels ending in "
        "'_'. Sums (s, bs) and data values (vd) are ignored."
    ),
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {
            "bn": {"type": "string"}, "bt": {"type": "number"}, "bu": {"type": "string"},
            "bv": {"type": "number"}, "bs": {"type": "number"},
            "bver": {"type": "integer", "minimum": 1},
            "n": {"type": "string"}, "t": {"type": "number"}, "u": {"type": "string"},
            "v": {"type": "number"}, "vb": {"type": "boolean"}, "vs": {"type": "string"},
            "vd": {"type": "string"}, "s": {"type": "number"}, "ut": {"type": "number"},
        },
    },
}


def document() -> dict[str, Any]:
    models = [(m, "validation") for m in (*contract.KINDS.values(), contract.Command,
                                          contract.Ack, contract.Status, contract.Settlement,
                                          contract.Override)]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    schemas["SenMLPack"] = SENML_PACK

    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def add(kind: str, channel: str, name: str, payloads: list[str], action: str, summary: str,
            retain: bool = False) -> None:
        channel_id = f"{kind}_{channel}"
        refs = {}
        for payload in payloads:
            message_id = f"{kind}_{payload}" if payload == "SenMLPack" else payload
            messages[message_id] = {
                "name": message_id,
                "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{payload}"},
            }
            refs[message_id] = {"$ref": f"#/components/messages/{message_id}"}
        channels[channel_id] = {
            "address": f"city/v1/{{district}}/{kind}/{{device_id}}/{channel}",
            "description": summary,
            "parameters": {"district": _ID_PARAM, "device_id": _ID_PARAM},
            "messages": refs,
            "bindings": {"mqtt": {"bindingVersion": "0.2.0"}},
        }
        operations[f"{name}_{kind}_{channel}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in refs],
            "bindings": {"mqtt": {"qos": 1, "retain": retain, "bindingVersion": "0.2.0"}},
        }

    for kind, model in contract.KINDS.items():
        add(kind, "telemetry", "receive", [model.__name__, "SenMLPack"], "receive",
            f"One {kind} reading (JSON object) or a SenML pack, QoS 1.")
        add(kind, "status", "receive", ["Status"], "receive",
            "Retained presence; the device's Last Will publishes online=false.", retain=True)
    add("streetlight", "cmd", "send", ["Command"], "send",
        "A level to apply, with MQTT 5 message expiry and the reason that won.")
    add("streetlight", "ack", "receive", ["Ack"], "receive",
        "The device applied (or refused) a command; brightness_pct is the level now.")
    add("streetlight", "override", "send", ["Override"], "send",
        "Platform-internal: the gateway hands an operator override (or its end) to the rule "
        "engine, which arbitrates it above every rule.")
    add("meter", "settlement", "send", ["Settlement"], "send",
        "A settlement: the meter's consumption billed to its account, as the ledger entry "
        "(verify the chain with `citygrid ledger verify`).")

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "CityGrid device contract",
            "version": "1.0.0",
            "description": (
                "MQTT contract v1 between streetlights/meters and CityGrid. Unknown payload "
                "fields are ignored; known fields with a wrong type, NaN/Infinity or out-of-range "
                "values are rejected to the dead-letter store with the reason (one of "
                f"{', '.join(contract.REASONS)}). Generated by "
                "`citygrid contract asyncapi`; do not edit by hand."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "city": {"host": "localhost:1883", "protocol": "mqtt", "protocolVersion": "5",
                     "description": "The city's broker (Mosquitto by default)."},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # plain YAML, no &anchors
        return True


def render() -> str:
    return yaml.dump(document(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
