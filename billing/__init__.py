"""Billing: tariffs, meter-register accounting, settlement and the hash-chained ledger; payments
(payment agents, docs/payments.md); read
functions (accounts, settlements, ledger status, meters' interval data) for the other
services; the ledger's anchoring."""

from billing.cli import add_parsers  # noqa: I001 (last: it uses the read functions above)
from billing.anchor import HEAD_TOPIC, Anchor
from billing.anchor import path as anchor_path
from billing.anchor import read as read_anchor
from billing.config import BillingConfig
from billing.config import load as load_config
from billing.meterdata import MAX_GAP_MS, Interval, intervals
from billing.ledger import BillingStore, LedgerError, Settlement, verify
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
    ledger_status,
    settlements,
)
from billing.tariffs import period_of, price_now

__all__ = ["HEAD_TOPIC", "MAX_GAP_MS", "Account", "Anchor", "BillingConfig", "BillingStore",
           "Interval", "LedgerError", "LedgerStatus", "PaymentCallbackError", "PaymentOutcome",
           "PaymentRequest", "Settlement", "accounts", "add_parsers", "anchor_path",
           "check_balances", "handle_payment_callback", "intervals", "ledger_status",
           "load_config", "payment_dispatcher", "payment_entries", "payment_requests",
           "period_of", "price_now", "read_anchor", "settlements", "verify"]
