"""Gateway: the operators' HTTP API and the built-in status page, per-device MQTT accounts
and the API's tokens. The app itself is ``gateway.app.create_app`` (imported on its own, so
what only needs tokens or accounts does not load FastAPI)."""

from gateway.cli import add_parsers
from gateway.provisioning import (
    SERVICES,
    Credentials,
    Provisioner,
    ProvisioningError,
    TlsListener,
)
from gateway.tokens import ROLES, Tokens, create_token, token_role

__all__ = ["ROLES", "SERVICES", "Credentials", "Provisioner", "ProvisioningError",
           "TlsListener", "Tokens", "add_parsers", "create_token", "token_role"]
