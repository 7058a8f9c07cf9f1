"""Payments (docs/payments.md): the signing recipe and its worked example, the outbox, top-up,
the dispatcher's answers and backoff, the callback into one chained payment entry, and the
callback API's problems — SQLite and fakes, no network."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from billing import config as billing_config
from billing import payments
from billing.ledger import BillingStore, verify
from billing.payments import (
    Answer,
    CallbackError,
    Dispatcher,
    backoff_s,
    enqueue,
    sign,
    signature_header,
)
from billing.read import check_balances
from citygrid.city import COPENHAGEN
from citygrid.fleet import Fleet, FleetDevice
from citygrid.settings import Settings, SettingsError
from gateway.app import create_app
from gateway.tokens import create_token
from tests.helpers import REPO
from tests.unit.test_gateway_fakes import PROBLEM, FakeFeed, FakePublisher, FakeStore

TZ = COPENHAGEN.tz
SECRET = "cg_test_secret_1"
ENV = {"PAY_ACC_1": SECRET, "PAY_ACC_3": "cg_test_secret_3", "PAY_ACC_4": "cg_test_secret_4"}
CALLBACK = "http://gateway.test/api/v1/billing/payments/callback"
BILLING = """\
version: 1
currency: DKK
tariffs:
  flat: {price: 2.50}
account_defaults: {opening_balance: 1000.00, low_balance: 100.00}
accounts:
  acc-1:
    opening_balance: 1000.00
    payment_agent: {url: "http://agent.test/pay", secret_env: PAY_ACC_1}
  acc-3:
    opening_balance: 100.00
    low_balance: 0
    payment_agent: {url: "http://agent3.test/pay", secret_env: PAY_ACC_3}
    top_up: {below: 50.00, amount: 200.00}
  acc-4:
    payment_agent: {url: "http://agent4.test/pay", secret_env: PAY_ACC_4, pays: invoices}
"""
FLEET = Fleet([FleetDevice(f"m-{n}", "meter", "valby", 55.66, 12.50, account_id=f"acc-{n}",
                           tariff="flat", max_power_w=17250.0) for n in (1, 2, 3, 4)])
H = 3_600_000


def ms(*args) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


T0 = ms(2026, 11, 2, 10)


@pytest.fixture
def env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    return ENV


@pytest.fixture
def billing_file(tmp_path):
    path = tmp_path / "billing.yaml"
    path.write_text(BILLING)
    return path


@pytest.fixture
def cfg(billing_file):
    return billing_config.load(billing_file)


@pytest.fixture
def store(tmp_path, cfg):
    s = BillingStore(tmp_path / "billing.sqlite", cfg, FLEET, TZ)
    yield s
    s.close()


def use(s: BillingStore, meter: str, kwh: float, at_ms: int) -> list:
    """One meter's consumption of ``kwh`` over the hour before ``at_ms``, settled then."""
    register = _registers.setdefault((id(s), meter), [0.0])
    if register[0] == 0.0:
        s.on_reading(meter, at_ms - 2 * H, 1000.0)
        register[0] = 1000.0
    register[0] += kwh
    s.on_reading(meter, at_ms - H, register[0] - kwh)
    s.on_reading(meter, at_ms, register[0])
    return s.settle(meter, at_ms)


_registers: dict = {}


def rows(s: BillingStore) -> list[payments.PaymentRequest]:
    payments.ensure_schema(s.db)  # no request yet: no table yet
    return [payments.PaymentRequest(*r) for r in s.db.execute(
        f"SELECT {', '.join(payments._COLUMNS)} FROM payment_requests ORDER BY created_ms, key")]


def callback_body(key: str, status: str = "confirmed", **fields) -> bytes:
    message = {"protocol": 1, "request": key, "status": status, **fields}
    return json.dumps(message, separators=(",", ":")).encode()


def signed(body: bytes, t: int, secret: str = SECRET) -> str:
    return signature_header(secret.encode(), t, body)


# ------------------------------------------------------------------ signing


DOC = (REPO / "docs" / "payments.md").read_text()
EXAMPLE_BODY = (b'{"account":"acc-00042","amount":"25.00","amount_minor":2500,"callback_url":'
                b'"https://city.example/api/v1/billing/payments/callback","created_ms":'
                b'1764547200000,"currency":"DKK","kind":"settlement","protocol":1,"reference":'
                b'"m-00042:1764543600000:1764547200000","request":'
                b'"m-00042:1764543600000:1764547200000"}')
EXAMPLE_HMAC = "dabd1806a39ae65d30a2278e31025c075793280874244cc5a73684203509ff5c"


class TestSigning:
    def test_the_documented_worked_example(self):
        assert sign(b"cg_example_secret", 1764547230, EXAMPLE_BODY) == EXAMPLE_HMAC
        header = signature_header(b"cg_example_secret", 1764547230, EXAMPLE_BODY)
        assert header == f"t=1764547230,v1={EXAMPLE_HMAC}"
        # The document shows exactly these bytes and this signature.
        assert EXAMPLE_BODY.decode() in DOC and header in DOC
        # … and the body is what CityGrid sends for that request.
        r = payments.PaymentRequest("m-00042:1764543600000:1764547200000", "acc-00042",
                                    "settlement", "m-00042:1764543600000:1764547200000", 2500,
                                    "DKK", 1764547200000, "pending", 0, 0, None, None, None,
                                    None, None, 0)
        assert payments.request_body(r, 100, "https://city.example/api/v1/billing/payments/"
                                     "callback") == EXAMPLE_BODY

    def test_verify_accepts_the_right_signature_and_a_rotated_one(self):
        body = b'{"a":1}'
        header = signed(body, 1_000_000)
        assert payments.verify(SECRET.encode(), header, body, 1_000_010) == 1_000_000
        rotated = header + ",v1=" + sign(b"new-secret", 1_000_000, body)
        assert payments.verify(b"new-secret", rotated, body, 1_000_000) == 1_000_000

    @pytest.mark.parametrize("header, now, message", [
        (None, 1_000_000, "unsigned"),
        ("", 1_000_000, "unsigned"),
        ("v1=abc", 1_000_000, "must be t="),
        ("t=abc,v1=00", 1_000_000, "not Unix seconds"),
        ("t=1000000", 1_000_000, "must be t="),
        ("GOOD", 1_000_301, "stale"),
        ("GOOD", 999_699, "stale"),
        ("t=1000000,v1=" + "0" * 64, 1_000_000, "bad signature"),
        ("OTHER-SECRET", 1_000_000, "bad signature"),
        ("TAMPERED", 1_000_000, "bad signature"),
    ])
    def test_verify_refuses(self, header, now, message):
        body = b'{"a":1}'
        if header == "GOOD":
            header = signed(body, 1_000_000)
        elif header == "OTHER-SECRET":
            header = signed(body, 1_000_000, "someone-else")
        elif header == "TAMPERED":
            header = signed(b'{"a":2}', 1_000_000)
        with pytest.raises(payments.SignatureError, match=message):
            payments.verify(SECRET.encode(), header, body, now)


# ------------------------------------------------------------------ the outbox


class TestOutbox:
    def test_enqueue_is_idempotent_and_checks_what_it_is_given(self, store):
        assert enqueue(store.db, "k1", "acc-1", "settlement", "k1", 500, "DKK", 1)
        assert not enqueue(store.db, "k1", "acc-1", "settlement", "k1", 999, "DKK", 2)
        (r,) = rows(store)
        assert (r.amount_minor, r.status, r.attempts, r.next_try_ms) == (500, "pending", 0, 1)
        with pytest.raises(ValueError, match="kind"):
            enqueue(store.db, "k2", "acc-1", "refund", "k2", 500, "DKK", 1)
        with pytest.raises(ValueError, match="positive"):
            enqueue(store.db, "k3", "acc-1", "settlement", "k3", 0, "DKK", 1)

    def test_a_settlement_asks_the_agent_once(self, store, cfg):
        (s,) = use(store, "m-1", 4.0, T0)
        (r,) = rows(store)
        assert (r.key, r.kind, r.reference, r.account) == (s.entry["key"], "settlement",
                                                            s.entry["key"], "acc-1")
        assert (r.amount_minor, r.currency, r.created_ms) == (1000, "DKK", T0)
        # The settlement again (a replay, a retry after a crash): the same request, once.
        payments.on_settled(store.db, cfg, s.entry)
        store.db.execute("BEGIN")
        payments.on_settled(store.db, cfg, s.entry)
        store.db.execute("COMMIT")
        assert len(rows(store)) == 1
        use(store, "m-1", 2.0, T0 + 2 * H)
        assert [r.amount_minor for r in rows(store)] == [1000, 500]

    def test_no_agent_no_request_and_an_invoice_payer_is_asked_per_invoice(self, store, cfg):
        use(store, "m-2", 4.0, T0)  # acc-2: no agent
        use(store, "m-4", 4.0, T0)  # acc-4 pays invoices, not settlements
        assert rows(store) == []
        assert payments.on_invoiced(store.db, cfg, "acc-4", "INV-2026-0007", 12345, "DKK", T0)
        assert not payments.on_invoiced(store.db, cfg, "acc-4", "INV-2026-0007", 12345, "DKK",
                                        T0 + 1)
        assert not payments.on_invoiced(store.db, cfg, "acc-1", "INV-2026-0008", 1, "DKK", T0)
        assert not payments.on_invoiced(store.db, cfg, "acc-2", "INV-2026-0009", 1, "DKK", T0)
        (r,) = rows(store)
        assert (r.key, r.kind, r.reference, r.amount_minor) == (
            "invoice:INV-2026-0007", "invoice", "INV-2026-0007", 12345)

    def test_issuing_an_invoice_asks_an_invoice_payer_in_the_same_transaction(self, store,
                                                                              cfg):
        from billing.invoices import issue

        use(store, "m-4", 4.0, T0)  # 4 kWh at 2.50: 10.00 DKK
        invoice = issue(store.db, cfg, TZ, "acc-4", T0 + H)
        (r,) = rows(store)
        assert (r.key, r.kind, r.reference, r.amount_minor) == (
            f"invoice:{invoice.number}", "invoice", invoice.number, invoice.total_minor)
        assert invoice.total_minor == 1000

    def test_top_up_only_below_the_threshold_and_once_while_open(self, tmp_path, store, cfg,
                                                                 env):
        use(store, "m-3", 16.0, T0)  # 100.00 − 40.00 = 60.00: above 50
        assert rows(store) == []
        (low,) = use(store, "m-3", 8.0, T0 + 2 * H)  # 40.00: below
        (r,) = rows(store)
        assert (r.key, r.kind, r.reference, r.amount_minor) == (
            f"topup:acc-3:{low.entry['seq']}", "top_up", low.entry["key"], 20000)
        use(store, "m-3", 4.0, T0 + 4 * H)  # 30.00, still below: the open one will do
        assert len(rows(store)) == 1
        # Declined: the next settlement below the threshold asks again.
        body = callback_body(r.key, "declined", reason="card expired")
        payments.callback(store.db, cfg, signed(body, T0 // 1000, ENV["PAY_ACC_3"]), body, T0)
        (again,) = use(store, "m-3", 2.0, T0 + 6 * H)
        assert [x.key for x in rows(store)] == [r.key, f"topup:acc-3:{again.entry['seq']}"]
        # Confirmed: 25.00 + 200.00 is above 50 — no new request until it falls again.
        second = rows(store)[1]
        body = callback_body(second.key, payment_id="p-1", amount_minor=20000, currency="DKK")
        payments.callback(store.db, cfg, signed(body, T0 // 1000, ENV["PAY_ACC_3"]), body, T0)
        assert store.balance("acc-3") == 22500
        use(store, "m-3", 2.0, T0 + 8 * H)
        assert len(rows(store)) == 2
        verify(tmp_path / "billing.sqlite")


# ------------------------------------------------------------------ the dispatcher


class FakeAgent:
    def __init__(self, *answers: Answer):
        self.answers, self.sent = list(answers), []

    def __call__(self, url, headers, body, timeout_s):
        self.sent.append((url, headers, body))
        return self.answers.pop(0) if self.answers else Answer(202, "{}")


def dispatcher(tmp_path, cfg, agent, **kw) -> Dispatcher:
    return Dispatcher(tmp_path / "billing.sqlite", cfg, CALLBACK, environ=ENV, post=agent,
                      rand=lambda: 1.0, **kw)


class TestDispatcher:
    def test_backoff_doubles_from_2_s_to_10_minutes_with_jitter(self):
        assert [backoff_s(n) for n in range(1, 12)] == [2, 4, 8, 16, 32, 64, 128, 256, 512,
                                                        600, 600]
        assert backoff_s(1, 0.0) == 1.0 and backoff_s(10, 0.0) == 300.0
        assert backoff_s(10_000) == 600

    def test_signed_request_retried_until_answered_then_waiting_for_the_callback(
            self, tmp_path, store, cfg):
        (s,) = use(store, "m-1", 4.0, T0)
        agent = FakeAgent(Answer(None, "ConnectError: refused"), Answer(503, "busy"),
                          Answer(429, "slow down"), Answer(202, '{"status":"accepted"}'))
        d = dispatcher(tmp_path, cfg, agent, confirm_wait_s=300)
        now = T0
        for n, wait_s in enumerate([2, 4, 8], start=1):
            assert d.run_once(now) == 1
            (r,) = rows(store)
            assert (r.status, r.attempts, r.next_try_ms) == ("pending", n, now + wait_s * 1000)
            assert r.last_error.startswith("no answer from the agent")
            assert d.run_once(r.next_try_ms - 1) == 0  # not before it is due
            now = r.next_try_ms
        assert d.run_once(now) == 1
        (r,) = rows(store)
        assert (r.status, r.attempts, r.last_error, r.sent_ms) == ("sent", 4, None, now)
        assert r.next_try_ms == now + 300_000  # no callback by then: asked again
        url, headers, body = agent.sent[-1]
        assert url == "http://agent.test/pay" and headers["Idempotency-Key"] == s.entry["key"]
        assert payments.verify(SECRET.encode(), headers["CityGrid-Signature"], body, now / 1000)
        message = json.loads(body)
        assert message == {"protocol": 1, "request": s.entry["key"], "kind": "settlement",
                           "account": "acc-1", "reference": s.entry["key"], "amount_minor": 1000,
                           "amount": "10.00", "currency": "DKK", "created_ms": T0,
                           "callback_url": CALLBACK}
        assert {b for _, _, b in agent.sent} == {body}  # every attempt the same bytes
        assert [h["CityGrid-Attempt"] for _, h, _ in agent.sent] == ["1", "2", "3", "4"]
        assert d.run_once(now + 300_000) == 1  # still no callback: asked again, same key
        assert agent.sent[-1][1]["Idempotency-Key"] == s.entry["key"]
        d.stop()

    def test_a_refusal_is_a_decline_with_its_reason(self, tmp_path, store, cfg):
        use(store, "m-1", 4.0, T0)
        d = dispatcher(tmp_path, cfg, FakeAgent(Answer(401, "bad signature")))
        d.run_once(T0)
        (r,) = rows(store)
        assert r.status == "declined" and "HTTP 401: bad signature" in r.last_error
        assert d.run_once(T0 + 10 * H) == 0  # never again
        d.stop()

    def test_a_claim_keeps_other_dispatchers_off_until_its_lease_runs_out(self, tmp_path,
                                                                          store, cfg):
        use(store, "m-1", 4.0, T0)

        class Died(BaseException):
            pass

        def dies(*args):
            raise Died  # sent, and died before recording the answer

        one = dispatcher(tmp_path, cfg, dies, lease_s=30)
        with pytest.raises(Died):
            one.run_once(T0)
        agent = FakeAgent()
        two = dispatcher(tmp_path, cfg, agent, lease_s=30)
        assert two.run_once(T0 + 29_999) == 0
        assert two.run_once(T0 + 30_000) == 1 and len(agent.sent) == 1
        assert rows(store)[0].status == "sent"
        one.stop()
        two.stop()

    def test_a_missing_secret_is_retried_and_named(self, tmp_path, store, cfg):
        use(store, "m-1", 4.0, T0)
        agent = FakeAgent()
        d = Dispatcher(tmp_path / "billing.sqlite", cfg, CALLBACK, environ={}, post=agent)
        d.run_once(T0)
        (r,) = rows(store)
        assert r.status == "pending" and "PAY_ACC_1" in r.last_error and not agent.sent
        d.stop()

    def test_the_runner_s_dispatcher_refuses_to_start_half_configured(self, tmp_path, cfg):
        plain = billing_config.load()
        assert payments.dispatcher(tmp_path / "b.sqlite", plain, None, environ={}) is None
        with pytest.raises(SettingsError) as e:
            payments.dispatcher(tmp_path / "b.sqlite", cfg, "", environ=ENV)
        assert e.value.variable == "CITYGRID_PAYMENT_CALLBACK_URL"
        assert "acc-1, acc-3, acc-4" in str(e.value)
        with pytest.raises(SettingsError) as e:
            payments.dispatcher(tmp_path / "b.sqlite", cfg, CALLBACK,
                                environ={"PAY_ACC_1": "x", "PAY_ACC_4": "y"})
        assert e.value.variable == "PAY_ACC_3" and "acc-3" in str(e.value)
        d = payments.dispatcher(tmp_path / "b.sqlite", cfg, CALLBACK, environ=ENV)
        assert isinstance(d, Dispatcher)
        d.stop()


# ------------------------------------------------------------------ the callback


class TestCallback:
    def request(self, store) -> payments.PaymentRequest:
        use(store, "m-1", 4.0, T0)
        return rows(store)[0]

    def apply(self, store, cfg, body: bytes, now_ms: int = T0, secret: str = SECRET):
        return payments.callback(store.db, cfg, signed(body, now_ms // 1000, secret), body,
                                 now_ms, environ=ENV)

    def test_a_confirmation_is_one_chained_payment_entry(self, tmp_path, store, cfg):
        r = self.request(store)
        assert store.balance("acc-1") == 99_000
        body = callback_body(r.key, payment_id="pay-77", amount_minor=1000, currency="DKK")
        out = self.apply(store, cfg, body, T0 + 5000)
        assert not out.duplicate and out.request.status == "confirmed"
        entry = out.entry
        assert {k: entry[k] for k in ("kind", "account", "amount_minor", "currency", "request",
                                      "reference", "payment_id", "confirmed_at_ms", "key")} == {
            "kind": "payment", "account": "acc-1", "amount_minor": 1000, "currency": "DKK",
            "request": r.key, "reference": r.reference, "payment_id": "pay-77",
            "confirmed_at_ms": T0 + 5000, "key": f"payment:{r.key}"}
        assert entry["balance_after_minor"] == 100_000 == store.balance("acc-1")
        count, head = verify(tmp_path / "billing.sqlite")
        assert count == 2 and head == entry["hash"]
        assert check_balances(tmp_path) == (2, head)
        (after,) = rows(store)
        assert (after.status, after.payment_id, after.answered_ms) == ("confirmed", "pay-77",
                                                                       T0 + 5000)
        # The same callback replayed, and a fresh duplicate later: nothing changes.
        again = payments.callback(store.db, cfg, signed(body, (T0 + 5000) // 1000), body,
                                  T0 + 6000, environ=ENV)
        later = self.apply(store, cfg, body, T0 + 60_000)
        for dup in (again, later):
            assert dup.duplicate and dup.entry == entry
        assert verify(tmp_path / "billing.sqlite") == (2, head)
        assert store.balance("acc-1") == 100_000 and rows(store) == [after]

    def test_a_decline_adds_no_entry_and_a_contradiction_is_refused(self, tmp_path, store,
                                                                   cfg):
        r = self.request(store)
        out = self.apply(store, cfg, callback_body(r.key, "declined", reason="over limit"))
        assert out.request.status == "declined" and out.entry is None
        assert "over limit" in out.request.last_error
        assert self.apply(store, cfg, callback_body(r.key, "declined")).duplicate
        body = callback_body(r.key, payment_id="p", amount_minor=1000, currency="DKK")
        with pytest.raises(CallbackError) as e:
            self.apply(store, cfg, body)
        assert e.value.status == 409 and "declined already" in e.value.detail
        assert verify(tmp_path / "billing.sqlite")[0] == 1
        assert store.balance("acc-1") == 99_000

    def test_another_payment_id_for_a_confirmed_request_is_a_conflict(self, store, cfg):
        r = self.request(store)
        self.apply(store, cfg, callback_body(r.key, payment_id="p-1", amount_minor=1000,
                                             currency="DKK"))
        for body in (callback_body(r.key, payment_id="p-2", amount_minor=1000, currency="DKK"),
                     callback_body(r.key, "declined")):
            with pytest.raises(CallbackError) as e:
                self.apply(store, cfg, body)
            assert e.value.status == 409
        assert store.balance("acc-1") == 100_000


# ------------------------------------------------------------------ the API


@pytest.fixture
def api(tmp_path, billing_file, store, env):
    settings = Settings(mqtt_url="mqtt://127.0.0.1:9", data_dir=str(tmp_path),
                        billing=str(billing_file))
    app = create_app(settings, store=FakeStore(), feed=FakeFeed({}), publisher=FakePublisher())
    viewer = {"Authorization": f"Bearer {create_token(tmp_path, 'viewer', 'v')}"}
    with TestClient(app) as client:
        yield client, viewer


def state(store) -> tuple:
    return (rows(store), store.entries(), store.balance("acc-1"))


class TestApi:
    URL = "/api/v1/billing/payments/callback"

    def post(self, client, body: bytes, header: str | None):
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers["CityGrid-Signature"] = header
        return client.post(self.URL, content=body, headers=headers)

    def test_a_signed_confirmation_over_http_and_its_replay(self, api, store):
        client, viewer = api
        use(store, "m-1", 4.0, T0)
        key = rows(store)[0].key
        body = callback_body(key, payment_id="pay-1", amount_minor=1000, currency="DKK")
        header = signed(body, int(datetime.now().timestamp()))
        r = self.post(client, body, header)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "confirmed" and not r.json()["duplicate"]
        assert r.json()["entry"]["kind"] == "payment"
        before = state(store)
        replay = self.post(client, body, header)
        assert replay.status_code == 200 and replay.json()["duplicate"]
        assert replay.json()["entry"] == r.json()["entry"]
        assert state(store) == before and before[2] == 100_000
        listed = client.get("/api/v1/billing/payments", headers=viewer).json()
        assert [(x["key"], x["status"], x["payment_id"]) for x in listed["requests"]] == [
            (key, "confirmed", "pay-1")]
        assert [p["payment_id"] for p in listed["payments"]] == ["pay-1"]
        assert client.get("/api/v1/billing/payments", headers=viewer,
                          params={"account": "acc-2"}).json() == {"requests": [],
                                                                  "payments": []}
        assert client.get("/api/v1/billing/payments").status_code == 401

    @pytest.mark.parametrize("case, status, words", [
        ("unsigned", 401, "unsigned"),
        ("malformed", 401, "t=<unix seconds>"),
        ("stale", 401, "stale"),
        ("future", 401, "stale"),
        ("bad-signature", 401, "bad signature"),
        ("other-secret", 401, "bad signature"),
        ("unknown", 404, "no such payment request"),
        ("not-json", 422, "not JSON"),
        ("no-request", 422, "request"),
        ("bad-status", 422, "status"),
        ("no-payment-id", 422, "payment_id"),
        ("amount", 422, "does not match"),
        ("currency", 422, "does not match"),
        ("no-amount", 422, "amount_minor: missing"),
        ("too-large", 413, "at most"),
    ])
    def test_bad_callbacks_are_problems_and_change_nothing(self, api, store, case, status,
                                                           words):
        client, _ = api
        use(store, "m-1", 4.0, T0)
        key = rows(store)[0].key
        now = int(datetime.now().timestamp())
        good = {"payment_id": "p-1", "amount_minor": 1000, "currency": "DKK"}
        body = callback_body(key, **good)
        header = signed(body, now)
        if case == "unsigned":
            header = None
        elif case == "malformed":
            header = "sha256=" + sign(SECRET.encode(), now, body)
        elif case in ("stale", "future"):
            header = signed(body, now - 301 if case == "stale" else now + 400)
        elif case == "bad-signature":
            header = header[:-1] + ("1" if header.endswith("0") else "0")  # one digit off
        elif case == "other-secret":
            header = signed(body, now, ENV["PAY_ACC_3"])
        else:
            body = {
                "unknown": callback_body("m-1:0:1", **good),
                "not-json": b"{not json",
                "no-request": json.dumps({"status": "confirmed"}).encode(),
                "bad-status": callback_body(key, "paid", **good),
                "no-payment-id": callback_body(key, amount_minor=1000, currency="DKK"),
                "amount": callback_body(key, **{**good, "amount_minor": 999}),
                "currency": callback_body(key, **{**good, "currency": "EUR"}),
                "no-amount": callback_body(key, payment_id="p-1", currency="DKK"),
                "too-large": callback_body(key, **good, note="x" * 70_000),
            }[case]
            header = signed(body, now)
        before = state(store)
        r = self.post(client, body, header)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == PROBLEM
        problem = r.json()
        assert problem["status"] == status and words in problem["detail"], problem
        assert problem["instance"] == self.URL
        assert state(store) == before


# ------------------------------------------------------------------ the reference agent


class TestReferenceAgent:
    def agent(self, tmp_path, **kw):
        from billing import agent

        return agent, agent.Agent(SECRET.encode(), agent.State(tmp_path / "agent.json"),
                                  clock=lambda: 1_000_000.0, **kw)

    def send(self, a, amount: int = 1000, key: str = "k-1", t: int = 1_000_000):
        r = payments.PaymentRequest(key, "acc-1", "settlement", key, amount, "DKK", 1, "pending",
                                    0, 0, None, None, None, None, None, 0)
        body = payments.request_body(r, 100, CALLBACK)
        return a.receive({"CityGrid-Signature": signed(body, t), "Idempotency-Key": key}, body)

    def test_decides_once_per_key_and_remembers_it_across_a_restart(self, tmp_path):
        module, a = self.agent(tmp_path)
        status, answer, key = self.send(a)
        assert (status, answer["status"], answer["duplicate"], key) == (202, "confirmed",
                                                                        False, "k-1")
        _, b = self.agent(tmp_path)  # restarted: the same decision, from its file
        status, again, _ = self.send(b)
        assert status == 200 and again["duplicate"]
        assert again["payment_id"] == answer["payment_id"]
        with pytest.raises(module.Refused) as e:
            self.send(b, amount=1001)
        assert e.value.status == 422 and "another request" in e.value.detail
        callback = json.loads(b.callback_body(b.state.records["k-1"]))
        assert callback == {"protocol": 1, "request": "k-1", "status": "confirmed",
                            "payment_id": answer["payment_id"], "amount_minor": 1000,
                            "currency": "DKK", "decided_ms": 1_000_000_000}

    def test_refuses_bad_signatures_and_stale_timestamps_and_declines_above_its_limit(
            self, tmp_path):
        module, a = self.agent(tmp_path, decline_above=5000)
        for t in (1_000_000 - 301, 1_000_000 + 301):
            with pytest.raises(module.Refused) as e:
                self.send(a, t=t)
            assert e.value.status == 401 and "stale" in e.value.detail
        with pytest.raises(module.Refused) as e:
            a.receive({"CityGrid-Signature": "t=1000000,v1=00", "Idempotency-Key": "k"}, b"{}")
        assert e.value.status == 401
        _, answer, _ = self.send(a, amount=5001, key="big")
        assert answer["status"] == "declined" and answer["payment_id"] is None
        assert "above" in json.loads(a.callback_body(a.state.records["big"]))["reason"]
        assert module.sign(b"cg_example_secret", 1764547230, EXAMPLE_BODY) == EXAMPLE_HMAC


def test_the_rules_runner_runs_a_dispatcher_only_when_configured(tmp_path, billing_file, env):
    from rules.loader import DEFAULT_RULES
    from rules.runner import RuleRunner, RunnerConfig

    def runner(**settings):
        data = tmp_path / f"data-{len(settings)}"
        return RuleRunner(Settings(mqtt_url="mqtt://127.0.0.1:1", data_dir=str(data),
                                   **settings), FLEET, COPENHAGEN, None,
                          RunnerConfig(DEFAULT_RULES))

    with pytest.raises(SettingsError) as e:
        runner(billing=str(billing_file))
    assert e.value.variable == "CITYGRID_PAYMENT_CALLBACK_URL"
    plain = runner()  # the shipped billing example: no agents, no dispatcher
    assert plain.payments is None
    plain.stop()
    paying = runner(billing=str(billing_file), status_url="http://gw.example:8000")
    assert isinstance(paying.payments, Dispatcher)
    assert paying.payments.callback_url == ("http://gw.example:8000/api/v1/billing/payments/"
                                            "callback")
    paying.stop()
