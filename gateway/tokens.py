"""The API's bearer tokens: roles viewer < operator < admin, kept as SHA-256 hashes in the
gateway's table ``tokens`` beside the registry (``registry.sqlite``); a token is shown once."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

from citygrid import statedb
from citygrid.registry import FILENAME as REGISTRY_FILE

ROLES = {"viewer": 1, "operator": 2, "admin": 3}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_ms INTEGER NOT NULL);
"""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """The token table in ``data_dir/registry.sqlite``."""

    def __init__(self, data_dir: str | Path):
        self.db = statedb.connect(Path(data_dir) / REGISTRY_FILE)
        self.db.executescript(_SCHEMA)

    def create(self, role: str, name: str) -> str:
        """A new bearer token; only its hash is kept, the token is shown once."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        token = "cg_" + secrets.token_urlsafe(32)
        with self.db:
            self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)",
                            (_digest(token), name, role, int(time.time() * 1000)))
        return token

    def role(self, token: str) -> str | None:
        """The role of a bearer token, or None for a token nobody created."""
        row = self.db.execute("SELECT role FROM tokens WHERE hash = ?",
                              (_digest(token),)).fetchone()
        return row[0] if row else None

    def name(self, token: str) -> str | None:
        """The name a token was created with (who did something, for a history), or None."""
        row = self.db.execute("SELECT name FROM tokens WHERE hash = ?",
                              (_digest(token),)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()


def create_token(data_dir: str | Path, role: str, name: str) -> str:
    tokens = Tokens(data_dir)
    try:
        return tokens.create(role, name)
    finally:
        tokens.close()


def token_role(data_dir: str | Path, token: str) -> str | None:
    tokens = Tokens(data_dir)
    try:
        return tokens.role(token)
    finally:
        tokens.close()


__all__ = ["ROLES", "Tokens", "create_token", "token_role"]
