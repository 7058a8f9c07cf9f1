"""What routes are handed: the caller's role and the app's services.

Roles as types (``_: Viewer`` in a route's signature lets a viewer, operator or admin token
in; ``Operator``, ``Admin`` ask more): a request without a bearer token gets 401, one with an
unknown token 401 (and after too many of those from one address, 429 with Retry-After), one
whose role is too low 403. The services (store, registry, provisioner, tokens, feed,
publisher, settings, …) are the ones ``create_app`` put on ``app.state``.

No ``from __future__ import annotations`` here: FastAPI must see the dependencies in the
``Annotated[…, Depends(…)]`` types as objects, not strings.
"""

import threading
import time
from collections import deque
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from billing import BillingConfig
from citygrid.maintenance import WorkOrders
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store import TelemetryStore
from gateway.acks import Acks
from gateway.feed import Feed
from gateway.metrics import Metrics
from gateway.problems import documented
from gateway.provisioning import Provisioner
from gateway.publisher import Publisher
from gateway.tokens import ROLES, Holder, Tokens

# What every route with a role documents besides its own answers.
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: documented("No or unknown bearer token"),
    403: documented("The token's role is too low"),
    429: documented("Too many unknown tokens from this address lately (see Retry-After)"),
}


class FailedTokenLimiter:
    """Guessing tokens is slow: after ``limit`` unknown tokens from one address within
    ``window_s``, that address gets 429 until the oldest failure leaves the window."""

    def __init__(self, limit: int = 10, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._failures.setdefault(client, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # forget quiet addresses, bound the memory
                for k in [k for k, q in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[k]

    def blocked_for(self, client: str) -> int:
        now = time.monotonic()
        with self._lock:
            q = self._recent(client, now)
            if len(q) < self.limit:
                return 0
            return max(1, int(q[-self.limit] + self.window_s - now + 0.999))


# ------------------------------------------------------------------ services


def _app_state(name: str):
    """A dependency that hands a route the service ``create_app`` put on ``app.state``."""

    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
StoreDep = Annotated[TelemetryStore, Depends(_app_state("store"))]
RegistryDep = Annotated[Registry, Depends(_app_state("registry"))]
ProvisionerDep = Annotated[Provisioner, Depends(_app_state("provisioner"))]
TokensDep = Annotated[Tokens, Depends(_app_state("tokens"))]
FeedDep = Annotated[Feed, Depends(_app_state("feed"))]
PublisherDep = Annotated[Publisher, Depends(_app_state("publisher"))]
AcksDep = Annotated[Acks, Depends(_app_state("acks"))]
MetricsDep = Annotated[Metrics, Depends(_app_state("metrics"))]
LimiterDep = Annotated[FailedTokenLimiter, Depends(_app_state("limiter"))]
WorkOrdersDep = Annotated[WorkOrders, Depends(_app_state("workorders"))]
BillingConfigDep = Annotated[BillingConfig, Depends(_app_state("billing_config"))]
# Citizens' reports per address (they come without a token): the same sliding window.
ReportLimiterDep = Annotated[FailedTokenLimiter, Depends(_app_state("report_limiter"))]

# ------------------------------------------------------------------ roles

bearer = HTTPBearer(auto_error=False)


def _authenticate(request: Request, creds: HTTPAuthorizationCredentials | None,
                  tokens: Tokens, limiter: FailedTokenLimiter) -> Holder:
    if creds is None:
        raise HTTPException(401, "a bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    client = request.client.host if request.client else "?"
    wait_s = limiter.blocked_for(client)
    if wait_s:
        raise HTTPException(429, f"too many unknown tokens from {client}; try again in "
                            f"{wait_s} s", headers={"Retry-After": str(wait_s)})
    found = tokens.holder(creds.credentials)
    if found is None:
        limiter.failed(client)
        raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    return found


def require(minimum: str):
    """A dependency that lets in tokens of role ``minimum`` or higher; it returns the role."""
    if minimum not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")

    def check(request: Request,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
              tokens: TokensDep, limiter: LimiterDep) -> str:
        found = _authenticate(request, creds, tokens, limiter).role
        if ROLES[found] < ROLES[minimum]:
            raise HTTPException(403, f"this needs the {minimum} role; the token is {found}")
        return found

    check.__name__ = f"require_{minimum}"
    return check


def _reader(request: Request,
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
            tokens: TokensDep, limiter: LimiterDep) -> Holder:
    return _authenticate(request, creds, tokens, limiter)


Viewer = Annotated[str, Depends(require("viewer"))]
Operator = Annotated[str, Depends(require("operator"))]
Admin = Annotated[str, Depends(require("admin"))]
# The routes that serve one account's own data let customer tokens in too: ``scope`` and
# ``owns`` below keep a customer to its account.
Reader = Annotated[Holder, Depends(_reader)]


def scope(reader: Holder, account: str | None) -> str | None:
    """The account a read is limited to: a customer's own (asking for another → 404, as if
    it did not exist), else the one asked for (None: all)."""
    if reader.role != "customer":
        return account
    if account is not None and account != reader.account:
        raise HTTPException(404, f"no account {account!r}")
    return reader.account


def meter_account(meter_id: str, registry: Registry, config: BillingConfig) -> str | None:
    """The account a meter bills to: the billing file's `meters:`, else its registry entry."""
    binding = config.meters.get(meter_id)
    if binding is not None:
        return binding.account
    record = registry.record(meter_id)
    return record.get("account_id") if record else None


def owns(reader: Holder, account: str | None, what: str) -> None:
    """404 unless ``reader`` may see a thing of ``account`` (``what`` names it, e.g. "meter
    m-1"): a customer only its own account's things, the other roles everything."""
    if reader.role == "customer" and (account is None or account != reader.account):
        raise HTTPException(404, f"no {what}")


def _who(role: Operator, tokens: TokensDep,
         creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """An operator (or admin) by their token's name, for a history: ``name (role)``."""
    name = tokens.name(creds.credentials) if creds is not None else None
    return f"{name} ({role})" if name else role


OperatorName = Annotated[str, Depends(_who)]

__all__ = ["AUTH_ERRORS", "AcksDep", "Admin", "BillingConfigDep", "FailedTokenLimiter", "FeedDep",
           "MetricsDep", "Operator", "OperatorName", "ProvisionerDep", "PublisherDep", "Reader",
           "RegistryDep", "ReportLimiterDep", "SettingsDep", "StoreDep", "TokensDep", "Viewer",
           "WorkOrdersDep", "bearer", "meter_account", "owns", "require", "scope"]
