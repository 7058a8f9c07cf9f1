"""Alerts through a real Prometheus Alertmanager (Debian's prometheus-alertmanager), run with
the shipped configuration — its webhook pointed at a receiver here, its mail relay at an SMTP
sink (aiosmtpd) — and its waits shortened: an alert fires, is grouped, is silenced, resolves."""

from __future__ import annotations

import email
import json
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml
from aiosmtpd.controller import Controller

from cityctl.localservices import Alertmanager, free_port
from citygrid.city import COPENHAGEN
from citygrid.contract import Topic
from rules.alertmanager import AlertmanagerNotifier
from rules.alerts import AlertState
from rules.loader import DEFAULT_RULES
from rules.runner import RuleRunner, RunnerConfig
from tests.helpers import NIGHT, REPO, light_reading, need, rules_fleet, wait_until

SHIPPED = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


class Webhook:
    """Alertmanager's webhook receiver: every notification it posts, parsed."""

    def __init__(self):
        self.notifications: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, status: str | None = None) -> list[dict]:
        return [a for n in self.notifications for a in n["alerts"]
                if status is None or a["status"] == status]


class Mails:
    """An SMTP sink: every message Alertmanager sends."""

    def __init__(self):
        self.messages: list[email.message.Message] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture(scope="module")
def alerting(tmp_path_factory):
    need("prometheus-alertmanager")
    hook, mails = Webhook(), Mails()
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"]["smtp_smarthost"] = f"127.0.0.1:{mails.port}"
    for receiver in config["receivers"]:
        for w in receiver.get("webhook_configs", []):
            w["url"] = hook.url
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="1s")
    am = Alertmanager(tmp_path_factory.mktemp("alertmanager"), yaml.safe_dump(config))
    am.start()
    try:
        yield am, hook, mails
    finally:
        am.stop()
        hook.server.shutdown()
        mails.controller.stop()


def _alert(key: str, rule: str, severity: str, scope: str, message: str) -> AlertState:
    return AlertState(key, rule, severity, message, scope, int(time.time() * 1000), {scope})


def test_the_shipped_configuration_is_valid():
    need("amtool")
    done = subprocess.run(["amtool", "check-config", str(SHIPPED)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 receivers" in done.stdout


def test_a_lamp_failure_fires_pages_and_resolves(alerting, mosquitto, settings, uid, publisher):
    """The shipped rule `lamp-failure` (major) on a real rule runner: Alertmanager gets the
    alert with its labels and link, the webhook and the on-call mail say it, and when the
    lamp draws power again the alert resolves there too."""
    am, hook, mails = alerting
    fleet = rules_fleet(uid)
    settings = settings.with_(alertmanager_url=am.url, status_url="http://status.example:8000")
    runner = RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(
        DEFAULT_RULES, f"city/v1/{uid}/+/+/telemetry", client_id=f"rules-{uid}"))
    runner.start()
    topic = str(Topic(uid, "streetlight", "sl-1"))
    try:
        # On at night (the baseline commands it), drawing nothing for six minutes.
        for i in range(8):
            publisher.send(topic, light_reading(i + 1, NIGHT + i * 60_000, power_w=0.0))
        wait_until(lambda: [a for a in hook.alerts("firing")
                            if a["labels"]["alertname"] == "lamp-failure"],
                   message="the lamp failure at the webhook")
        alert = next(a for a in hook.alerts("firing")
                     if a["labels"]["alertname"] == "lamp-failure")
        assert alert["labels"] == {"alertname": "lamp-failure", "severity": "major",
                                   "device_id": "sl-1", "district": uid}
        assert alert["annotations"]["status_page"] == "http://status.example:8000/#device=sl-1"
        assert "Lamp failure at sl-1" in alert["annotations"]["summary"]
        wait_until(lambda: any("lamp-failure" in (m["Subject"] or "") for m in mails.messages),
                   message="the on-call e-mail")
        listed = httpx.get(f"{am.url}/api/v2/alerts", params={
            "filter": [f'district="{uid}"', 'alertname="lamp-failure"']}).json()
        assert [a["labels"]["device_id"] for a in listed] == ["sl-1"]
        # Power again: the rule's condition no longer holds, the alert clears and resolves.
        publisher.send(topic, light_reading(9, NIGHT + 8 * 60_000, power_w=50.0))
        wait_until(lambda: [a for a in hook.alerts("resolved")
                            if a["labels"].get("device_id") == "sl-1"],
                   message="the resolved notification")
        assert httpx.get(f"{am.url}/api/v2/alerts", params={
            "filter": [f'district="{uid}"', 'alertname="lamp-failure"'],
            "active": "true"}).json() == []
    finally:
        runner.stop()


def test_alerts_of_one_rule_and_district_are_grouped_and_a_silence_holds(alerting, uid):
    am, hook, mails = alerting
    notifier = AlertmanagerNotifier(am.url, lambda a: {"district": uid, "device_id": a.scope},
                                    resend_s=1.0)
    try:
        before = len(hook.notifications)
        for light in ("sl-1", "sl-2", "sl-3"):
            notifier.update(_alert(f"dim@{light}", f"dim-{uid}", "minor", light,
                                   f"{light} dim"), True)
        wait_until(lambda: any({a["labels"]["device_id"] for a in n["alerts"]} ==
                               {"sl-1", "sl-2", "sl-3"} for n in hook.notifications[before:]),
                   message="one notification with the three lights")
        # A minor alert goes to the operators' webhook only: no mail for it.
        assert not any(f"dim-{uid}" in (m["Subject"] or "") for m in mails.messages)

        now = datetime.now(UTC)
        silence = httpx.post(f"{am.url}/api/v2/silences", json={
            "matchers": [{"name": "alertname", "value": f"quiet-{uid}", "isRegex": False}],
            "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
            "createdBy": "test", "comment": "roadworks"})
        assert silence.status_code == 200, silence.text
        notifier.update(_alert("quiet@sl-1", f"quiet-{uid}", "major", "sl-1", "hush"), True)
        wait_until(lambda: httpx.get(f"{am.url}/api/v2/alerts", params={
            "filter": f'alertname="quiet-{uid}"', "silenced": "true"}).json(),
            message="the silenced alert held by Alertmanager")
        state = httpx.get(f"{am.url}/api/v2/alerts",
                          params={"filter": f'alertname="quiet-{uid}"'}).json()
        assert state[0]["status"]["state"] == "suppressed"
        time.sleep(3)  # group_wait and group_interval are 1 s: a notification would be here
        assert not [a for a in hook.alerts() if a["labels"]["alertname"] == f"quiet-{uid}"]
        assert not any(f"quiet-{uid}" in (m["Subject"] or "") for m in mails.messages)

        notifier.update(_alert("dim@sl-2", f"dim-{uid}", "minor", "sl-2", "sl-2 dim"), False)
        wait_until(lambda: [a for a in hook.alerts("resolved")
                            if a["labels"] == {"alertname": f"dim-{uid}", "severity": "minor",
                                               "district": uid, "device_id": "sl-2"}],
                   message="sl-2 resolved")
    finally:
        notifier.close()


def test_alertmanager_away_loses_nothing(alerting, uid):
    """Posted to a port where nothing listens, then to Alertmanager: the active alert and a
    cleared one both arrive once it can be reached."""
    am, hook, mails = alerting
    notifier = AlertmanagerNotifier(f"http://127.0.0.1:{free_port()}", lambda a: {
        "district": uid, "device_id": a.scope}, resend_s=0.5)
    try:
        notifier.update(_alert("away@sl-1", f"away-{uid}", "minor", "sl-1", "up"), True)
        notifier.update(_alert("gone@sl-2", f"gone-{uid}", "minor", "sl-2", "up"), True)
        notifier.update(_alert("gone@sl-2", f"gone-{uid}", "minor", "sl-2", "up"), False)
        wait_until(lambda: notifier.failures >= 2, message="failed posts")
        assert notifier.posted == 0
        notifier.url = f"{am.url}/api/v2/alerts"  # Alertmanager back (at its address)
        wait_until(lambda: notifier.posted >= 1 and notifier.last_error is None,
                   message="posted once reachable")
        names = {a["labels"]["alertname"]: a for a in httpx.get(
            f"{am.url}/api/v2/alerts", params={"filter": f'district="{uid}"'}).json()}
        assert f"away-{uid}" in names  # active
        assert f"gone-{uid}" not in names or names[f"gone-{uid}"]["status"]["state"] != "active"
    finally:
        notifier.close()


def test_an_unpaid_invoice_past_its_due_date_pages_and_resolves_once_paid(
        alerting, settings, uid, publisher, tmp_path, monkeypatch):
    """A post-paid account's March invoice, issued by the rule engine when April's first
    reading ends March (event time), due 14 days later: a reading after that raises
    `billing-overdue` at Alertmanager with the account's label; once a payment lands in the
    ledger (another writer, as the gateway's payment callback is) it resolves."""
    from billing import config as billing_config
    from billing import list_invoices, open_db
    from billing.ledger import append
    from citygrid.fleet import Fleet, FleetDevice
    from rules import runner as runner_module

    am, hook, _ = alerting
    monkeypatch.setattr(runner_module, "INVOICES_EVERY_S", 0.5)  # a look each half second
    account = f"acc-{uid}"
    (tmp_path / "billing.yaml").write_text(f"""
currency: DKK
seller: {{name: Test Forsyning, vat_id: DK12345678, payment_terms_days: 14}}
tariffs: {{flat: {{price: 2.00, standing_charge_per_month: 25.00}}}}
accounts: {{{account}: {{name: Post-paid ApS}}}}
""")
    fleet = Fleet([FleetDevice("m-1", "meter", uid, 55.66, 12.5, account_id=account,
                               tariff="flat", max_power_w=17250.0)])
    settings = settings.with_(alertmanager_url=am.url, billing=str(tmp_path / "billing.yaml"))
    runner = RuleRunner(settings, fleet, COPENHAGEN, None, RunnerConfig(
        DEFAULT_RULES, f"city/v1/{uid}/+/+/telemetry", client_id=f"rules-{uid}"))
    runner.start()
    topic = str(Topic(uid, "meter", "m-1"))

    def at(*args: int) -> int:
        return int(datetime(*args, tzinfo=COPENHAGEN.tz).timestamp() * 1000)

    def overdue(status: str) -> list[dict]:  # (a post-paid account is also low-balance)
        return [a for a in hook.alerts(status) if a["labels"].get("account") == account
                and a["labels"]["alertname"] == "billing-overdue"]

    def firing() -> list[dict]:
        return overdue("firing")

    try:
        for seq, (ts, kwh) in enumerate([(at(2026, 3, 2), 100.0), (at(2026, 3, 20), 120.0),
                                         (at(2026, 4, 2), 121.0)], start=1):
            publisher.send(topic, {"ts": ts, "seq": seq, "energy_kwh": kwh, "power_w": 50.0})
        [inv] = wait_until(lambda: list_invoices(settings.data_dir), 20,
                           message="March's invoice")
        assert inv.document["due_date"] == "2026-04-16" and firing() == []
        publisher.send(topic, {"ts": at(2026, 4, 16, 12), "seq": 4, "energy_kwh": 121.5,
                               "power_w": 50.0})
        time.sleep(2)  # its last day: not overdue yet
        assert firing() == []
        publisher.send(topic, {"ts": at(2026, 4, 17, 9), "seq": 5, "energy_kwh": 122.0,
                               "power_w": 50.0})
        [alert] = wait_until(firing, 30, message="the overdue alert at the webhook")
        assert alert["labels"] == {"alertname": "billing-overdue", "severity": "major",
                                   "account": account}
        owed = inv.document["outstanding_minor"]
        assert alert["annotations"]["summary"] == (
            f"Account {account}: invoice {inv.number} was due 2026-04-16; "
            f"{owed / 100:.2f} DKK of it is unpaid")
        def pay(key: str, minor: int) -> None:
            payer = open_db(settings.data_dir)
            try:
                append(payer, billing_config.load(settings.billing), key, account, {
                    "kind": "payment", "amount_minor": minor, "currency": "DKK",
                    "paid_at_ms": at(2026, 4, 17, 10)}, minor)
            finally:
                payer.close()

        pay(f"pay-{uid}-1", 1000)  # in part: Alertmanager holds the new figure
        left = f"{(owed - 1000) / 100:.2f} DKK of it is unpaid"
        wait_until(lambda: [a for a in httpx.get(f"{am.url}/api/v2/alerts", params={
            "filter": [f'account="{account}"', 'alertname="billing-overdue"']}).json()
            if a["annotations"]["summary"].endswith(left)], 30,
            message="the overdue alert restated with what is left")
        pay(f"pay-{uid}-2", owed - 1000)
        wait_until(lambda: overdue("resolved"), 30, message="the overdue alert resolved")
    finally:
        runner.stop()
