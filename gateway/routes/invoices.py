"""Invoices and credit notes (docs/invoices.md): the list, one as JSON, HTML or PDF, an
account's invoice on demand, a credit note against an invoice. Writes go through billing's
functions (one ``BEGIN IMMEDIATE`` transaction each, beside the rule engine's settlements).

Every lookup takes the caller's account scope (``Scope``): None for operators' and viewers'
tokens; a customer token's own account, and another account's invoice then answers 404 as if
it did not exist.
"""

import dataclasses
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse

import billing
from citygrid.city import city
from citygrid.clock import SYSTEM_CLOCK
from citygrid.settings import Settings
from gateway import queries
from gateway.deps import AUTH_ERRORS, Operator, Reader, SettingsDep, scope
from gateway.models import CreditNoteBody, InvoiceOut, InvoiceSummary, IssueInvoice, OverdueOut
from gateway.problems import documented

router = APIRouter(tags=["billing"], responses=AUTH_ERRORS)
Number = Annotated[str, PathParam(max_length=32, examples=["INV-2026-000001"])]
AccountId = Annotated[str, PathParam(max_length=64, examples=["acc-00042"])]
NOT_FOUND = {404: documented("No such invoice or credit note")}
# What an HTML invoice may load: nothing but its own inline style.
HTML_POLICY = "default-src 'none'; style-src 'unsafe-inline'"


def account_scope(reader: Reader) -> str | None:
    """The one account the caller may see: a customer token's own; None: every account
    (viewer, operator, admin)."""
    return scope(reader, None)


Scope = Annotated[str | None, Depends(account_scope)]


def _problem(e: billing.InvoiceError) -> HTTPException:
    return HTTPException(e.status, str(e))


def _find(settings: Settings, number: str, scope: str | None) -> billing.Invoice:
    try:
        return queries.invoice(settings.data_dir, number, scope=scope)
    except billing.InvoiceError as e:
        raise _problem(e) from None


def _out(inv: billing.Invoice) -> InvoiceOut:
    return InvoiceOut(**inv.summary(), document=inv.document)


@router.get("/api/v1/billing/invoices", response_model=list[InvoiceSummary])
def list_invoices(reader: Reader, settings: SettingsDep, only: Scope,
                  account: Annotated[str | None, Query(max_length=64)] = None,
                  kind: Literal["invoice", "credit_note"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> list[InvoiceSummary]:
    """Invoices and credit notes, newest first, optionally of one account (a customer
    token: its own)."""
    return [InvoiceSummary(**i.summary()) for i in queries.invoices(
        settings.data_dir, account=scope(reader, account), kind=kind, limit=limit,
        scope=only)]


@router.get("/api/v1/billing/invoices/{number}.html", response_class=HTMLResponse,
            responses={**NOT_FOUND, 200: {"content": {"text/html": {}},
                                          "description": "The invoice as one HTML page"}})
def invoice_html(_: Reader, settings: SettingsDep, scope: Scope, number: Number
                 ) -> HTMLResponse:
    """The invoice or credit note as an HTML page (self-contained, every value escaped)."""
    inv = _find(settings, number, scope)
    return HTMLResponse(billing.render_html(inv.document),
                        headers={"Content-Security-Policy": HTML_POLICY})


@router.get("/api/v1/billing/invoices/{number}.pdf", response_class=Response,
            responses={**NOT_FOUND, 200: {"content": {"application/pdf": {}},
                                          "description": "The invoice as an A4 PDF"}})
def invoice_pdf(_: Reader, settings: SettingsDep, scope: Scope, number: Number) -> Response:
    """The invoice or credit note as a PDF download."""
    inv = _find(settings, number, scope)
    return Response(billing.render_pdf(inv.document), media_type="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="{inv.number}.pdf"'})


@router.get("/api/v1/billing/invoices/{number}", response_model=InvoiceOut,
            responses=NOT_FOUND)
def invoice_json(_: Reader, settings: SettingsDep, scope: Scope, number: Number) -> InvoiceOut:
    """One invoice or credit note with its document (what its ledger entry hashes)."""
    return _out(_find(settings, number, scope))


def _writing(settings: Settings):
    """billing.sqlite open for writing, the billing configuration and the city's timezone."""
    return billing.open_db(settings.data_dir), billing.load_config(settings.billing), \
        city(settings.city).tz


@router.get("/api/v1/billing/overdue", response_model=list[OverdueOut])
def overdue(_: Reader, settings: SettingsDep, scope: Scope) -> list[OverdueOut]:
    """The accounts whose invoice is past its due date (the city's date today) and not
    covered by the payments and credit notes since: the newest such invoice of each, with
    what is still owed. A customer token sees its own account's, if any."""
    db = billing.open_db(settings.data_dir)
    try:
        found = billing.overdue_invoices(db, city(settings.city).tz, SYSTEM_CLOCK.now_ms())
    finally:
        db.close()
    return [OverdueOut(**dataclasses.asdict(o)) for o in found
            if scope is None or o.account == scope]


@router.post("/api/v1/billing/accounts/{account}/invoices", response_model=InvoiceOut,
             status_code=201, responses={
                 200: {"model": InvoiceOut, "description": "That month's invoice, issued "
                       "before (issuing it again changes nothing)"},
                 404: documented("No such account"),
                 409: documented("Nothing to invoice"),
                 422: documented("A bad period, or one that has not ended")})
def issue_invoice(_: Operator, settings: SettingsDep, scope: Scope, account: AccountId,
                  response: Response, body: Annotated[IssueInvoice | None, Body()] = None
                  ) -> InvoiceOut:
    """Issue the account's invoice now: on demand, every settlement not yet invoiced; with
    ``period``, that month's invoice (the same one if it was issued already)."""
    if scope is not None and scope != account:
        raise HTTPException(404, f"account {account!r}: not found")
    db, config, tz = _writing(settings)
    try:
        inv = billing.issue_invoice(db, config, tz, account, SYSTEM_CLOCK.now_ms(),
                                    period=body.period if body else None)
    except billing.InvoiceError as e:
        raise _problem(e) from None
    finally:
        db.close()
    if not inv.created:
        response.status_code = 200
    return _out(inv)


@router.post("/api/v1/billing/invoices/{number}/credit-notes", response_model=InvoiceOut,
             status_code=201, responses={
                 404: documented("No such invoice"),
                 409: documented("More than the invoice charged, with its earlier credit "
                                 "notes"),
                 422: documented("A bad amount or line, or a credit note given")})
def credit_note(_: Operator, settings: SettingsDep, scope: Scope, number: Number,
                body: CreditNoteBody) -> InvoiceOut:
    """A credit note against the invoice: a new ledger entry crediting the account — the
    invoice is never edited."""
    _find(settings, number, scope)  # another account's: 404, before anything is written
    db, config, tz = _writing(settings)
    try:
        cn = billing.credit_note(db, config, tz, number, body.reason, SYSTEM_CLOCK.now_ms(),
                                 amount=body.amount, lines=body.lines)
    except billing.InvoiceError as e:
        raise _problem(e) from None
    finally:
        db.close()
    return _out(cn)
