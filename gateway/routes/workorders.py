"""Work orders for the street-lighting crews: the list (and its CSV), one order with its
history, assigning and closing one, and the time to repair per district. The orders are the
maintenance store's (citygrid/maintenance.py): the rule engine opens them from its alerts,
citizens' reports (gateway/routes/reports.py) open them too."""

import csv
import io
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from citygrid.clock import SYSTEM_CLOCK
from citygrid.maintenance import InvalidTransition, NoSuchOrder, WorkOrder, WorkOrderError
from gateway.deps import AUTH_ERRORS, OperatorName, Viewer, WorkOrdersDep
from gateway.models import (
    AssignBody,
    DoneBody,
    RepairStats,
    WorkOrderOut,
    WorkOrderState,
)
from gateway.problems import documented

router = APIRouter(tags=["work orders"], responses=AUTH_ERRORS)
OrderId = Annotated[str, PathParam(max_length=20, examples=["WO-000042"])]
TRANSITION_ERRORS = {404: documented("No such work order"),
                     409: documented("The order's state does not allow it (done is final)")}
CSV_COLUMNS = ("id", "state", "problem", "target_kind", "target", "district", "lat", "lon",
               "assignee", "cause", "note", "created", "assigned", "done", "repair_h")


def _filters(state: list[WorkOrderState] | None, district: str | None, device: str | None,
             limit: int) -> dict:
    return {"state": state, "district": district, "device": device, "limit": limit}


StateFilter = Annotated[list[WorkOrderState] | None, Query(
    description="Only orders in these states (repeat it: `?state=open&state=assigned`).")]
DistrictFilter = Annotated[str | None, Query(max_length=64)]
DeviceFilter = Annotated[str | None, Query(max_length=64, description=(
    "Only the orders of this light: its own and the cabinet orders it joined."))]
Limit = Annotated[int, Query(ge=1, le=10_000)]


@router.get("/api/v1/work-orders", response_model=list[WorkOrderOut],
            response_model_exclude={"__all__": {"history"}})
def list_orders(_: Viewer, orders: WorkOrdersDep, state: StateFilter = None,
                district: DistrictFilter = None, device: DeviceFilter = None,
                limit: Limit = 500) -> list[dict]:
    """Work orders, newest first, optionally filtered by state, district and light."""
    return [o.as_dict() for o in orders.list(**_filters(state, district, device, limit))]


@router.get("/api/v1/work-orders.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}},
                             "description": "One order a row, with a header"}})
def orders_csv(_: Viewer, orders: WorkOrdersDep, state: StateFilter = None,
               district: DistrictFilter = None, device: DeviceFilter = None,
               limit: Limit = 10_000) -> Response:
    """The list as CSV (RFC 4180, UTF-8, times in ISO 8601 UTC), for a spreadsheet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for o in orders.list(**_filters(state, district, device, limit)):
        writer.writerow(_csv_row(o))
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="work-orders.csv"'})


def _iso(ms: int | None) -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _text(value: str | None) -> str:
    """Free text as a spreadsheet shows it, never as a formula it would run."""
    if not value:
        return ""
    return "'" + value if value[0] in "=+-@\t\r" else value


def _csv_row(o: WorkOrder) -> list:
    return [o.id, o.state, o.problem, o.target_kind, o.target, o.district,
            "" if o.lat is None else o.lat, "" if o.lon is None else o.lon, _text(o.assignee),
            o.cause or "", _text(o.note), _iso(o.created_ms), _iso(o.assigned_ms),
            _iso(o.done_ms), "" if o.repair_h is None else round(o.repair_h, 3)]


@router.get("/api/v1/work-orders/stats", response_model=list[RepairStats])
def repair_stats(_: Viewer, orders: WorkOrdersDep,
                 district: DistrictFilter = None) -> list[RepairStats]:
    """Per district: orders open, assigned and done, and the median and mean hours from
    opened to done."""
    return [RepairStats(**vars(s)) for s in orders.stats(district)]


@router.get("/api/v1/work-orders/{order_id}", response_model=WorkOrderOut,
            responses={404: documented("No such work order")})
def get_order(order_id: OrderId, _: Viewer, orders: WorkOrdersDep) -> dict:
    """One order with its history: every alert and report that joined it, every transition
    with who and when."""
    order = orders.get(order_id)
    if order is None:
        raise HTTPException(404, f"no work order {order_id!r} (ids look like WO-000042)")
    return order.as_dict()


def _transition(change) -> dict:
    try:
        return change().as_dict()
    except NoSuchOrder as e:
        raise HTTPException(404, str(e)) from None
    except InvalidTransition as e:
        raise HTTPException(409, str(e)) from None
    except WorkOrderError as e:
        raise HTTPException(422, str(e)) from None


@router.post("/api/v1/work-orders/{order_id}/assign", response_model=WorkOrderOut,
             responses=TRANSITION_ERRORS)
def assign(order_id: OrderId, body: AssignBody, who: OperatorName,
           orders: WorkOrdersDep) -> dict:
    """Give an open order to a crew (or an assigned one to another crew)."""
    return _transition(lambda: orders.assign(order_id, body.assignee, who,
                                             SYSTEM_CLOCK.now_ms()))


@router.post("/api/v1/work-orders/{order_id}/done", response_model=WorkOrderOut,
             responses=TRANSITION_ERRORS)
def done(order_id: OrderId, body: DoneBody, who: OperatorName, orders: WorkOrdersDep) -> dict:
    """Close an open or assigned order with its cause (and a note). Done is final; a new
    fault on the light opens a new order. `lamp_replaced` resets the light's burning hours
    in the rule engine."""
    return _transition(lambda: orders.done(order_id, body.cause, who, SYSTEM_CLOCK.now_ms(),
                                           note=body.note))
