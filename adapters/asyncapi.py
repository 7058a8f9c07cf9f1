"""The AsyncAPI 3 document of the adapters' native channels, generated from the profiles.

One channel per message a profile reads (the device's own topic, its payload format and how
each contract field is taken from it) and per command topic it writes; each channel names
the contract channel it is translated to. ``citygrid adapters asyncapi`` prints it;
docs/asyncapi-adapters.yaml is the shipped profiles' copy (a test fails on drift).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from adapters.profile import FieldMap, Profile, load_profiles

_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _address(topic: str) -> tuple[str, dict[str, Any]]:
    params = {v: {"description": f"the device's {v.replace('_', ' ')} (a topic level)"}
              for v in _VAR.findall(topic)}
    return topic, params


def _source(f: FieldMap) -> str:
    if f.path:
        where = f"`{f.path}`"
    elif f.sum:
        where = " + ".join(f"`{p}`" for p in f.sum)
    elif f.metric:
        where = f"metric `{f.metric}`"
    else:
        where = f"the constant {f.const!r}"
    extra = [f"in {f.unit}" if f.unit else "", f"× {f.scale}" if f.scale else "",
             f"mapped {f.map}" if f.map else "", "when present" if f.optional else ""]
    return " ".join([where, *[e for e in extra if e]])


def _describe(profile: Profile, message) -> str:
    lines = [f"{profile.spec.description or profile.name} ({profile.kind}). "
             f"Translated to city/v1/{{district}}/{profile.kind}/{{device_id}}/telemetry for "
             "the registered device with this profile and native id."]
    ts = message.timestamp
    if ts.source == "receipt":
        lines.append("Time: the time of receipt.")
    else:
        zone = f" in {ts.timezone}" if ts.timezone else ""
        lines.append(f"Time: `{ts.path}` ({ts.format}{zone}).")
    for name, f in message.fields.items():
        lines.append(f"- {name} ← {_source(f)}")
    if message.passthrough:
        lines.append(f"- every contract field of the object at `{message.passthrough}`")
    if message.status:
        lines.append(f"The device goes {message.status} (contract status).")
    if profile.spec.absent:
        lines.append("Not measured (listed in the reading's `unmeasured`): "
                     + ", ".join(profile.spec.absent) + ".")
    if profile.spec.source:
        lines.append(f"Vendor documentation: {profile.spec.source}")
    return "\n".join(lines)


def _payload(fmt: str) -> dict[str, Any]:
    if fmt == "sparkplug":
        return {"type": "string", "format": "binary",
                "description": "Sparkplug B protobuf (Eclipse Tahu sparkplug_b.proto)"}
    if fmt == "senml":
        return {"type": "array", "description": "RFC 8428 SenML JSON pack"}
    return {"type": "object", "description": "the vendor's JSON"}


def document(profiles: dict[str, Profile] | None = None) -> dict[str, Any]:
    profiles = profiles if profiles is not None else load_profiles()
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for name in sorted(profiles):
        profile = profiles[name]
        for i, message in enumerate(profile.spec.messages):
            key = f"{name}.{i + 1}" if len(profile.spec.messages) > 1 else name
            address, params = _address(message.topic)
            mid = f"{key}.message"
            messages[mid] = {
                "name": mid, "contentType": ("application/x-protobuf"
                                             if message.format == "sparkplug"
                                             else "application/json"),
                "payload": _payload(message.format)}
            channels[key] = {"address": address, "description": _describe(profile, message),
                             "messages": {mid: {"$ref": f"#/components/messages/{mid}"}},
                             **({"parameters": params} if params else {})}
            operations[f"{key}.receive"] = {
                "action": "receive", "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"{name}: the device publishes; the adapters translate"}
        command = profile.spec.command
        if command is not None:
            key = f"{name}.command"
            address, params = _address(command.topic)
            mid = f"{key}.message"
            template = command.payload if command.format == "json" else command.metrics
            messages[mid] = {
                "name": mid, "contentType": ("application/x-protobuf"
                                             if command.format == "sparkplug"
                                             else "application/json"),
                "payload": {**_payload(command.format),
                            "description": f"from the contract command; template: {template}"}}
            channels[key] = {
                "address": address,
                "description": (f"A contract command on city/v1/{{district}}/{profile.kind}/"
                                "{device_id}/cmd, translated for the device; its next state "
                                f"report within {profile.spec.ack.tolerance} % of the level "
                                "becomes the contract ack."),
                "messages": {mid: {"$ref": f"#/components/messages/{mid}"}},
                **({"parameters": params} if params else {})}
            operations[f"{key}.send"] = {
                "action": "send", "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"{name}: the adapters command the device"}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "CityGrid adapters: native channels of off-the-shelf devices",
                 "version": "1",
                 "description": ("What the adapters service reads and writes on the devices' "
                                 "own topics, by device profile (adapters/profiles). The "
                                 "contract channels they translate to are in asyncapi.yaml.")},
        "channels": channels, "operations": operations,
        "components": {"messages": messages},
    }


def render(profiles: dict[str, Profile] | None = None) -> str:
    return yaml.safe_dump(document(profiles), sort_keys=False, allow_unicode=True, width=100)
