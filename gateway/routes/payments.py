"""Payments (docs/payments.md): the payment agents' signed callback, and the requests with
their outcome for operators.

The callback carries no bearer token: an agent is not an operator, and it proves who it is
with the HMAC signature under its account's shared secret, which billing checks
(``billing.handle_payment_callback``). It is left out of the operators' OpenAPI document:
its contract is "payment agent protocol v1" in docs/payments.md, versioned on its own.
"""

import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import billing
from citygrid.settings import Settings
from citygrid.yamlconf import ConfigError
from gateway.deps import AUTH_ERRORS, Reader, SettingsDep, scope
from gateway.models import CallbackOut, PaymentRequestOut, PaymentsOut
from gateway.problems import documented, problem

router = APIRouter(tags=["billing"])
SIGNATURE_HEADER = "CityGrid-Signature"

_configs: dict[tuple[str | None, float], billing.BillingConfig] = {}
_configs_lock = threading.Lock()


CALLBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    401: documented("Unsigned, badly signed, or outside the replay window"),
    404: documented("No such payment request"),
    409: documented("Contradicts the outcome already recorded"),
    413: documented("The body is over 64 KiB"),
    422: documented("A malformed body, or an amount or currency that does not match"),
    503: documented("The billing configuration or the account's secret is not available"),
}


def _config(settings: Settings) -> billing.BillingConfig:
    """The billing file, read again only when it changed (an agent or secret added)."""
    path = settings.billing
    try:
        mtime = Path(path).stat().st_mtime if path else 0.0
    except OSError:
        mtime = -1.0  # load_config names the problem
    with _configs_lock:
        config = _configs.get((path, mtime))
        if config is None:
            config = billing.load_config(path)
            _configs.clear()
            _configs[(path, mtime)] = config
    return config


@router.post("/api/v1/billing/payments/callback", responses=CALLBACK_ERRORS)
async def callback(request: Request, settings: SettingsDep) -> JSONResponse:
    """An agent confirms or declines a payment request: 200 with the outcome (also for a
    duplicate, which changes nothing); 401 unsigned, badly signed, or outside the replay
    window; 404 an unknown request; 409 contradicting a recorded outcome; 413 too large; 422
    a bad body or an amount or currency that does not match. Problems as problem details."""
    body = await request.body()
    try:
        outcome = await run_in_threadpool(  # SQLite and YAML: off the event loop
            _apply, settings, request.headers.get(SIGNATURE_HEADER), body)
    except billing.PaymentCallbackError as e:
        headers = {"WWW-Authenticate": SIGNATURE_HEADER} if e.status == 401 else {}
        response = problem(e.status, e.title, e.detail, request)
        response.headers.update(headers)
        return response
    return JSONResponse(CallbackOut(**outcome.body()).model_dump())


def _apply(settings: Settings, signature: str | None, body: bytes) -> billing.PaymentOutcome:
    try:
        config = _config(settings)
    except ConfigError as e:
        raise billing.PaymentCallbackError(503, f"the billing configuration cannot be read: "
                                           f"{e}") from None
    return billing.handle_payment_callback(settings.data_dir, config, signature, body)


@router.get("/api/v1/billing/payments", response_model=PaymentsOut, responses=AUTH_ERRORS)
def payments(reader: Reader, settings: SettingsDep,
             account: Annotated[str | None, Query(max_length=64)] = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> PaymentsOut:
    """Payment requests to the accounts' agents — status, attempts, the last error — newest
    first, and the ledger's payment entries; ``account``: one account's only (a customer
    token: its own)."""
    only = scope(reader, account)
    accounts = None if only is None else frozenset({only})
    requests = billing.payment_requests(settings.data_dir, accounts=accounts, limit=limit)
    entries: list[dict[str, Any]] = billing.payment_entries(settings.data_dir, accounts=accounts,
                                                            limit=limit)
    return PaymentsOut(requests=[_out(r) for r in requests], payments=entries)


def _out(r: billing.PaymentRequest) -> PaymentRequestOut:
    return PaymentRequestOut(
        key=r.key, account=r.account, kind=r.kind, reference=r.reference,  # type: ignore[arg-type]
        amount_minor=r.amount_minor, currency=r.currency, status=r.status,  # type: ignore[arg-type]
        attempts=r.attempts, created_ms=r.created_ms,
        next_try_ms=r.next_try_ms if r.status in ("pending", "sent") else None,
        last_error=r.last_error, payment_id=r.payment_id, sent_ms=r.sent_ms,
        answered_ms=r.answered_ms)
