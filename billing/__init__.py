"""Billing: tariffs, meter-register accounting, settlement and the hash-chained ledger; payments
(payment agents, docs/payments.md); read
functions (accounts, settlements, ledger status, meters' interval data) for the other
services; the ledger's anchoring; invoices and credit notes, and their HTML and PDF."""

import argparse

from billing.anchor import HEAD_TOPIC, Anchor
from billing.anchor import path as anchor_path
from billing.anchor import read as read_anchor
from billing.cli import add_parsers as _ledger_parsers
from billing.config import BillingConfig
from billing.config import load as load_config
from billing.invoice_cli import add_parsers as _invoice_parsers
from billing.invoices import (
    BadCredit,
    BadPeriod,
    CreditTooLarge,
    Invoice,
    InvoiceError,
    NoSuchInvoice,
    NothingToInvoice,
    Overdue,
    UnknownAccount,
    get_invoice,
    issue_due,
    list_invoices,
    open_db,
    verify_invoice,
)
from billing.invoices import credit as credit_note
from billing.invoices import issue as issue_invoice
from billing.invoices import overdue as overdue_invoices
from billing.ledger import BillingStore, LedgerError, Settlement, verify
from billing.meterdata import MAX_GAP_MS, Interval, intervals
from billing.payments import CallbackError as PaymentCallbackError
from billing.payments import CallbackOutcome as PaymentOutcome
from billing.payments import PaymentRequest, payment_entries, payment_requests
from billing.payments import dispatcher as payment_dispatcher
from billing.payments import handle_callback as handle_payment_callback
from billing.read import (
    Account,
    LedgerStatus,
    accounts,
    check_balances,
    entries_after,
    entry_time,
    last_seq,
    ledger_status,
    settlements,
)
from billing.render import render_html, render_pdf
from billing.tariffs import period_of, price_now


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """``citygrid ledger …`` and ``citygrid invoice …``."""
    _ledger_parsers(sub, common)
    _invoice_parsers(sub, common)


__all__ = ["Account", "Anchor", "BadCredit", "BadPeriod", "BillingConfig", "BillingStore",
           "CreditTooLarge", "HEAD_TOPIC", "Interval", "Invoice", "InvoiceError", "LedgerError",
           "LedgerStatus", "MAX_GAP_MS", "NoSuchInvoice", "NothingToInvoice", "Overdue",
           "PaymentCallbackError", "PaymentOutcome", "PaymentRequest", "Settlement",
           "UnknownAccount", "accounts", "add_parsers", "anchor_path", "check_balances",
           "credit_note", "entries_after", "entry_time", "get_invoice", "handle_payment_callback",
           "intervals", "issue_due", "issue_invoice", "last_seq", "ledger_status", "list_invoices",
           "load_config", "open_db", "overdue_invoices", "payment_dispatcher", "payment_entries",
           "payment_requests", "period_of", "price_now", "read_anchor", "render_html",
           "render_pdf", "settlements", "verify", "verify_invoice"]
