"""Payments: the payer's own mechanism pays automatically (docs/payments.md, "payment agent
protocol v1").

A settlement, an invoice or a prepaid account falling below its threshold puts a *payment
request* in the outbox table ``payment_requests`` of ``billing.sqlite`` — inside the very
transaction that creates the debt, so a crash never loses a request nor makes two. The
:class:`Dispatcher` sends each request to the account's payment agent (an HTTP endpoint the
billing file names), signed with HMAC-SHA256 over a timestamp and the body and carrying the
request's key as its ``Idempotency-Key``, and asks again with backoff until the agent has
answered through the signed callback (:func:`callback`, served by the gateway). A confirmed
payment is a ledger entry of its own (``kind: payment``, key ``payment:<request key>``),
chained like the rest and crediting the account; a replayed or duplicated callback changes
nothing.

Several rule workers may share one billing.sqlite and run a dispatcher each: a request is
*claimed* (its ``next_try_ms`` moved a lease ahead, in one ``BEGIN IMMEDIATE`` transaction)
before it is sent, so two never send it at once, and a dispatcher that dies mid-send leaves a
claim that simply runs out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing import ledger as _ledger  # the module, not its names: ledger imports this one
from billing.config import BillingConfig, PaymentAgent
from citygrid import statedb
from citygrid.settings import SettingsError

log = logging.getLogger(__name__)

PROTOCOL = 1
SIGNATURE_HEADER = "CityGrid-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
ATTEMPT_HEADER = "CityGrid-Attempt"
TOLERANCE_S = 300  # the replay window: a signature older or newer than this is refused
BACKOFF_BASE_S = 2.0  # the first retry after about 2 s, doubling …
BACKOFF_CAP_S = 600.0  # … up to 10 minutes
CONFIRM_WAIT_S = 300.0  # an accepted request with no callback is asked again after this
LEASE_S = 30.0  # a claim: no other dispatcher sends the request for this long
TIMEOUT_S = 10.0  # per HTTP request to an agent
MAX_BODY = 64 * 1024  # a callback body larger than this is refused (413)
KINDS = ("settlement", "invoice", "top_up")
OPEN = ("pending", "sent")  # a request still waiting for its outcome
PATH = "/api/v1/billing/payments/callback"  # the gateway's callback route

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS payment_requests (
    key TEXT PRIMARY KEY, account TEXT NOT NULL, kind TEXT NOT NULL, reference TEXT NOT NULL,
    amount_minor INTEGER NOT NULL, currency TEXT NOT NULL, created_ms INTEGER NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL, next_try_ms INTEGER NOT NULL,
    last_error TEXT, payment_id TEXT, sent_ms INTEGER, answered_ms INTEGER,
    claimed_by TEXT, updated_ms INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS payment_requests_due ON payment_requests (status, next_try_ms)",
    "CREATE INDEX IF NOT EXISTS payment_requests_by_account ON payment_requests "
    "(account, kind, status)",
)
_COLUMNS = ("key", "account", "kind", "reference", "amount_minor", "currency", "created_ms",
            "status", "attempts", "next_try_ms", "last_error", "payment_id", "sent_ms",
            "answered_ms", "claimed_by", "updated_ms")


def ensure_schema(db: sqlite3.Connection) -> None:
    """The outbox table, created where it is missing; single statements, so this may run
    inside a caller's transaction (``executescript`` would commit it)."""
    for statement in _SCHEMA:
        db.execute(statement)


# ------------------------------------------------------------------ signing


class SignatureError(ValueError):
    """A missing, malformed, stale or wrong signature (the callback answers 401)."""


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The v1 signature: lowercase hex HMAC-SHA256, keyed with the shared secret, of the
    timestamp (Unix seconds, decimal), a full stop, and the body's bytes exactly as sent."""
    return hmac.new(secret, str(int(timestamp)).encode() + b"." + body,
                    hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``CityGrid-Signature`` header's value: ``t=<timestamp>,v1=<signature>``."""
    return f"t={int(timestamp)},v1={sign(secret, timestamp, body)}"


def parse_signature(header: str | None) -> tuple[int, list[str]]:
    """(timestamp, v1 signatures) from a ``CityGrid-Signature`` header, or SignatureError."""
    if not header or not header.strip():
        raise SignatureError(f"unsigned: no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                raise SignatureError(f"{SIGNATURE_HEADER}: t={value!r} is not Unix seconds")
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value.strip().lower())
    if timestamp is None or not signatures:
        raise SignatureError(f"{SIGNATURE_HEADER} must be t=<unix seconds>,v1=<hex hmac>")
    return timestamp, signatures


def check_timestamp(timestamp: int, now_s: float, tolerance_s: int = TOLERANCE_S) -> None:
    """Refuses a timestamp outside the replay window (either way: clocks drift)."""
    if abs(now_s - timestamp) > tolerance_s:
        raise SignatureError(f"stale signature: t={timestamp} is {now_s - timestamp:+.0f} s "
                             f"from now (the window is ±{tolerance_s} s; replayed, or a "
                             "clock off)")


def verify(secret: bytes, header: str | None, body: bytes, now_s: float,
           tolerance_s: int = TOLERANCE_S) -> int:
    """Checks a ``CityGrid-Signature`` header against the body: well formed, within the
    replay window, and one ``v1`` matching (several are allowed while a secret is rotated),
    compared in constant time. Returns the signed timestamp; raises SignatureError."""
    timestamp, signatures = parse_signature(header)
    check_timestamp(timestamp, now_s, tolerance_s)
    expected = sign(secret, timestamp, body)
    if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures):
        raise SignatureError("bad signature: no v1 matches the body signed with the "
                             "account's secret")
    return timestamp


def encode(message: Mapping[str, Any]) -> bytes:
    """How CityGrid writes a message: compact JSON, keys sorted (the receiver verifies the
    bytes it got, never a re-encoding)."""
    return json.dumps(message, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


# ------------------------------------------------------------------ the outbox


@dataclass(frozen=True)
class PaymentRequest:
    key: str
    account: str
    kind: str
    reference: str
    amount_minor: int
    currency: str
    created_ms: int
    status: str
    attempts: int
    next_try_ms: int
    last_error: str | None
    payment_id: str | None
    sent_ms: int | None
    answered_ms: int | None
    claimed_by: str | None
    updated_ms: int


def enqueue(db: sqlite3.Connection, key: str, account: str, kind: str, reference: str,
            amount_minor: int, currency: str, now_ms: int) -> bool:
    """Puts a payment request in the outbox, due at once. Meant to run inside the ledger
    transaction that creates the debt. A key already there changes nothing (INSERT OR
    IGNORE): a replayed settlement asks once. Returns whether it was new."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor <= 0:
        raise ValueError(f"request {key}: amount_minor {amount_minor!r} must be a positive "
                         "whole number of minor units")
    ensure_schema(db)
    cursor = db.execute(
        "INSERT OR IGNORE INTO payment_requests (key, account, kind, reference, amount_minor, "
        "currency, created_ms, status, attempts, next_try_ms, updated_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
        (key, account, kind, reference, amount_minor, currency, now_ms, now_ms, now_ms))
    return cursor.rowcount == 1


def _agent(config: BillingConfig, account: str) -> PaymentAgent | None:
    a = config.accounts.get(account)
    return a.payment_agent if a is not None else None


def on_settled(db: sqlite3.Connection, config: BillingConfig, entry: Mapping[str, Any]) -> None:
    """Called inside a settlement's transaction, after its ledger entry is written (``entry``:
    its fields with ``key``). Asks the account's agent to pay it when the agent pays
    settlements; for a prepaid account (``top_up``) asks instead for the top-up amount when
    the balance the entry left is below the threshold and no top-up is open. Reads the entry
    back from the ledger, so a replay (the settlement already there) asks nothing new."""
    account = config.accounts.get(entry["account"])
    if account is None or account.payment_agent is None:
        return  # the common case, one dict lookup
    row = db.execute("SELECT seq, entry FROM ledger WHERE key = ?", (entry["key"],)).fetchone()
    if row is None:
        return
    seq, committed = row[0], json.loads(row[1])
    now_ms = int(committed.get("settled_at_ms") or 0)
    if account.top_up is not None:  # prepaid: the agent tops up, it does not pay per bill
        _top_up(db, config, committed, seq, now_ms)
    elif account.payment_agent.pays == "settlements" and committed["amount_minor"] > 0:
        enqueue(db, committed["key"], committed["account"], "settlement", committed["key"],
                committed["amount_minor"], committed["currency"], now_ms)


def _top_up(db: sqlite3.Connection, config: BillingConfig, entry: Mapping[str, Any], seq: int,
            now_ms: int) -> None:
    account_id = entry["account"]
    top_up = config.accounts[account_id].top_up
    assert top_up is not None
    if entry["balance_after_minor"] >= config.minor(top_up.below):
        return
    ensure_schema(db)
    if db.execute("SELECT 1 FROM payment_requests WHERE account = ? AND kind = 'top_up' AND "
                  "status IN ('pending', 'sent')", (account_id,)).fetchone():
        return  # one top-up at a time: the open one will lift the balance
    enqueue(db, f"topup:{account_id}:{seq}", account_id, "top_up", entry["key"],
            config.minor(top_up.amount), entry["currency"], now_ms)


def on_invoiced(db: sqlite3.Connection, config: BillingConfig, account: str, number: str,
                amount_minor: int, currency: str, now_ms: int) -> bool:
    """Called inside the transaction that issues invoice ``number``: asks the account's agent
    to pay it when the agent pays invoices (key ``invoice:<number>``, once per invoice).
    Returns whether a request was made."""
    a = config.accounts.get(account)
    if (a is None or a.payment_agent is None or a.top_up is not None
            or a.payment_agent.pays != "invoices" or amount_minor <= 0):
        return False
    return enqueue(db, f"invoice:{number}", account, "invoice", number, amount_minor, currency,
                   now_ms)


def _row(db: sqlite3.Connection, key: str) -> PaymentRequest | None:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM payment_requests WHERE key = ?",
                     (key,)).fetchone()
    return PaymentRequest(*row) if row else None


def _has_table(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                      "name = 'payment_requests'").fetchone() is not None


def request_body(r: PaymentRequest, minor_units: int, callback_url: str) -> bytes:
    """What the agent is sent (the same bytes every attempt while the callback URL stays)."""
    amount = Decimal(r.amount_minor) / Decimal(minor_units)
    digits = len(str(minor_units)) - 1
    return encode({"protocol": PROTOCOL, "request": r.key, "kind": r.kind, "account": r.account,
                   "reference": r.reference, "amount_minor": r.amount_minor,
                   "currency": r.currency, "amount": f"{amount:.{digits}f}",
                   "created_ms": r.created_ms, "callback_url": callback_url})


# ------------------------------------------------------------------ the dispatcher


def backoff_s(attempts: int, rand: float = 1.0) -> float:
    """The wait after the ``attempts``-th failed try: 2 s doubling, capped at 10 minutes,
    times a jitter factor between 0.5 and 1 (``rand`` in [0, 1]) so that many requests
    failing together do not come back together."""
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, min(attempts, 30) - 1))
    return base * (0.5 + 0.5 * rand)


@dataclass(frozen=True)
class Answer:
    """An agent's HTTP answer (status None: no answer at all — refused, timed out)."""

    status: int | None
    text: str


Post = Callable[[str, dict[str, str], bytes, float], Answer]


def http_post(url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> Answer:
    import httpx

    try:
        r = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        return Answer(None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    return Answer(r.status_code, r.text[:500])


class Dispatcher:
    """Sends due payment requests and records what each agent answered: 2xx → ``sent``
    (waiting for the callback; asked again after ``confirm_wait_s`` if none comes), 408, 429,
    5xx or no answer → retried with :func:`backoff_s`, forever, any other 4xx → ``declined``
    with the agent's reason (a permanent refusal). ``run_once`` for tests, ``start``/``stop``
    for a thread."""

    def __init__(self, path: str | Path, config: BillingConfig, callback_url: str, *,
                 worker: str | None = None, environ: Mapping[str, str] | None = None,
                 post: Post = http_post, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, timeout_s: float = TIMEOUT_S,
                 lease_s: float = LEASE_S, confirm_wait_s: float = CONFIRM_WAIT_S,
                 poll_s: float = 0.5, batch: int = 20):
        self.config, self.callback_url = config, callback_url
        self.worker = worker or f"pid{os.getpid()}"
        self.environ = os.environ if environ is None else environ
        self.post, self.clock, self.rand = post, clock, rand
        self.timeout_s, self.lease_ms = timeout_s, int(lease_s * 1000)
        self.confirm_wait_s, self.poll_s, self.batch = confirm_wait_s, poll_s, batch
        self.db = statedb.connect(path)
        ensure_schema(self.db)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim(self, now_ms: int) -> list[PaymentRequest]:
        """Due requests, claimed for a lease in one write transaction: another dispatcher
        sees them due only when the lease has run out (this one died mid-send). Nothing due —
        the common case, every poll — takes no write lock."""
        if not self.db.execute("SELECT 1 FROM payment_requests WHERE status IN ('pending', "
                               "'sent') AND next_try_ms <= ? LIMIT 1", (now_ms,)).fetchone():
            return []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = [PaymentRequest(*r) for r in self.db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM payment_requests WHERE status IN "
                "('pending', 'sent') AND next_try_ms <= ? ORDER BY next_try_ms LIMIT ?",
                (now_ms, self.batch))]
            self.db.executemany(
                "UPDATE payment_requests SET next_try_ms = ?, claimed_by = ?, updated_ms = ? "
                "WHERE key = ?",
                [(now_ms + self.lease_ms, self.worker, now_ms, r.key) for r in rows])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return rows

    def run_once(self, now_ms: int | None = None) -> int:
        """Sends what is due at ``now_ms`` (default: the clock); returns how many were sent."""
        now_ms = int(self.clock() * 1000) if now_ms is None else now_ms
        claimed = self._claim(now_ms)
        for r in claimed:
            self._send(r, now_ms)
        return len(claimed)

    def _send(self, r: PaymentRequest, now_ms: int) -> None:
        agent = _agent(self.config, r.account)
        if agent is None:
            self._record(r, now_ms, None, f"account {r.account} names no payment agent in "
                         "the billing configuration (any more)", retry=True)
            return
        secret = self.environ.get(agent.secret_env)
        if not secret:
            self._record(r, now_ms, None, f"environment variable {agent.secret_env} (the "
                         f"secret of {r.account}'s agent) is not set", retry=True)
            return
        body = request_body(r, self.config.minor_units, self.callback_url)
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: r.key,
                   SIGNATURE_HEADER: signature_header(secret.encode(), now_ms // 1000, body),
                   ATTEMPT_HEADER: str(r.attempts + 1), "User-Agent": "CityGrid-payments/1"}
        answer = self.post(agent.url, headers, body, self.timeout_s)
        self._answered(r, now_ms, answer)

    def _answered(self, r: PaymentRequest, now_ms: int, answer: Answer) -> None:
        code = answer.status
        if code is not None and 200 <= code < 300:
            self._record(r, now_ms, "sent", None, retry=False)
        elif code is not None and 400 <= code < 500 and code not in (408, 429):
            self._record(r, now_ms, "declined",
                         f"the agent refused the request: HTTP {code}: {answer.text.strip()}",
                         retry=False)
        else:
            what = f"HTTP {code}: {answer.text.strip()}" if code is not None else answer.text
            self._record(r, now_ms, None, f"no answer from the agent: {what}"[:500], retry=True)

    def _record(self, r: PaymentRequest, now_ms: int, status: str | None, error: str | None,
                *, retry: bool) -> None:
        """What came of one try. Only a request still open changes: a callback may have
        settled it while this dispatcher was waiting for the agent's answer."""
        attempts = r.attempts + 1
        if status == "sent":
            wait_s = max(self.confirm_wait_s, backoff_s(attempts, self.rand()))
            self.db.execute(
                "UPDATE payment_requests SET status = 'sent', attempts = ?, next_try_ms = ?, "
                "last_error = NULL, sent_ms = ?, claimed_by = NULL, updated_ms = ? "
                "WHERE key = ? AND status IN ('pending', 'sent')",
                (attempts, now_ms + int(wait_s * 1000), now_ms, now_ms, r.key))
        elif status == "declined":
            log.warning("payment request %s declined: %s", r.key, error)
            self.db.execute(
                "UPDATE payment_requests SET status = 'declined', attempts = ?, last_error = ?, "
                "answered_ms = ?, claimed_by = NULL, updated_ms = ? "
                "WHERE key = ? AND status IN ('pending', 'sent')",
                (attempts, error, now_ms, now_ms, r.key))
        else:
            assert retry
            wait_s = backoff_s(attempts, self.rand())
            log.info("payment request %s: %s; again in %.0f s", r.key, error, wait_s)
            self.db.execute(
                "UPDATE payment_requests SET attempts = ?, next_try_ms = ?, last_error = ?, "
                "claimed_by = NULL, updated_ms = ? WHERE key = ? AND status IN "
                "('pending', 'sent')",
                (attempts, now_ms + int(wait_s * 1000), error, now_ms, r.key))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="payments", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                sent = self.run_once()
            except Exception:  # a locked database, a bug: never the end of payments
                log.exception("the payment dispatcher failed; going on")
                sent = 0
            if not sent:
                self._stopping.wait(self.poll_s)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
        self.db.close()


def dispatcher(path: str | Path, config: BillingConfig, callback_url: str | None, *,
               worker: str | None = None, environ: Mapping[str, str] | None = None
               ) -> Dispatcher | None:
    """The dispatcher a rules runner starts: None when no account names a payment agent.
    Refuses to start (SettingsError naming the variable) without a callback URL or with an
    agent's secret variable unset — rather than a request that can never be answered."""
    agents = {a: acc.payment_agent for a, acc in config.accounts.items() if acc.payment_agent}
    if not agents:
        return None
    environ = os.environ if environ is None else environ
    if not callback_url:
        raise SettingsError("CITYGRID_PAYMENT_CALLBACK_URL", (
            f"account(s) {', '.join(sorted(agents))} name a payment agent, which needs the "
            f"URL it calls back: the gateway's {PATH} (or set CITYGRID_STATUS_URL, from which "
            "it is derived)"))
    for account, agent in sorted(agents.items()):
        if not environ.get(agent.secret_env):
            raise SettingsError(agent.secret_env, (
                f"account {account}'s payment agent signs with the secret in this environment "
                "variable, which is not set"))
    return Dispatcher(path, config, callback_url, worker=worker, environ=environ)


# ------------------------------------------------------------------ the callback


class CallbackError(ValueError):
    """A callback refused: ``status`` is the HTTP status to answer (docs/payments.md)."""

    TITLES = {401: "Unauthorized", 404: "Not Found", 409: "Conflict", 413: "Content Too Large",
              422: "Invalid request", 503: "Service Unavailable"}

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.title = self.TITLES.get(status, "Error")


@dataclass(frozen=True)
class CallbackOutcome:
    request: PaymentRequest
    entry: dict[str, Any] | None  # the payment's ledger entry (with its hash), if confirmed
    duplicate: bool  # nothing changed: this outcome was recorded before

    def body(self) -> dict[str, Any]:
        return {"request": self.request.key, "status": self.request.status,
                "duplicate": self.duplicate, "entry": self.entry}


def _fields(message: dict[str, Any], request: PaymentRequest) -> tuple[str, str | None, str]:
    """(status, payment_id, reason) from a verified callback, or a 422 naming the field;
    the amount and currency, when given (required to confirm), must be the request's."""
    status = message.get("status")
    if status not in ("confirmed", "declined"):
        raise CallbackError(422, f"status: {status!r} must be confirmed or declined")
    if message.get("protocol", PROTOCOL) != PROTOCOL:
        raise CallbackError(422, f"protocol: {message.get('protocol')!r}; this is protocol "
                            f"{PROTOCOL}")
    payment_id = message.get("payment_id")
    if ((status == "confirmed" or payment_id is not None)
            and (not isinstance(payment_id, str) or not 1 <= len(payment_id) <= 200)):
        raise CallbackError(422, "payment_id: a confirmed payment names the agent's payment "
                            "id, a string of 1 to 200 characters")
    for name in ("amount_minor", "currency"):
        if status == "confirmed" and name not in message:
            raise CallbackError(422, f"{name}: missing (a confirmation states what was paid)")
    amount = message.get("amount_minor", request.amount_minor)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise CallbackError(422, f"amount_minor: {amount!r} is not a whole number")
    if amount != request.amount_minor:
        raise CallbackError(422, f"amount_minor: {amount} does not match request {request.key} "
                            f"({request.amount_minor} {request.currency})")
    currency = message.get("currency", request.currency)
    if currency != request.currency:
        raise CallbackError(422, f"currency: {currency!r} does not match request {request.key} "
                            f"({request.currency})")
    reason = message.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise CallbackError(422, "reason: must be a string")
    return status, payment_id, (reason or "")[:500]


def callback(db: sqlite3.Connection, config: BillingConfig, signature: str | None,
             body: bytes, now_ms: int, environ: Mapping[str, str] | None = None
             ) -> CallbackOutcome:
    """Applies an agent's signed callback. Checks, in order: a well-formed signature header
    within the replay window (401), a JSON object naming a ``request`` (422), a known request
    (404), the signature with that account's secret (401), the fields (422: a status, the
    payment id, the amount and currency the request asked for), that it does not contradict
    an outcome already recorded (409). ``confirmed``: a chained ``payment`` ledger entry
    crediting the account and the request marked confirmed, in one transaction;
    ``declined``: the request marked declined with the reason. The same outcome again changes
    nothing (``duplicate``). Raises CallbackError."""
    environ = os.environ if environ is None else environ
    if len(body) > MAX_BODY:
        raise CallbackError(413, f"a callback body is at most {MAX_BODY} bytes")
    try:
        timestamp, _ = parse_signature(signature)
        check_timestamp(timestamp, now_ms / 1000)
    except SignatureError as e:
        raise CallbackError(401, str(e)) from None
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CallbackError(422, "the body is not JSON") from None
    key = message.get("request") if isinstance(message, dict) else None
    if not isinstance(key, str) or not key:
        raise CallbackError(422, "request: the body is a JSON object naming the request "
                            "(its idempotency key)")
    request = _row(db, key) if _has_table(db) else None
    if request is None:
        raise CallbackError(404, f"request {key!r}: no such payment request")
    agent = _agent(config, request.account)
    if agent is None:
        raise CallbackError(409, f"request {key}: account {request.account} names no payment "
                            "agent in the billing configuration any more")
    secret = environ.get(agent.secret_env)
    if not secret:
        raise CallbackError(503, f"the gateway cannot check the signature: environment "
                            f"variable {agent.secret_env} ({request.account}'s secret) is not "
                            "set")
    try:
        verify(secret.encode(), signature, body, now_ms / 1000)
    except SignatureError as e:
        raise CallbackError(401, str(e)) from None
    status, payment_id, reason = _fields(message, request)
    if status == "confirmed":
        return _confirm(db, config, request, payment_id or "", now_ms)
    return _decline(db, request, reason, now_ms)


def _payment_entry(db: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = db.execute("SELECT entry, hash FROM ledger WHERE key = ?",
                     (f"payment:{key}",)).fetchone()
    return {**json.loads(row[0]), "hash": row[1]} if row else None


def _confirm(db: sqlite3.Connection, config: BillingConfig, request: PaymentRequest,
             payment_id: str, now_ms: int) -> CallbackOutcome:
    if request.status == "declined":
        raise CallbackError(409, f"request {request.key} was declined already "
                            f"({request.last_error or 'no reason given'}); a payment for it "
                            "is not taken")
    if request.status == "confirmed":
        return _again(db, request, payment_id)
    fields = {"kind": "payment", "account": request.account,
              "amount_minor": request.amount_minor, "currency": request.currency,
              "request": request.key, "reference": request.reference,
              "payment_id": payment_id, "confirmed_at_ms": now_ms}

    def mark() -> None:  # inside the entry's transaction: the request is still open
        now = _row(db, request.key)
        if now is not None and now.status == "declined":
            raise CallbackError(409, f"request {request.key} was declined meanwhile "
                                f"({now.last_error}); a payment for it is not taken")
        db.execute("UPDATE payment_requests SET status = 'confirmed', payment_id = ?, "
                   "answered_ms = ?, last_error = NULL, claimed_by = NULL, updated_ms = ? "
                   "WHERE key = ?", (payment_id, now_ms, now_ms, request.key))

    done = _ledger.append(db, config, f"payment:{request.key}", request.account, fields,
                          request.amount_minor, also=mark)
    fresh = _row(db, request.key)
    assert fresh is not None
    if done is None:  # confirmed by a concurrent callback between the read and the append
        return _again(db, fresh, payment_id)
    return CallbackOutcome(fresh, {**done.entry, "hash": done.hash}, duplicate=False)


def _again(db: sqlite3.Connection, request: PaymentRequest, payment_id: str) -> CallbackOutcome:
    if request.payment_id != payment_id:
        raise CallbackError(409, f"request {request.key} was confirmed already as payment "
                            f"{request.payment_id!r}, not {payment_id!r}")
    return CallbackOutcome(request, _payment_entry(db, request.key), duplicate=True)


def _decline(db: sqlite3.Connection, request: PaymentRequest, reason: str,
             now_ms: int) -> CallbackOutcome:
    if request.status == "confirmed":
        raise CallbackError(409, f"request {request.key} was confirmed already (payment "
                            f"{request.payment_id}); it cannot be declined")
    if request.status == "declined":
        return CallbackOutcome(request, None, duplicate=True)
    db.execute("UPDATE payment_requests SET status = 'declined', last_error = ?, "
               "answered_ms = ?, claimed_by = NULL, updated_ms = ? WHERE key = ? AND status IN "
               "('pending', 'sent')",
               (f"declined by the agent: {reason or 'no reason given'}", now_ms, now_ms,
                request.key))
    fresh = _row(db, request.key)
    assert fresh is not None
    if fresh.status == "confirmed":  # a confirmation won the race
        raise CallbackError(409, f"request {request.key} was confirmed already (payment "
                            f"{fresh.payment_id}); it cannot be declined")
    log.warning("payment request %s declined by the agent: %s", request.key, reason)
    return CallbackOutcome(fresh, None, duplicate=False)


def handle_callback(data_dir: str | Path, config: BillingConfig, signature: str | None,
                    body: bytes, now_ms: int | None = None) -> CallbackOutcome:
    """:func:`callback` over its own connection to ``billing.sqlite`` under ``data_dir`` (the
    gateway's entry point; a callback is rare, a connection per callback is cheap)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    path = Path(data_dir) / "billing.sqlite"
    if not path.exists():
        raise CallbackError(404, "no payment requests yet (no billing.sqlite)")
    db = statedb.connect(path)
    try:
        return callback(db, config, signature, body, now_ms)
    finally:
        db.close()


# ------------------------------------------------------------------ reading


def payment_requests(data_dir: str | Path, *, accounts: frozenset[str] | None = None,
                     limit: int = 100) -> list[PaymentRequest]:
    """Payment requests, newest first; ``accounts``: only these (None: every account) —
    the hook a customer token bound to its own account will use. Read-only."""
    wanted = None if accounts is None else json.dumps(sorted(accounts))
    rows = statedb.read_rows(
        Path(data_dir) / "billing.sqlite",
        f"SELECT {', '.join(_COLUMNS)} FROM payment_requests WHERE (?1 IS NULL OR account "
        "IN (SELECT value FROM json_each(?1))) ORDER BY created_ms DESC, key LIMIT ?2",
        (wanted, limit))
    return [PaymentRequest(*r) for r in rows]


def payment_entries(data_dir: str | Path, *, accounts: frozenset[str] | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
    """The ledger's payment entries (each with its hash), newest first, like
    :func:`payment_requests` filtered by account. Read-only."""
    wanted = None if accounts is None else json.dumps(sorted(accounts))
    return [{**json.loads(e), "hash": h} for e, h in statedb.read_rows(
        Path(data_dir) / "billing.sqlite",
        "SELECT entry, hash FROM ledger WHERE json_extract(entry, '$.kind') = 'payment' AND "
        "(?1 IS NULL OR json_extract(entry, '$.account') IN (SELECT value FROM json_each(?1))) "
        "ORDER BY seq DESC LIMIT ?2", (wanted, limit))]
