"""The gateway API's request and response bodies (pydantic), as its OpenAPI documents them.

Problem details (the error body) live with their handlers in :mod:`gateway.problems`.
"""

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from citygrid.fleet import NATIVE_ID_PATTERN, PROFILE_PATTERN

Road = Literal["arterial", "residential", "footpath", "park"]
CabinetId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["cab-norrebro-03"])]
LampTypeName = Annotated[str, Field(pattern=PROFILE_PATTERN, examples=["led-55w"])]

# What the API shows of a registry record, in this order (the registry keeps more).
DEVICE_KEYS = ("device_id", "kind", "district", "lat", "lon", "rated_w", "account_id",
               "tariff", "status", "device_profile", "native_id", "road", "cabinet",
               "lamp_type")


class Device(BaseModel):
    device_id: str
    kind: Literal["streetlight", "meter"]
    district: str
    lat: float
    lon: float
    status: str = "registered"
    rated_w: float | None = None
    account_id: str | None = None
    tariff: str | None = None
    device_profile: str | None = Field(None, description="Off-the-shelf: its device profile.")
    native_id: str | None = Field(None, description="Its own name on its native topics.")
    road: Road | None = Field(None, description="Streetlights: the road class it lights.")
    cabinet: str | None = Field(None, description="Streetlights: the cabinet that feeds it.")
    lamp_type: str | None = Field(None, description="Streetlights: its lamp type.")
    latest: dict[str, Any] | None = Field(None, description="The newest stored reading.")


class NewDevice(BaseModel):
    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["sl-10001"])]
    kind: Literal["streetlight", "meter"]
    district: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["norrebro"])]
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    rated_w: Annotated[float, Field(gt=0, le=2000)] | None = None
    account_id: str | None = None
    tariff: str | None = None
    street: Annotated[str, Field(max_length=200)] | None = None
    max_power_w: Annotated[float, Field(gt=0)] | None = None
    device_profile: Annotated[str, Field(pattern=PROFILE_PATTERN,
                                         examples=["tasmota-energy"])] | None = None
    native_id: Annotated[str, Field(pattern=NATIVE_ID_PATTERN,
                                    examples=["livingroom-lamp"])] | None = None
    road: Road | None = None
    cabinet: CabinetId | None = None
    lamp_type: LampTypeName | None = None


class DeviceChange(BaseModel):
    district: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    rated_w: Annotated[float, Field(gt=0, le=2000)] | None = None
    account_id: Annotated[str, Field(max_length=64)] | None = None
    tariff: Annotated[str, Field(max_length=64)] | None = None
    device_profile: Annotated[str, Field(pattern=PROFILE_PATTERN)] | None = None
    native_id: Annotated[str, Field(pattern=NATIVE_ID_PATTERN)] | None = None
    road: Road | None = None
    cabinet: CabinetId | None = None
    lamp_type: LampTypeName | None = None

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"rated_w": 55}]}}

    @model_validator(mode="before")
    @classmethod
    def _required_fields_are_not_cleared(cls, data: Any) -> Any:
        # rated power, account and tariff may be cleared with null; a device always has a
        # district and a position (the registry's NOT NULL columns: a 500 before).
        if isinstance(data, dict):
            cleared = [k for k in ("district", "lat", "lon") if k in data and data[k] is None]
            if cleared:
                raise ValueError(f"{', '.join(cleared)} cannot be null: a device always has "
                                 "a district and a position")
        return data


class NewCredentials(BaseModel):
    device_id: str
    mqtt_username: str
    mqtt_password: str = Field(description="Shown once; only its hash is kept.")


class OverrideBody(BaseModel):
    level: Annotated[float, Field(ge=0, le=100, examples=[80])]
    expires_in_s: Annotated[float, Field(gt=0, le=31 * 86_400, examples=[3600])] | None = None


class OverrideAccepted(BaseModel):
    accepted: bool = True
    lights: list[str]


class RuleHealthOut(BaseModel):
    id: str
    description: str | None
    evaluations: int
    fired: int
    last_fired_ms: int | None
    errors: int
    last_error: str | None


class RuleText(BaseModel):
    name: str = "uploaded.yaml"
    text: Annotated[str, Field(max_length=1_000_000)]


class RuleValidation(BaseModel):
    ok: bool
    rules: list[str] = []
    problems: list[str] = []


class AlertOut(BaseModel):
    key: str
    rule: str
    severity: str
    message: str
    scope: str
    since_ms: int
    active: bool
    cleared_ms: int | None
    acknowledged_ms: int | None


class AlertAck(BaseModel):
    key: str
    acknowledged_ms: int


class AccountOut(BaseModel):
    account_id: str
    balance_minor: int
    low_balance_minor: int
    currency: str
    low: bool


class AccountDetail(BaseModel):
    """An account: its balance (None before its first settlement), name and meters."""

    account_id: str
    name: str | None
    balance_minor: int | None
    low_balance_minor: int | None
    currency: str
    low: bool
    meters: list[str]


class BucketOut(BaseModel):
    start_ms: int
    value: float | None


class Health(BaseModel):
    ok: bool
    broker: bool
    store: bool
    broker_node: str | None = Field(None, description="The broker node that answers first "
                                                      "(host:port), None if none does.")
    broker_nodes: dict[str, bool] = Field({}, description="Each node of CITYGRID_MQTT_URL: "
                                                         "whether it answers.")
    feed_node: str | None = Field(None, description="The node the gateway's live feed (the "
                                                    "status page's readings, commands and "
                                                    "settlements) is connected to; None while "
                                                    "it is not.")


class LedgerStatus(BaseModel):
    ok: bool
    entries: int
    head: str | None
    error: str | None = None


class InvoiceSummary(BaseModel):
    """An invoice or credit note without its document (docs/invoices.md)."""

    number: str = Field(examples=["INV-2026-000001"])
    kind: Literal["invoice", "credit_note"]
    account: str
    period: str | None = Field(None, description="YYYY-MM of a monthly invoice; null: on demand")
    issued_at_ms: int
    total_minor: int = Field(description="charged (invoice) or credited (credit note), in "
                             "minor units, VAT included")
    currency: str
    refers_to: str | None = Field(None, description="a credit note's invoice")
    due_date: str | None = Field(None, examples=["2026-04-16"], description="the city date "
                                 "the outstanding amount is payable by; null when the account "
                                 "owed nothing at issue (and on credit notes)")
    ledger_seq: int = Field(description="the ledger entry that issued it")
    sha256: str = Field(description="SHA-256 of the document's canonical JSON, also in its "
                        "ledger entry")


class OverdueOut(BaseModel):
    """An account's newest invoice past its due date, not yet covered (docs/invoices.md)."""

    account: str
    number: str = Field(examples=["INV-2026-000004"])
    due_date: str = Field(examples=["2026-04-11"])
    outstanding_minor: int = Field(description="what the invoice said was outstanding")
    owed_minor: int = Field(description="what is still owed of it, after the payments and "
                            "credit notes since")
    currency: str


class InvoiceOut(InvoiceSummary):
    document: dict[str, Any] = Field(description="the document as hashed: seller, account, "
                                     "lines, VAT, totals, payments, the ledger entries it "
                                     "covers with their hashes, the ledger head")


class IssueInvoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    period: str | None = Field(None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$", examples=["2026-03"],
                               description="the monthly invoice of this month (ended); "
                               "omitted: on demand, everything not yet invoiced")


class CreditNoteBody(BaseModel):
    """An amount (gross, in currency units) or the invoice's line numbers credited in full."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500)
    amount: Decimal | None = Field(None, gt=0, max_digits=14, decimal_places=4,
                                   examples=["12.50"])
    lines: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one(self) -> "CreditNoteBody":
        if (self.amount is None) == (self.lines is None):
            raise ValueError("give amount or lines, one of the two")
        return self


class UnregisteredDevice(BaseModel):
    """A device ingest saw on the wire that the registry does not know (or knows as revoked),
    per topic kind and district."""

    device_id: str
    kind: str = Field(description="The kind in its topic.")
    district: str = Field(description="The district in its topic.")
    first_seen: int = Field(description="Its first message, epoch ms (ingest's clock).")
    last_seen: int = Field(description="Its latest message, epoch ms (ingest's clock).")
    count: int = Field(description="Messages seen from it, under this kind and district.")
    sample: str = Field(description="Its latest payload as text, at most 4 KiB.")


class RegisterDevice(BaseModel):
    """What the registry needs to know of a device seen on the wire; kind and district
    default to the ones in its topic."""

    kind: Literal["streetlight", "meter"] | None = None
    district: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                   examples=["norrebro"])] | None = None
    lat: Annotated[float, Field(ge=-90, le=90, examples=[55.6961])]
    lon: Annotated[float, Field(ge=-180, le=180, examples=[12.5442])]
    rated_w: Annotated[float, Field(gt=0, le=2000)] | None = None
    account_id: Annotated[str, Field(max_length=64)] | None = None
    tariff: Annotated[str, Field(max_length=64)] | None = None


# ------------------------------------------------------------------ work orders


class WhoAmI(BaseModel):
    """The caller's token: its role (what it may do), name, and a customer's account."""

    role: Literal["customer", "viewer", "operator", "admin"]
    name: str | None
    account: str | None = None

WorkOrderState = Literal["open", "assigned", "done"]
Cause = Literal["lamp_replaced", "driver_replaced", "cable_fault", "no_fault_found"]


class WorkOrderEvent(BaseModel):
    """One entry of an order's history: a trigger that opened or joined it, a transition."""

    ts_ms: int
    event: Literal["opened", "joined", "assigned", "done"]
    who: str = Field(description="`rules`, `citizen`, or the name of the operator's token.")
    ref: str | None = Field(None, description="The alert key or report id that opened or "
                            "joined it.")
    problem: str | None = None
    detail: str | None = Field(None, description="The light a trigger was for; the assignee "
                               "or the cause of a transition.")


class WorkOrderOut(BaseModel):
    id: str = Field(examples=["WO-000042"])
    target_kind: Literal["device", "cabinet"]
    target: str = Field(description="The light's device id or the cabinet's id.")
    district: str
    lat: float | None
    lon: float | None
    problem: str = Field(description="What opened it: lamp_fault, lamp_power, day_burning, "
                         "cycling, cabinet_supply_loss, missing_ack, citizen_report.")
    state: WorkOrderState
    assignee: str | None
    cause: Cause | None
    note: str | None
    created_ms: int
    assigned_ms: int | None
    done_ms: int | None
    repair_h: float | None = Field(description="Hours from opened to done.")
    history: list[WorkOrderEvent] | None = Field(
        None, description="Every trigger and transition (one order; not in lists).")


class AssignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    assignee: Annotated[str, Field(min_length=1, max_length=100, pattern=r"\S",
                                   examples=["crew-north-2"])]


class DoneBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cause: Cause
    note: Annotated[str, Field(max_length=2000)] | None = None


class RepairStats(BaseModel):
    """Time to repair in one district: hours from opened to done over its orders done."""

    district: str
    open: int
    assigned: int
    done: int
    median_repair_h: float | None
    mean_repair_h: float | None


# ------------------------------------------------------------------ Open311 (GeoReport v2)


# What a citizen can report (GET /api/v1/services describes each).
ServiceCode = Literal["streetlight-out", "streetlight-day-burning", "streetlight-flickering",
                      "streetlight-damaged"]


class Open311Service(BaseModel):
    service_code: ServiceCode
    service_name: str
    description: str
    metadata: bool = False
    type: Literal["realtime", "batch", "blackbox"] = "realtime"
    keywords: str
    group: str = "streetlights"


class ReportBody(BaseModel):
    """A citizen's service request as Open311 GeoReport v2 clients send it (JSON or a form).
    Unknown keys (``api_key``, ``jurisdiction_id``, ``attribute[…]``) are ignored."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    service_code: Annotated[ServiceCode, Field(examples=["streetlight-out"])]
    lat: Annotated[float, Field(ge=-90, le=90, allow_inf_nan=False, examples=[55.6961])]
    long: Annotated[float, Field(ge=-180, le=180, allow_inf_nan=False, examples=[12.5442])]
    description: Annotated[str, Field(max_length=4000)] | None = None
    address_string: Annotated[str, Field(max_length=250)] | None = None
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    first_name: Annotated[str, Field(max_length=100)] | None = None
    last_name: Annotated[str, Field(max_length=100)] | None = None
    media_url: Annotated[str, Field(max_length=2000, pattern=r"^https?://\S+$")] | None = None


class Open311Accepted(BaseModel):
    service_request_id: str = Field(examples=["SR-000007"])
    service_notice: str
    account_id: str | None = None


class Open311Request(BaseModel):
    """A service request in GeoReport v2's shape (no personal data: not the email or names)."""

    service_request_id: str
    status: Literal["open", "closed"]
    status_notes: str | None
    service_name: str
    service_code: str
    description: str | None
    agency_responsible: str
    service_notice: str
    requested_datetime: str
    updated_datetime: str
    expected_datetime: str | None = None
    address: str | None
    address_id: str | None = None
    zipcode: str | None = None
    lat: float
    long: float
    media_url: str | None


class LampOut(BaseModel):
    """A streetlight's lamp as the rule engine's lamp monitor last saved it (a rule file turns
    the monitor on with ``settings.lamp_monitor``)."""

    device_id: str
    district: str | None = Field(description="Its district in the registry (None: no longer "
                                             "a streetlight there).")
    lamp_type: str = Field(description="Its lamp type (generic-<rated>w: it names none).",
                           examples=["led-55w"])
    burning_h: float = Field(description="Hours burning since the lamp was new (or since "
                                         "counting began).")
    switch_ons: int = Field(description="Times switched on (off → on), since then.")
    remaining_life_h: float = Field(description="The lamp type's rated life less the burning "
                                                "hours (negative: past it).")
    replaced_ms: int | None = Field(description="When the lamp was last replaced, epoch ms.")


class PaymentRequestOut(BaseModel):
    """A request to an account's payment agent (docs/payments.md) and how far it got."""

    key: str = Field(description="The idempotency key the agent is sent (Idempotency-Key).")
    account: str
    kind: Literal["settlement", "invoice", "top_up"]
    reference: str = Field(description="The settlement's key or the invoice's number (a "
                                       "top-up: the settlement that took the balance below).")
    amount_minor: int
    currency: str
    status: Literal["pending", "sent", "confirmed", "declined"] = Field(
        description="pending: not answered yet; sent: the agent accepted it, its callback is "
                    "awaited; confirmed: paid (a payment entry in the ledger); declined.")
    attempts: int = Field(description="Times it was sent.")
    created_ms: int
    next_try_ms: int | None = Field(description="When it is sent again (open requests).")
    last_error: str | None = Field(description="Why the last try failed, or why it was "
                                               "declined.")
    payment_id: str | None = Field(description="The agent's id of the payment, confirmed.")
    sent_ms: int | None
    answered_ms: int | None = Field(description="When it was confirmed or declined.")


class PaymentsOut(BaseModel):
    requests: list[PaymentRequestOut] = Field(description="Newest first.")
    payments: list[dict[str, Any]] = Field(description="The ledger's payment entries, newest "
                                                       "first, each with its hash.")


class CallbackOut(BaseModel):
    """The answer to an agent's callback (docs/payments.md)."""

    request: str
    status: Literal["pending", "sent", "confirmed", "declined"]
    duplicate: bool = Field(description="True: this outcome was recorded before; nothing "
                                        "changed.")
    entry: dict[str, Any] | None = Field(description="The payment's ledger entry (confirmed).")
