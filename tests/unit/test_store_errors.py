"""How the InfluxDB store names what the server answers (httpx.MockTransport, no server).
The bodies are InfluxDB 1.6's own (and 2.x's for the bucket), taken from a real server."""

from __future__ import annotations

import gzip
import logging
from urllib.parse import parse_qs

import httpx
import pytest

from citygrid.settings import Settings
from citygrid.store import (
    DatabaseNotFound,
    Point,
    StoreAuthError,
    StoreRejected,
    StoreUnavailable,
    credential_settings,
)
from citygrid.store.influx import InfluxStore
from citygrid.store.lifecycle import Lifecycle

T0 = 1_790_000_000_000
NO_DB = {"error": 'database not found: "city"'}


def point(i: int, power: object = 500.0) -> Point:
    return Point("meter", {"device_id": f"m-{i}", "district": "d1"},
                 {"seq": i, "power_w": power}, T0 + i)


class Server:
    """Answers per (method, path, InfluxQL statement or 'write'); records what was asked."""

    def __init__(self, **answers: tuple[int, dict | None]):
        self.answers = answers
        self.requests: list[tuple[str, str, dict]] = []  # (path, statement, URL params)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        params = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
        form: dict[str, str] = {}
        if request.url.path == "/write":
            what = "write"
            body = request.content
            if request.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if b"power_w=\"bad\"" in body and "write_bad" in self.answers:
                what = "write_bad"
        else:
            form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
            assert not {"u", "p"} & set(form), "1.x reads credentials from the URL only"
            what = form["q"].split()[0].lower()  # create, show, select…
        self.requests.append((request.url.path, form.get("q", "write"), params))
        if what not in self.answers:
            raise AssertionError(f"unexpected request {request.method} {request.url} {what}")
        answer = self.answers[what]
        if isinstance(answer, list):  # one answer per call, the last one repeats
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        status, body = answer
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body) if body is not None else httpx.Response(status)

    def statements(self) -> list[str]:
        return [q for path, q, _ in self.requests]


def influx(server: Server, **kw) -> InfluxStore:
    return InfluxStore("http://influx.test:8086", "city", transport=httpx.MockTransport(server),
                       **kw)


@pytest.mark.parametrize("status, body", [
    (401, {"error": "authorization failed"}),
    (401, {"error": "unable to parse authentication credentials"}),
    (401, {"code": "unauthorized", "message": "unauthorized access"}),  # 2.x
    (403, {"error": '"reader" user is not authorized to write to database "city"'}),
])
def test_refused_credentials_are_a_store_auth_error(status, body):
    store = influx(Server(write=(status, body)), username="reader", password="x")
    with pytest.raises(StoreAuthError) as e:
        store.write([point(1)])
    assert e.value.status == status
    assert str(status) in str(e.value)
    assert (body.get("error") or body["message"]) in str(e.value)
    assert isinstance(e.value, StoreUnavailable)  # to a writer it is still an outage


def test_queries_with_refused_credentials_are_a_store_auth_error():
    store = influx(Server(select=(401, {"error": "authorization failed"})))
    with pytest.raises(StoreAuthError):
        store.count("meter")


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_unavailable(status):
    store = influx(Server(write=(status, {"error": "timeout"})))
    with pytest.raises(StoreUnavailable) as e:
        store.write([point(1)])
    assert not isinstance(e.value, StoreAuthError | DatabaseNotFound)


def test_no_answer_is_unavailable():
    store = influx(Server(write=(0, httpx.ConnectError("connection refused"))))
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.write([point(1)])


def test_another_404_is_unavailable_not_a_missing_database():
    store = influx(Server(write=(404, {"error": "page not found"})))
    with pytest.raises(StoreUnavailable) as e:
        store.write([point(1)])
    assert not isinstance(e.value, DatabaseNotFound)


def test_a_400_is_rejected_and_names_the_bad_points():
    server = Server(write=(204, None),
                    write_bad=(400, {"error": "partial write: field type conflict"}))
    store = influx(server)
    with pytest.raises(StoreRejected) as e:
        store.write([point(1), point(2, power="bad"), point(3)])
    assert e.value.points == [point(2, power="bad")]
    assert "field type conflict" in e.value.message


def test_a_missing_database_is_created_and_the_write_repeated():
    server = Server(write=[(404, NO_DB), (204, None)], create=(200, {"results": [{}]}))
    influx(server).write([point(1)])
    assert server.statements() == ["write", 'CREATE DATABASE "city"', "write"]


def test_a_missing_database_that_may_not_be_created_is_database_not_found():
    server = Server(write=(404, NO_DB), create=(403, {
        "error": "error authorizing query: writer not authorized to execute statement "
                 "'CREATE DATABASE city', requires admin privilege"}))
    with pytest.raises(DatabaseNotFound) as e:
        influx(server, username="writer", password="w").write([point(1)])
    assert "city" in str(e.value) and "requires admin privilege" in str(e.value)


def test_bucket_not_found_from_2x_is_database_not_found():
    server = Server(write=(404, {"code": "not found", "message": 'bucket "city" not found'}),
                    create=(400, {"error": "not implemented: CREATE DATABASE"}))
    with pytest.raises(DatabaseNotFound, match="bucket"):
        influx(server, token="t").write([point(1)])


def test_a_statement_on_a_missing_database_is_database_not_found():
    server = Server(show=(200, {"results": [{"statement_id": 0,
                                             "error": "database not found: city"}]}),
                    select=(200, {"results": [{"statement_id": 0,
                                               "error": "database not found: city"}]}))
    store = influx(server)
    assert store.count("meter") == 0  # reading a database not written yet: empty, as before
    with pytest.raises(DatabaseNotFound):
        store.query('SHOW RETENTION POLICIES ON "city"')


# --------------------------------------------------------------------------- ensure_ready


def test_ensure_ready_with_wrong_credentials_is_an_auth_error():
    server = Server(create=(401, {"error": "authorization failed"}))
    with pytest.raises(StoreAuthError) as e:
        influx(server, username="admin", password="wrong").ensure_ready()
    assert e.value.status == 401
    assert server.requests[0][2]["u"] == "admin" and server.requests[0][2]["p"] == "wrong"


def test_ensure_ready_as_a_writer_that_may_not_create_checks_it_can_write(caplog):
    server = Server(create=(403, {"error": "error authorizing query: writer not authorized "
                                           "to execute statement 'CREATE DATABASE city', "
                                           "requires admin privilege"}),
                    write=(204, None))
    store = influx(server, username="writer", password="w", lifecycle=Lifecycle())
    with caplog.at_level(logging.WARNING, logger="citygrid.store"):
        store.ensure_ready()
        store.ensure_ready()
    assert server.statements() == ['CREATE DATABASE "city"', "write"] * 2  # no lifecycle
    assert len([r for r in caplog.records if "retention policies" in r.message]) == 1


def test_ensure_ready_as_a_user_that_may_not_write_is_an_auth_error():
    server = Server(create=(403, {"error": "requires admin privilege"}),
                    write=(403, {"error": '"reader" user is not authorized to write to '
                                          'database "city"'}))
    with pytest.raises(StoreAuthError, match="not authorized to write") as e:
        influx(server, username="reader", password="r").ensure_ready()
    assert e.value.status == 403


def test_ensure_ready_for_a_missing_database_it_may_not_create():
    server = Server(create=(403, {"error": "requires admin privilege"}), write=(404, NO_DB))
    with pytest.raises(DatabaseNotFound, match="may not create it"):
        influx(server, username="writer", password="w").ensure_ready()


def test_ensure_ready_on_a_server_without_create_database_checks_it_can_write():
    server = Server(create=(400, {"error": "not implemented"}), write=(204, None))
    influx(server, token="t").ensure_ready()
    assert server.statements() == ['CREATE DATABASE "city"', "write"]


def test_a_token_goes_in_the_authorization_header():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(204)

    InfluxStore("http://x:8086", "city", token="s3cret",
                transport=httpx.MockTransport(handler)).write([point(1)])
    assert seen == ["Token s3cret"]


@pytest.mark.parametrize("env, named", [
    ({"influx_token": "t"}, ["CITYGRID_INFLUX_TOKEN"]),
    ({"influx_user": "u", "influx_password": "p"},
     ["CITYGRID_INFLUX_USER", "CITYGRID_INFLUX_PASSWORD", "CITYGRID_INFLUX_TOKEN"]),
    ({}, ["CITYGRID_INFLUX_USER", "CITYGRID_INFLUX_PASSWORD", "CITYGRID_INFLUX_TOKEN"]),
])
def test_the_credential_settings_are_named(env, named):
    hint = credential_settings(Settings(influx_url="http://x:8086", **env))
    assert all(name in hint for name in named), hint
