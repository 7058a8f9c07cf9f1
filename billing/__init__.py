"""Billing: tariffs, meter-register accounting, settlement and the hash-chained ledger; read
functions (accounts, settlements, ledger status) for the other services."""

from billing.cli import add_parsers  # noqa: I001 (last: it uses the read functions above)
from billing.config import BillingConfig
from billing.config import load as load_config
from billing.ledger import BillingStore, LedgerError, Settlement, verify
from billing.read import (
    Account,
    LedgerStatus,
    accounts,
    check_balances,
    ledger_status,
    settlements,
)
from billing.tariffs import period_of, price_now

__all__ = ["Account", "BillingConfig", "BillingStore", "LedgerError", "LedgerStatus",
           "Settlement", "accounts", "add_parsers", "check_balances", "ledger_status",
           "load_config", "period_of", "price_now", "settlements", "verify"]
