"""The API's bearer tokens: roles viewer < operator < admin, kept as SHA-256 hashes in the
gateway's table ``tokens`` beside the registry (``registry.sqlite``); a token is shown once.

A ``customer`` token is bound to one billing account and ranks below viewer: it opens only
the routes that serve an account's own data (its meters, consumption, invoices, payments),
and there only that account's (another account's → 404, as if it did not exist)."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from citygrid import statedb
from citygrid.registry import FILENAME as REGISTRY_FILE

ROLES = {"customer": 0, "viewer": 1, "operator": 2, "admin": 3}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_ms INTEGER NOT NULL,
    account TEXT);
"""
ACCOUNT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class Holder:
    """Who holds a token: its role, its name, and for a customer the account it is bound to."""

    role: str
    name: str
    account: str | None = None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """The token table in ``data_dir/registry.sqlite``."""

    def __init__(self, data_dir: str | Path):
        self.db = statedb.connect(Path(data_dir) / REGISTRY_FILE)
        self.db.executescript(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(tokens)")}
        if "account" not in columns:  # a registry from before customer tokens
            with self.db:
                self.db.execute("ALTER TABLE tokens ADD COLUMN account TEXT")

    def create(self, role: str, name: str, account: str | None = None) -> str:
        """A new bearer token; only its hash is kept, the token is shown once. A customer
        token names its account; the other roles see every account and name none."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if role == "customer" and account is None:
            raise ValueError("a customer token is bound to an account: give --account")
        if role != "customer" and account is not None:
            raise ValueError(f"only a customer token is bound to an account, not a {role} one")
        if account is not None and not ACCOUNT.match(account):
            raise ValueError(f"account {account!r}: 1–64 of A–Z a–z 0–9 _ . : -")
        token = "cg_" + secrets.token_urlsafe(32)
        with self.db:
            self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                            (_digest(token), name, role, int(time.time() * 1000), account))
        return token

    def holder(self, token: str) -> Holder | None:
        """Who holds a bearer token, or None for a token nobody created."""
        row = self.db.execute("SELECT role, name, account FROM tokens WHERE hash = ?",
                              (_digest(token),)).fetchone()
        return Holder(*row) if row else None

    def role(self, token: str) -> str | None:
        """The role of a bearer token, or None for a token nobody created."""
        holder = self.holder(token)
        return holder.role if holder else None

    def name(self, token: str) -> str | None:
        """The name a token was created with (who did something, for a history), or None."""
        holder = self.holder(token)
        return holder.name if holder else None

    def close(self) -> None:
        self.db.close()


def create_token(data_dir: str | Path, role: str, name: str, account: str | None = None) -> str:
    tokens = Tokens(data_dir)
    try:
        return tokens.create(role, name, account)
    finally:
        tokens.close()


def token_role(data_dir: str | Path, token: str) -> str | None:
    tokens = Tokens(data_dir)
    try:
        return tokens.role(token)
    finally:
        tokens.close()


__all__ = ["ROLES", "Holder", "Tokens", "create_token", "token_role"]
