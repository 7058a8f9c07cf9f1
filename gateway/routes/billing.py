"""Billing: accounts with their balances, settlements from the ledger, the ledger's status."""

from typing import Annotated, Any

from fastapi import APIRouter, Query

from gateway import queries
from gateway.deps import AUTH_ERRORS, SettingsDep, Viewer
from gateway.models import AccountOut, LedgerStatus

router = APIRouter(tags=["billing"], responses=AUTH_ERRORS)


@router.get("/api/v1/billing/ledger", response_model=LedgerStatus)
def ledger_status(_: Viewer, settings: SettingsDep) -> LedgerStatus:
    """Whether the ledger's hash chain verifies, its size and head."""
    return queries.ledger(settings.data_dir)


@router.get("/api/v1/billing/accounts", response_model=list[AccountOut])
def accounts(_: Viewer, settings: SettingsDep) -> list[AccountOut]:
    """Accounts with their balances (minor units)."""
    return queries.accounts(settings.data_dir)


@router.get("/api/v1/billing/settlements")
def settlements(_: Viewer, settings: SettingsDep,
                meter: Annotated[str | None, Query(max_length=64)] = None,
                account: Annotated[str | None, Query(max_length=64)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """Ledger entries, newest first, each with its hash."""
    return queries.settlements(settings.data_dir, meter=meter, account=account, limit=limit)
