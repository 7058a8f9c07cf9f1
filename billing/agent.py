"""A reference payment agent (docs/payments.md, "payment agent protocol v1"): the payer's side.

    AGENT_SECRET=… python -m billing.agent --port 8600 --secret-env AGENT_SECRET \\
        --state agent-state.json [--decline-above 500000]

It is what a bank, a wallet or a building's energy manager would put in front of its own
means of paying. It

- verifies every request's signature (HMAC-SHA256 over the timestamp and the body, the shared
  secret from an environment variable) and refuses a stale timestamp (the replay window);
- decides once per idempotency key — confirms, or declines an amount above
  ``--decline-above`` — and writes that decision to its state file (atomically, fsynced)
  *before* it answers, so a restart, a retry or a duplicate never pays twice: a key seen
  before is answered from the file, with the same payment id;
- answers 202 at once and then sends the signed callback to the request's ``callback_url``,
  retrying with backoff (0.5 s doubling to 30 s) until CityGrid answers;
- when CityGrid asks again for a key it has decided (no callback reached CityGrid: the agent
  crashed before sending it, or it was lost), sends the callback again.

Standard library only, so it can be read — and copied — on its own. Without ``--state`` it
remembers in memory only, and a restart forgets what it paid: not for real money.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("billing.agent")

PROTOCOL = 1
SIGNATURE_HEADER = "CityGrid-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
TOLERANCE_S = 300
MAX_BODY = 64 * 1024
REQUIRED = {"request": str, "kind": str, "account": str, "reference": str, "amount_minor": int,
            "currency": str, "callback_url": str}


class Refused(Exception):
    """A request refused with ``status`` (and a reason CityGrid records)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """v1: hex HMAC-SHA256 of ``<timestamp>.<body>`` (docs/payments.md, Signatures)."""
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def check_signature(secret: bytes, header: str | None, body: bytes, now_s: float,
                    tolerance_s: int = TOLERANCE_S) -> None:
    if not header:
        raise Refused(401, f"unsigned: no {SIGNATURE_HEADER} header")
    parts = [p.strip().partition("=") for p in header.split(",")]
    stamps = [v for k, _, v in parts if k == "t"]
    signatures = [v.lower() for k, _, v in parts if k == "v1"]
    if (len(stamps) != 1 or not stamps[0].isascii() or not stamps[0].isdigit()
            or not signatures):
        raise Refused(401, f"{SIGNATURE_HEADER} must be t=<unix seconds>,v1=<hex hmac>")
    timestamp = int(stamps[0])
    if abs(now_s - timestamp) > tolerance_s:
        raise Refused(401, f"stale signature: t={timestamp} is outside ±{tolerance_s} s")
    expected = sign(secret, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in signatures):
        raise Refused(401, "bad signature")


class State:
    """What the agent decided, per idempotency key, in a JSON file replaced atomically (a
    crash leaves the old file or the new one, never half of one)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            self.records = json.loads(path.read_text())["requests"]

    def save(self) -> None:
        if self.path is None:
            return
        text = json.dumps({"version": 1, "requests": self.records}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Agent:
    """The agent's logic, apart from HTTP: ``receive`` a signed request, ``call_back``."""

    def __init__(self, secret: bytes, state: State, *, decline_above: int | None = None,
                 tolerance_s: int = TOLERANCE_S, retry_cap_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.secret, self.state, self.decline_above = secret, state, decline_above
        self.tolerance_s, self.retry_cap_s, self.clock = tolerance_s, retry_cap_s, clock
        self._lock = threading.Lock()
        self._delivering: set[str] = set()

    def receive(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any], str | None]:
        """(HTTP status, answer, the key whose callback is to be sent now, if any)."""
        check_signature(self.secret, headers.get(SIGNATURE_HEADER), body, self.clock(),
                        self.tolerance_s)
        try:
            message = json.loads(body)
        except ValueError:
            raise Refused(422, "the body is not JSON") from None
        if not isinstance(message, dict):
            raise Refused(422, "the body is not a JSON object")
        if message.get("protocol") != PROTOCOL:
            raise Refused(422, f"protocol {message.get('protocol')!r}: this agent speaks 1")
        for name, kind in REQUIRED.items():
            value = message.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise Refused(422, f"{name}: missing or not a {kind.__name__}")
        key = message["request"]
        if headers.get(IDEMPOTENCY_HEADER) != key:
            raise Refused(422, f"{IDEMPOTENCY_HEADER} must be the body's request ({key})")
        if message["amount_minor"] <= 0:
            raise Refused(422, "amount_minor must be positive")
        with self._lock:
            known = self.state.records.get(key)
            if known is not None:
                for name in ("account", "amount_minor", "currency"):
                    if known[name] != message[name]:
                        raise Refused(422, f"{IDEMPOTENCY_HEADER} {key} was used for another "
                                      f"request ({name} {known[name]!r}, now "
                                      f"{message[name]!r})")
                known["seen"] += 1
                known["callback_url"] = message["callback_url"]
                self.state.save()
                log.info("request %s again (%d times): %s, from memory", key, known["seen"],
                         known["status"])
                return 200, self._answer(known, duplicate=True), key
            record = self._decide(message)
            self.state.records[key] = record
            self.state.save()  # decided and durable before anyone hears of it
        log.info("request %s: %s %d %s", key, record["status"], record["amount_minor"],
                 record["currency"])
        return 202, self._answer(record, duplicate=False), key

    def _decide(self, message: dict[str, Any]) -> dict[str, Any]:
        """Here a real agent moves the money; the reference one only decides."""
        record = {name: message[name] for name in REQUIRED}
        record.update(seen=1, decided_ms=int(self.clock() * 1000), callback="pending")
        if self.decline_above is not None and message["amount_minor"] > self.decline_above:
            record.update(status="declined", payment_id=None,
                          reason=f"amount {message['amount_minor']} is above this agent's "
                                 f"limit of {self.decline_above}")
        else:
            record.update(status="confirmed", payment_id=f"pay-{uuid.uuid4().hex[:20]}",
                          reason=None)
        return record

    @staticmethod
    def _answer(record: dict[str, Any], duplicate: bool) -> dict[str, Any]:
        return {"request": record["request"], "status": record["status"],
                "payment_id": record["payment_id"], "duplicate": duplicate}

    def callback_body(self, record: dict[str, Any]) -> bytes:
        message = {"protocol": PROTOCOL, "request": record["request"],
                   "status": record["status"], "amount_minor": record["amount_minor"],
                   "currency": record["currency"], "decided_ms": record["decided_ms"]}
        if record["payment_id"] is not None:
            message["payment_id"] = record["payment_id"]
        if record["reason"] is not None:
            message["reason"] = record["reason"]
        return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()

    def call_back(self, record: dict[str, Any]) -> tuple[int | None, str]:
        """One signed POST of the outcome to the request's callback URL: (status, text);
        status None when CityGrid did not answer."""
        body = self.callback_body(record)
        timestamp = int(self.clock())
        request = urllib.request.Request(record["callback_url"], data=body, method="POST",
                                         headers={
            "Content-Type": "application/json", IDEMPOTENCY_HEADER: record["request"],
            SIGNATURE_HEADER: f"t={timestamp},v1={sign(self.secret, timestamp, body)}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read(2000).decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read(2000).decode(errors="replace")
        except (OSError, ValueError) as e:
            return None, str(e)

    def deliver(self, key: str) -> None:
        """Sends the callback for ``key`` until CityGrid answers it (2xx, or a refusal that
        asking again will not change), backing off 0.5 s doubling to ``retry_cap_s``."""
        with self._lock:
            if key in self._delivering:
                return  # a thread is at it already
            self._delivering.add(key)
        try:
            wait = 0.5
            while True:
                record = self.state.records[key]
                status, text = self.call_back(record)
                if status is not None and (200 <= status < 300 or (
                        400 <= status < 500 and status not in (408, 429))):
                    outcome = "delivered" if status < 300 else f"refused: HTTP {status} {text}"
                    with self._lock:
                        record["callback"] = outcome[:500]
                        self.state.save()
                    log.info("callback %s: %s", key, outcome[:200])
                    return
                log.info("callback %s: %s; again in %.1f s", key, text[:200], wait)
                time.sleep(wait)
                wait = min(self.retry_cap_s, wait * 2)
        finally:
            with self._lock:
                self._delivering.discard(key)


def handler(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "citygrid-reference-agent/1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                return self._send(413 if length > MAX_BODY else 411,
                                  {"detail": f"a body of at most {MAX_BODY} bytes, with its "
                                   "Content-Length"})
            body = self.rfile.read(length)
            try:
                status, answer, key = agent.receive(self.headers, body)
            except Refused as e:
                log.warning("refused (%d): %s", e.status, e.detail)
                return self._send(e.status, {"title": HTTPStatus(e.status).phrase,
                                             "status": e.status, "detail": e.detail})
            self._send(status, answer)  # answered before the callback goes out
            if key is not None:
                threading.Thread(target=agent.deliver, args=(key,), daemon=True).start()

        def _send(self, status: int, answer: dict[str, Any]) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m billing.agent", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600, help="0: any free port (printed)")
    p.add_argument("--secret-env", required=True, metavar="VAR",
                   help="the environment variable holding the shared secret")
    p.add_argument("--state", type=Path, help="the file it remembers its decisions in")
    p.add_argument("--decline-above", type=int, metavar="AMOUNT_MINOR",
                   help="decline requests for more than this many minor units")
    p.add_argument("--tolerance", type=int, default=TOLERANCE_S, metavar="SECONDS",
                   help=f"the replay window (default {TOLERANCE_S})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(message)s")
    secret = os.environ.get(args.secret_env)
    if not secret:
        p.error(f"--secret-env: the environment variable {args.secret_env} is not set")
    try:
        state = State(args.state)
    except (OSError, ValueError, KeyError) as e:
        p.error(f"--state {args.state}: cannot read it: {e}")
    agent = Agent(secret.encode(), state, decline_above=args.decline_above,
                  tolerance_s=args.tolerance)
    server = ThreadingHTTPServer((args.host, args.port), handler(agent))
    print(f"payment agent listening on http://{args.host}:{server.server_address[1]}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
