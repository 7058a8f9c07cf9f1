"""Alerts: the rule engine's active and recent alerts, and operators' acknowledgements."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam

from gateway import queries
from gateway.deps import AUTH_ERRORS, AcksDep, Operator, SettingsDep, Viewer
from gateway.models import AlertAck, AlertOut
from gateway.problems import documented

router = APIRouter(tags=["alerts"], responses=AUTH_ERRORS)


@router.get("/api/v1/alerts", response_model=list[AlertOut])
def alerts(_: Viewer, settings: SettingsDep, acks: AcksDep, active: bool | None = None,
           limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AlertOut]:
    """Active and recent alerts, newest first."""
    return queries.alerts(settings.data_dir, acks, active=active, limit=limit)


@router.post("/api/v1/alerts/{key}/ack", response_model=AlertAck,
             responses={404: documented("No such alert")})
def ack_alert(key: Annotated[str, PathParam(max_length=200)], _: Operator,
              settings: SettingsDep, acks: AcksDep) -> AlertAck:
    """Acknowledge an alert (it stays until its condition clears)."""
    if not queries.alert_exists(settings.data_dir, key):
        raise HTTPException(404, f"no alert {key!r}")
    return AlertAck(key=key, acknowledged_ms=acks.ack(key))
