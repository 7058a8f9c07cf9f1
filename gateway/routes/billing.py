"""Billing: accounts with their balances, settlements from the ledger, the ledger's status.

Accounts and settlements serve customer tokens too, each its own account only."""

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam

from gateway import queries
from gateway.deps import (
    AUTH_ERRORS,
    BillingConfigDep,
    Reader,
    RegistryDep,
    SettingsDep,
    Viewer,
    meter_account,
    owns,
    scope,
)
from gateway.models import AccountDetail, AccountOut, LedgerStatus
from gateway.problems import documented

router = APIRouter(tags=["billing"], responses=AUTH_ERRORS)
NOT_YOURS = {404: documented("No such account or meter (or not the customer token's own)")}
AccountId = Annotated[str, PathParam(max_length=64)]


@router.get("/api/v1/billing/ledger", response_model=LedgerStatus)
def ledger_status(_: Viewer, settings: SettingsDep) -> LedgerStatus:
    """Whether the ledger's hash chain verifies, its size and head."""
    return queries.ledger(settings.data_dir)


@router.get("/api/v1/billing/accounts", response_model=list[AccountOut])
def accounts(reader: Reader, settings: SettingsDep) -> list[AccountOut]:
    """Accounts with their balances (minor units); a customer token sees its own."""
    only = scope(reader, None)
    return [a for a in queries.accounts(settings.data_dir)
            if only is None or a.account_id == only]


@router.get("/api/v1/billing/accounts/{account_id}", response_model=AccountDetail,
            responses=NOT_YOURS)
def account(account_id: AccountId, reader: Reader, settings: SettingsDep,
            registry: RegistryDep, config: BillingConfigDep) -> AccountDetail:
    """One account: its balance, name and meters (those the billing file or the registry
    bind to it)."""
    scope(reader, account_id)
    found = next((a for a in queries.accounts(settings.data_dir)
                  if a.account_id == account_id), None)
    bound = {m: b.account for m, b in config.meters.items()}
    for r in registry.records(kind="meter"):
        bound.setdefault(r["device_id"], r.get("account_id"))
    meters = sorted(m for m, a in bound.items() if a == account_id)
    if found is None and not meters and account_id not in config.accounts:
        raise HTTPException(404, f"no account {account_id!r}")
    listed = config.accounts.get(account_id)
    return AccountDetail(account_id=account_id, name=listed.name if listed else None,
                         balance_minor=found.balance_minor if found else None,
                         low_balance_minor=found.low_balance_minor if found else None,
                         currency=config.currency, low=found.low if found else False,
                         meters=meters)


@router.get("/api/v1/billing/settlements", responses=NOT_YOURS)
def settlements(reader: Reader, settings: SettingsDep, registry: RegistryDep,
                config: BillingConfigDep,
                meter: Annotated[str | None, Query(max_length=64)] = None,
                account: Annotated[str | None, Query(max_length=64)] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """Ledger entries, newest first, each with its hash; a customer token sees its own
    account's."""
    account = scope(reader, account)
    if meter is not None:
        owns(reader, meter_account(meter, registry, config), f"meter {meter!r}")
    return queries.settlements(settings.data_dir, meter=meter, account=account, limit=limit)
