"""Unregistered devices: what ingest saw on the wire from devices the registry does not know
(``ingest.read_unregistered``), and registering one from there.

Included before the devices router, so ``/api/v1/devices/unregistered`` is this list and not
the device called ``unregistered``.
"""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam

from citygrid.contract import ContractError, Topic
from citygrid.fleet import FleetDevice
from citygrid.registry import RegistryError
from gateway import queries
from gateway.deps import AUTH_ERRORS, Admin, FeedDep, RegistryDep, SettingsDep, Viewer
from gateway.models import Device, RegisterDevice, UnregisteredDevice
from gateway.problems import documented
from ingest import read_unregistered

router = APIRouter(tags=["devices"], responses=AUTH_ERRORS)
REGISTRABLE = ("streetlight", "meter")
DeviceId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


@router.get("/api/v1/devices/unregistered", response_model=list[UnregisteredDevice])
def list_unregistered(_: Viewer, settings: SettingsDep, registry: RegistryDep,
                      limit: Annotated[int, Query(ge=1, le=100_000)] = 1000
                      ) -> list[UnregisteredDevice]:
    """Devices whose readings reached ingest but which the registry does not know (or knows
    as revoked), most recently seen first, per topic kind and district: first and last seen
    (epoch ms), messages, the latest payload. Their readings are stored, or dead-lettered as
    `unknown_device` with `CITYGRID_UNKNOWN_DEVICES=quarantine`. A device leaves the list
    once registered. Ingest writes what it saw once a second."""
    return [UnregisteredDevice(**d)
            for d in read_unregistered(settings.data_dir, registry=registry, limit=limit)]


@router.post("/api/v1/devices/unregistered/{device_id}/register", response_model=Device,
             status_code=201,
             responses={404: documented("Ingest has seen no unregistered device by that id"),
                        409: documented("Already registered, or not a valid device"),
                        422: documented("Invalid request, or not a valid entry")})
def register(device_id: DeviceId, body: RegisterDevice, _: Admin, settings: SettingsDep,
             registry: RegistryDep, feed: FeedDep) -> Device:
    """Put a device seen on the wire into the registry (status `registered`) with its
    position; kind and district default to those in its topic. It gets no MQTT account here
    (it publishes already): `POST /api/v1/devices` with its id gives it one. Its readings
    count as registered from ingest's next look at the registry (within a second or two)."""
    seen = [d for d in read_unregistered(settings.data_dir, registry=registry)
            if d["device_id"] == device_id]
    record = registry.record(device_id)
    if record is not None and record["status"] != "revoked":
        raise HTTPException(409, f"{device_id!r} is registered already "
                            f"(status {record['status']})")
    if not seen:
        raise HTTPException(404, f"ingest has seen no unregistered device {device_id!r}")
    kind = body.kind or _only(device_id, "kind", {d["kind"] for d in seen})
    district = body.district or _only(device_id, "district", {d["district"] for d in seen})
    if kind not in REGISTRABLE:  # a kind the contract gained since (the API's Device has two)
        raise HTTPException(409, f"kind {kind!r}: only {' and '.join(REGISTRABLE)} register here")
    try:
        Topic(district, kind, device_id)  # ids and kind must fit the contract
    except ContractError as e:
        raise HTTPException(409, str(e)) from None
    device = FleetDevice(device_id=device_id, kind=kind, district=district, lat=body.lat,
                         lon=body.lon, rated_w=body.rated_w, account_id=body.account_id,
                         tariff=body.tariff)
    try:
        registry.upsert(device, status="registered")
    except RegistryError as e:  # the registry's own check of the entry
        raise HTTPException(422, str(e)) from None
    record = registry.record(device_id)
    if record is None:  # cannot happen short of the file being replaced under us
        raise HTTPException(409, f"{device_id!r} did not stay in the registry")
    return queries.device(record, feed.snapshot().get(device_id))


def _only(device_id: str, field: str, values: set[str]) -> str:
    if len(values) == 1:
        return next(iter(values))
    raise HTTPException(422, f"{device_id!r} was seen under more than one {field} "
                        f"({', '.join(sorted(values))}): say which")


__all__ = ["router"]
