"""Lights: operators' overrides (one light or a whole district), sent to the rule engine over
MQTT, and why a light is at its level."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam

from citygrid.contract import Topic
from citygrid.registry import Registry
from gateway import queries
from gateway.deps import (
    AUTH_ERRORS,
    Operator,
    PublisherDep,
    RegistryDep,
    SettingsDep,
    Viewer,
)
from gateway.models import OverrideAccepted, OverrideBody
from gateway.problems import documented
from gateway.publisher import Publisher

router = APIRouter(tags=["lights"], responses={
    **AUTH_ERRORS, 404: documented("No such light"), 503: documented("Broker unreachable")})
DeviceId = Annotated[str, PathParam(max_length=64)]


def _district_of_light(registry: Registry, device_id: str) -> str:
    record = registry.record(device_id)
    if record is None or record["kind"] != "streetlight":
        raise HTTPException(404, f"no streetlight {device_id!r}")
    return record["district"]


def _send_override(publisher: Publisher, device_id: str, district: str, body: dict) -> None:
    """Overrides go to the rule engine, which arbitrates them above every rule."""
    try:
        publisher.publish(str(Topic(district, "streetlight", device_id, "override")),
                          json.dumps(body).encode())
    except (OSError, RuntimeError, ValueError) as e:
        raise HTTPException(503, f"the broker did not take the override: {e}") from None


@router.put("/api/v1/lights/{device_id}/override", response_model=OverrideAccepted,
            status_code=202)
def set_override(device_id: DeviceId, body: OverrideBody, _: Operator, registry: RegistryDep,
                 publisher: PublisherDep) -> OverrideAccepted:
    """Hold a light at a level (optionally for a while); it wins over every rule."""
    district = _district_of_light(registry, device_id)
    _send_override(publisher, device_id, district, {"level": body.level,
                                                    "expires_in_s": body.expires_in_s})
    return OverrideAccepted(lights=[device_id])


@router.delete("/api/v1/lights/{device_id}/override", response_model=OverrideAccepted,
               status_code=202)
def clear_override(device_id: DeviceId, _: Operator, registry: RegistryDep,
                   publisher: PublisherDep) -> OverrideAccepted:
    """End the operator's override: the rules decide again."""
    district = _district_of_light(registry, device_id)
    _send_override(publisher, device_id, district, {"clear": True})
    return OverrideAccepted(lights=[device_id])


@router.put("/api/v1/districts/{district}/override", response_model=OverrideAccepted,
            status_code=202)
def district_override(district: Annotated[str, PathParam(max_length=64)], body: OverrideBody,
                      _: Operator, registry: RegistryDep, publisher: PublisherDep
                      ) -> OverrideAccepted:
    """The same override for every light of a district."""
    ids = [r["device_id"] for r in registry.records(kind="streetlight", district=district)]
    if not ids:
        raise HTTPException(404, f"no streetlights in {district!r}")
    for device_id in ids:
        _send_override(publisher, device_id, district, {"level": body.level,
                                                        "expires_in_s": body.expires_in_s})
    return OverrideAccepted(lights=ids)


@router.get("/api/v1/lights/{device_id}/explain")
def explain(device_id: DeviceId, _: Viewer, registry: RegistryDep, settings: SettingsDep
            ) -> dict[str, Any]:
    """Why the light is at its level: the winning wish and every other, with expiries."""
    _district_of_light(registry, device_id)
    return queries.explain(settings, registry, device_id)
