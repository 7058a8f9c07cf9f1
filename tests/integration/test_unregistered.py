"""Unregistered devices end to end: a real Mosquitto, ingest into the embedded SQLite store,
the gateway's API (its lifespan runs). A reading from a device the registry does not know is
stored and listed; in quarantine it is a dead letter instead; registering it through the API
takes it off the list and its next reading counts as a registered device's."""

from __future__ import annotations

import contextlib
import sqlite3
import time

import orjson
import pytest
from fastapi.testclient import TestClient

from citygrid import contract
from citygrid.fleet import FleetDevice
from citygrid.registry import Registry
from citygrid.store import open_store
from gateway.app import create_app
from gateway.tokens import create_token
from ingest import UNKNOWN_DEVICE, read_dead_letter_counts
from ingest.service import IngestConfig, IngestService
from tests.helpers import light, wait_until

URL = "/api/v1/devices/unregistered"


@contextlib.contextmanager
def city(settings, uid):
    """Registry with one light, ingest for the test's district, the gateway with tokens."""
    registry = Registry(settings.data_dir)
    registry.upsert(FleetDevice("sl-known", "streetlight", uid, 55.68, 12.57, rated_w=40))
    registry.close()
    tokens = {r: create_token(settings.data_dir, r, f"test-{r}") for r in ("viewer", "admin")}
    store = open_store(settings)
    service = IngestService(settings, store, IngestConfig(
        topic=f"city/v1/{uid}/+/+/telemetry", client_id=f"ingest-{uid}",
        flush_interval_s=0.05, registry_poll_s=0.2))
    service.start()
    try:
        with TestClient(create_app(settings)) as client:
            yield client, tokens, service, store
    finally:
        service.stop()
        store.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def listed(client, token: str, device_id: str) -> list[dict]:
    r = client.get(URL, headers=auth(token))
    assert r.status_code == 200, r.text
    return [d for d in r.json() if d["device_id"] == device_id]


def unflushed_rows(data_dir, device_id: str) -> list[tuple]:
    """Ingest's own table, unfiltered by the registry."""
    with sqlite3.connect(f"{data_dir}/ingest.sqlite") as db:
        return db.execute("SELECT device_id FROM unregistered WHERE device_id = ?",
                          (device_id,)).fetchall()


def stray_topic(uid: str) -> str:
    return str(contract.Topic(uid, "streetlight", "sl-stray"))


def test_an_unknown_device_is_stored_listed_and_registered(settings, publisher, uid):
    now = int(time.time() * 1000)
    with city(settings, uid) as (client, tokens, service, store):
        before = int(time.time() * 1000)
        publisher.send(str(contract.Topic(uid, "streetlight", "sl-known")), light(now, 1))
        publisher.send(stray_topic(uid), light(now, 1))
        publisher.send(stray_topic(uid), light(now + 1000, 2)).wait_for_publish(5)

        row = wait_until(lambda: next((d for d in listed(client, tokens["viewer"], "sl-stray")
                                       if d["count"] == 2), None), 5, 0.1,
                         "sl-stray listed with 2 messages")
        assert (row["kind"], row["district"]) == ("streetlight", uid)
        assert before <= row["first_seen"] <= row["last_seen"] <= int(time.time() * 1000)
        assert orjson.loads(row["sample"])["seq"] == 2
        assert listed(client, tokens["viewer"], "sl-known") == []
        # store mode: its readings are stored as any others
        wait_until(lambda: "sl-stray" in store.latest("streetlight", device_id="sl-stray"),
                   5, 0.1, "sl-stray's reading stored")

        body = {"lat": 55.69, "lon": 12.55, "rated_w": 55}
        path = f"{URL}/sl-stray/register"
        r = client.post(path, json=body, headers=auth(tokens["viewer"]))
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
        r = client.post(f"{URL}/sl-never-seen/register", json=body, headers=auth(tokens["admin"]))
        assert r.status_code == 404 and r.json()["title"] == "Not Found"
        r = client.post(path, json={"lat": 95, "lon": 0}, headers=auth(tokens["admin"]))
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        r = client.post(path, json=body, headers=auth(tokens["admin"]))
        assert r.status_code == 201, r.text
        assert {k: r.json()[k] for k in ("device_id", "kind", "district", "lat", "status")} == {
            "device_id": "sl-stray", "kind": "streetlight", "district": uid, "lat": 55.69,
            "status": "registered"}
        assert listed(client, tokens["viewer"], "sl-stray") == []  # off the list at once
        r = client.post(path, json=body, headers=auth(tokens["admin"]))
        assert r.status_code == 409  # registered already
        assert client.get("/api/v1/devices/sl-stray",
                          headers=auth(tokens["viewer"])).json()["district"] == uid

        # Ingest picks the registry's change up by itself; the next reading is a known one.
        wait_until(lambda: service.is_known("sl-stray"), 5, 0.05, "ingest knows sl-stray")
        publisher.send(stray_topic(uid), light(now + 2000, 3)).wait_for_publish(5)
        wait_until(lambda: store.latest("streetlight", device_id="sl-stray")["sl-stray"]
                   .fields["seq"] == 3, 5, 0.1, "the third reading stored")
        service.unregistered.flush()
        assert unflushed_rows(settings.data_dir, "sl-stray") == []


@pytest.fixture
def quarantine(settings):
    return settings.with_(unknown_devices="quarantine")


def test_in_quarantine_an_unknown_device_is_dead_lettered_until_registered(quarantine,
                                                                           publisher, uid):
    now = int(time.time() * 1000)
    with city(quarantine, uid) as (client, tokens, service, store):
        publisher.send(str(contract.Topic(uid, "streetlight", "sl-known")), light(now, 1))
        publisher.send(stray_topic(uid), light(now, 1)).wait_for_publish(5)
        wait_until(lambda: read_dead_letter_counts(quarantine.data_dir).get(UNKNOWN_DEVICE) == 1,
                   5, 0.1, "an unknown_device dead letter")
        letter = service.dead_letters.latest(1, UNKNOWN_DEVICE)[0]
        assert letter.topic == stray_topic(uid) and orjson.loads(letter.payload)["seq"] == 1
        wait_until(lambda: "sl-known" in store.latest("streetlight", device_id="sl-known"),
                   5, 0.1, "the registered light's reading stored")
        assert store.latest("streetlight", device_id="sl-stray") == {}  # not stored
        row = wait_until(lambda: next(iter(listed(client, tokens["viewer"], "sl-stray")), None),
                         5, 0.1, "sl-stray listed")
        assert row["count"] == 1

        r = client.post(f"{URL}/sl-stray/register", json={"lat": 55.69, "lon": 12.55,
                                                          "rated_w": 55},
                        headers=auth(tokens["admin"]))
        assert r.status_code == 201, r.text
        wait_until(lambda: service.is_known("sl-stray"), 5, 0.05, "ingest knows sl-stray")
        publisher.send(stray_topic(uid), light(now + 1000, 2)).wait_for_publish(5)
        wait_until(lambda: "sl-stray" in store.latest("streetlight", device_id="sl-stray"),
                   5, 0.1, "its next reading stored")
        assert service.dead_letter_counts()[UNKNOWN_DEVICE] == 1
        assert listed(client, tokens["viewer"], "sl-stray") == []
