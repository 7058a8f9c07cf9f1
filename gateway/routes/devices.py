"""Devices: the registry's inventory with the newest readings, provisioning (MQTT
credentials shown once), edits, revocation and each device's history from the store."""

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, HTTPException, Query, Response
from fastapi import Path as PathParam

from citygrid.contract import ContractError
from citygrid.fleet import FleetDevice
from citygrid.registry import InvalidEntry, RegistryError
from citygrid.store import StoreError
from gateway import queries
from gateway.deps import (
    AUTH_ERRORS,
    Admin,
    BillingConfigDep,
    FeedDep,
    MetricsDep,
    ProvisionerDep,
    Reader,
    RegistryDep,
    StoreDep,
    Viewer,
    meter_account,
    owns,
)
from gateway.models import BucketOut, Device, DeviceChange, NewCredentials, NewDevice
from gateway.problems import documented
from gateway.provisioning import ProvisioningError

router = APIRouter(tags=["devices"], responses=AUTH_ERRORS)
NO_DEVICE = {404: documented("No such device")}
DeviceId = Annotated[str, PathParam(max_length=64)]


@router.get("/api/v1/devices", response_model=list[Device])
def list_devices(_: Viewer, registry: RegistryDep, feed: FeedDep,
                 kind: Literal["streetlight", "meter"] | None = None,
                 district: Annotated[str | None, Query(max_length=64)] = None,
                 status: Annotated[str | None, Query(max_length=32)] = None) -> Response:
    """Registered devices with their latest reading; filter by kind, district, status."""
    # 10,000 devices: plain dicts encoded by orjson (the response model documents the shape).
    body = queries.devices(registry, feed, kind=kind, district=district, status=status)
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/api/v1/devices/{device_id}", response_model=Device, responses=NO_DEVICE)
def one_device(device_id: DeviceId, _: Viewer, registry: RegistryDep, store: StoreDep,
               metrics: MetricsDep) -> Device:
    """One device with its latest reading."""
    record = registry.record(device_id)
    if record is None:
        raise HTTPException(404, f"no device {device_id!r}")
    try:
        point = store.latest(record["kind"], device_id=device_id).get(device_id)
    except StoreError:
        metrics.store_error("latest")
        point = None
    return queries.device(record, {"ts": point.ts_ms, **point.fields} if point else None)


@router.post("/api/v1/devices", response_model=NewCredentials, status_code=201,
             responses={409: documented("Not provisionable"),
                        422: documented("Not a valid entry")})
def provision(device: NewDevice, _: Admin, provisioner: ProvisionerDep) -> NewCredentials:
    """Register a device and return its MQTT credentials — once."""
    try:
        creds = provisioner.provision(FleetDevice(**device.model_dump()))
    except InvalidEntry as e:
        raise HTTPException(422, str(e)) from None
    except (ContractError, ProvisioningError) as e:
        raise HTTPException(409, str(e)) from None
    return NewCredentials(device_id=device.device_id, mqtt_username=creds.username,
                          mqtt_password=creds.password)


@router.patch("/api/v1/devices/{device_id}", response_model=Device,
              responses={**NO_DEVICE, 409: documented("Not a valid change"),
                         422: documented("Not a valid entry")})
def edit_device(device_id: DeviceId, change: DeviceChange, _: Admin, registry: RegistryDep,
                provisioner: ProvisionerDep, feed: FeedDep) -> Device:
    """Change a device's district, position, rated power, account or tariff."""
    record = registry.record(device_id)
    if record is None:
        raise HTTPException(404, f"no device {device_id!r}")
    updates = change.model_dump(exclude_unset=True)
    if not updates:
        return queries.device(record, None)
    try:
        edited = registry.edit(device_id, **updates)
    except InvalidEntry as e:
        raise HTTPException(422, str(e)) from None
    except ContractError as e:
        raise HTTPException(409, str(e)) from None
    except RegistryError as e:  # gone since it was read
        raise HTTPException(404, str(e)) from None
    if "district" in updates and record["status"] == "provisioned":
        provisioner.write_broker_files()  # its topics moved with it
    return queries.device(edited, feed.snapshot().get(device_id))


@router.delete("/api/v1/devices/{device_id}/credentials", status_code=204,
               responses=NO_DEVICE)
def revoke(device_id: DeviceId, _: Admin, provisioner: ProvisionerDep) -> Response:
    """Revoke a device: its MQTT account is gone and the broker reloads at once."""
    try:
        provisioner.revoke(device_id)
    except ProvisioningError as e:
        raise HTTPException(404, str(e)) from None
    return Response(status_code=204)


@router.get("/api/v1/devices/{device_id}/history", response_model=list[BucketOut],
            responses=NO_DEVICE)
def history(device_id: DeviceId,
            field: Annotated[str, Query(pattern=r"^[a-z0-9_]{1,64}$")],
            start_ms: int, end_ms: int, reader: Reader, registry: RegistryDep,
            store: StoreDep, metrics: MetricsDep, config: BillingConfigDep,
            fn: Literal["mean", "min", "max", "sum", "count", "last"] = "mean",
            every_s: Annotated[int, Query(ge=1, le=86_400 * 31)] = 300) -> list[BucketOut]:
    """A field of the device's readings in time buckets. A customer token sees its own
    account's meters (their consumption), no other device."""
    record = registry.record(device_id)
    if record is None:
        raise HTTPException(404, f"no device {device_id!r}")
    if reader.role == "customer":
        owns(reader, meter_account(device_id, registry, config) if record["kind"] == "meter"
             else None, f"device {device_id!r}")
    if end_ms <= start_ms:
        raise HTTPException(422, "end_ms must be after start_ms")
    try:
        buckets = store.aggregate(record["kind"], field, fn, start_ms=start_ms, end_ms=end_ms,
                                  every_ms=every_s * 1000, device_id=device_id)
    except StoreError as e:
        metrics.store_error("aggregate")
        raise HTTPException(503, f"the store did not answer: {e}") from None
    return [BucketOut(start_ms=b.start_ms, value=b.value) for b in buckets]
