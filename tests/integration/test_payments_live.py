"""Payments end to end: the reference agent as a real process on its own port, the callback
served by the real gateway app over HTTP (uvicorn), a settlement made by a real BillingStore —
and both sides crashing between the request and the confirmation: paid exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime

import httpx
import pytest
import uvicorn

from billing import config as billing_config
from billing import payments
from billing.ledger import BillingStore, verify
from billing.read import check_balances
from cityctl.localservices import free_port
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.settings import Settings
from gateway.app import create_app
from tests.helpers import REPO, wait_until

SECRET_ENV = "CITYGRID_TEST_AGENT_SECRET"
SECRET = "4f1c0d9e8b7a6f5e4d3c2b1a0f9e8d7c"
H = 3_600_000


class Died(BaseException):
    """The dispatcher's death, between sending and recording the answer."""


@pytest.fixture
def gateway(mosquitto, tmp_path, monkeypatch):
    """The gateway app over real HTTP, in this process (it shares the environment's secret)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    agent_port = free_port()
    billing_file = tmp_path / "billing.yaml"
    billing_file.write_text(f"""\
version: 1
currency: DKK
tariffs:
  flat: {{price: 2.50}}
accounts:
  acc-1:
    opening_balance: 1000.00
    payment_agent: {{url: "http://127.0.0.1:{agent_port}/pay", secret_env: {SECRET_ENV}}}
""")
    data = tmp_path / "data"
    data.mkdir()
    settings = Settings(mqtt_url=mosquitto.url, data_dir=str(data), billing=str(billing_file))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, 0.05, "the gateway")
    yield settings, f"http://127.0.0.1:{port}{payments.PATH}", agent_port
    server.should_exit = True
    thread.join(10)


def start_agent(tmp_path, port: int, crash: bool) -> subprocess.Popen:
    script = [str(REPO / "tests" / "payment_agent_crash.py")] if crash else ["-m", "billing.agent"]
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 (the process holds it)
    process = subprocess.Popen(
        [sys.executable, *script, "--port", str(port), "--secret-env", SECRET_ENV,
         "--state", str(tmp_path / "agent-state.json")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.PIPE,
        stderr=log)
    line = process.stdout.readline().decode()  # type: ignore[union-attr]
    assert "listening on" in line, line
    return process


def request_row(data_dir, key: str) -> payments.PaymentRequest:
    (r,) = [r for r in payments.payment_requests(data_dir) if r.key == key]
    return r


def test_a_crash_between_request_and_confirmation_pays_exactly_once(gateway, tmp_path):
    settings, callback_url, agent_port = gateway
    cfg = billing_config.load(settings.billing)
    fleet = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.5, account_id="acc-1",
                               tariff="flat", max_power_w=17250.0)])
    path = tmp_path / "data" / "billing.sqlite"
    store = BillingStore(path, cfg, fleet, COPENHAGEN.tz)
    t = int(datetime(2026, 11, 26, 8, tzinfo=COPENHAGEN.tz).timestamp() * 1000)
    for ts, kwh in [(t - 2 * H, 100.0), (t - H, 104.0), (t, 108.0)]:
        store.on_reading("m-1", ts, kwh)
    (settlement,) = store.settle("m-1", t)
    key, amount = settlement.entry["key"], settlement.entry["amount_minor"]
    assert (amount, store.balance("acc-1")) == (2000, 98_000)
    assert request_row(settings.data_dir, key).status == "pending"

    # The agent decides and answers, then dies before its callback; the dispatcher sends,
    # then dies before recording the answer. Nobody has heard of an outcome.
    agent = start_agent(tmp_path, agent_port, crash=True)

    def sends_then_dies(*args):
        answer = payments.http_post(*args)
        assert answer.status == 202, answer
        raise Died

    first = payments.Dispatcher(path, cfg, callback_url, post=sends_then_dies, lease_s=2)
    with pytest.raises(Died):
        first.run_once()
    first.stop()
    assert agent.wait(10) == 7
    decided = json.loads((tmp_path / "agent-state.json").read_text())["requests"][key]
    assert (decided["status"], decided["callback"]) == ("confirmed", "pending")
    r = request_row(settings.data_dir, key)
    assert (r.status, r.attempts) == ("pending", 0)  # claimed, nothing recorded
    assert payments.payment_entries(settings.data_dir) == []

    # Both restarted: the claim runs out, the request goes again under the same key, the
    # agent answers from its state file and calls back with the payment id it chose.
    agent = start_agent(tmp_path, agent_port, crash=False)
    try:
        second = payments.Dispatcher(path, cfg, callback_url, lease_s=2)
        assert second.run_once(int(time.time() * 1000)) == 0  # the claim still holds
        assert second.run_once(int(time.time() * 1000) + 2500) == 1
        wait_until(lambda: request_row(settings.data_dir, key).status == "confirmed", 10, 0.05,
                   "the confirmation")
        r = request_row(settings.data_dir, key)
        assert (r.attempts, r.payment_id) == (1, decided["payment_id"])
        assert second.run_once(int(time.time() * 1000) + 3_600_000) == 0  # answered: done

        # The same request once more, straight to the agent (a duplicate delivery): the
        # agent answers 200 from memory and calls back again; CityGrid changes nothing.
        body = payments.request_body(r, cfg.minor_units, callback_url)
        again = httpx.post(f"http://127.0.0.1:{agent_port}/pay", content=body, timeout=5,
                           headers={"Idempotency-Key": key, "Content-Type": "application/json",
                                    "CityGrid-Signature": payments.signature_header(
                                        SECRET.encode(), int(time.time()), body)})
        assert again.status_code == 200 and again.json()["duplicate"], again.text
        wait_until(lambda: (tmp_path / "agent.log").read_text().count(
            f"callback {key}: delivered") == 2, 10, 0.05, "the second callback")
        second.stop()
    finally:
        agent.terminate()
        agent.wait(10)

    entries = payments.payment_entries(settings.data_dir)
    assert [(e["request"], e["amount_minor"], e["payment_id"]) for e in entries] == [
        (key, amount, decided["payment_id"])]
    assert store.balance("acc-1") == 100_000  # debited once, credited once
    count, head = verify(path)
    assert count == 2 and head == entries[0]["hash"]
    assert check_balances(settings.data_dir) == (2, head)
    state = json.loads((tmp_path / "agent-state.json").read_text())["requests"]
    assert list(state) == [key] and state[key]["seen"] == 3  # asked three times, paid once
    store.close()
