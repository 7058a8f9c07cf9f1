"""Ledger anchoring (billing/anchor.py): when an anchor is due, what it carries, and that
workers sharing one ledger anchor the ledger's head once per crossing, never their own view."""

from __future__ import annotations

import json
import os
from datetime import datetime

import pytest

from billing import HEAD_TOPIC, Anchor, read_anchor
from billing import config as billing_config
from billing.ledger import BillingStore, verify
from citygrid.city import COPENHAGEN
from citygrid.contract import ContractError, Topic
from citygrid.fleet import Fleet, FleetDevice
from rules import PUBLISH_FILTERS, SERVICE_FILTERS
from rules.acl import can_match, publishable

TZ = COPENHAGEN.tz
T = int(datetime(2026, 11, 26, 8, 0, tzinfo=TZ).timestamp() * 1000)
FLEET = Fleet([FleetDevice(f"m-{i}", "meter", "valby", 55.66, 12.50, account_id=f"acc-{i}",
                           tariff="business-flat", max_power_w=17250.0) for i in (1, 2)])


class Clock:
    def __init__(self, ms: int = 1_000):
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.ms / 1000


class Ledger:
    """A ledger head to anchor, moved by hand."""

    def __init__(self):
        self.entries, self.hash = 0, None

    def append(self, n: int = 1) -> None:
        self.entries += n
        self.hash = f"{self.entries:064x}"

    def __call__(self):
        return self.entries, self.hash


def anchor(tmp_path, ledger, every=3, clock=None):
    sent: list[tuple[str, bytes]] = []
    a = Anchor(ledger, tmp_path / "ledger-head.json", every,
               lambda topic, payload: sent.append((topic, payload)), clock=clock or Clock())
    return a, sent


def test_an_anchor_every_n_entries_carries_the_head_in_the_file_and_the_message(tmp_path):
    ledger = Ledger()
    a, sent = anchor(tmp_path, ledger, every=3, clock=Clock(1_234))
    assert a.check() is None and not sent  # an empty ledger has nothing to anchor
    done = []
    for _ in range(7):
        ledger.append()
        if a.check() is not None:
            done.append(ledger.entries)
    assert done == [3, 6]
    expected = {"head": f"{6:064x}", "entries": 6, "ts": 1_234, "ledger": "citygrid"}
    assert read_anchor(tmp_path / "ledger-head.json") == expected
    assert [t for t, _ in sent] == [HEAD_TOPIC, HEAD_TOPIC]
    assert json.loads(sent[-1][1]) == expected
    assert json.loads((tmp_path / "ledger-head.json").read_text()) == expected
    # Written atomically: no temporary file left beside it.
    assert sorted(os.listdir(tmp_path)) == [".ledger-head.json.lock", "ledger-head.json"]


def test_a_jump_over_a_multiple_anchors_once_with_the_head_as_it_is(tmp_path):
    ledger = Ledger()
    a, sent = anchor(tmp_path, ledger, every=3)
    ledger.append(2)
    assert a.check() is None
    ledger.append(5)  # 7 entries: past 3 and 6 at once
    assert a.check()["entries"] == 7
    assert a.check() is None  # nothing new
    ledger.append(1)  # 8: the next one is due at 9
    assert a.check() is None and len(sent) == 1


def test_at_start_an_anchor_is_due_only_if_the_ledger_changed_since_the_last(tmp_path):
    ledger = Ledger()
    a, sent = anchor(tmp_path, ledger, every=100)
    assert a.check(start=True) is None  # empty
    ledger.append(4)
    assert a.check() is None  # not yet 100 …
    assert a.check(start=True)["entries"] == 4  # … but at start what is there is anchored
    assert a.check(start=True) is None and len(sent) == 1  # unchanged since: no new anchor
    ledger.append(1)
    assert a.check(start=True)["entries"] == 5
    # A file that is no anchor (torn by hand, say) counts as none.
    (tmp_path / "ledger-head.json").write_text("{not json")
    assert read_anchor(tmp_path / "ledger-head.json") is None
    assert a.check(start=True)["entries"] == 5


def test_anchor_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        anchor(tmp_path, Ledger(), every=0)


def settle_one(store: BillingStore, meter: str, hour: int) -> None:
    """One settlement: an hour's 2 kWh on ``meter``, settled."""
    if hour == 0:
        store.on_reading(meter, T, 100.0)
    store.on_reading(meter, T + (hour + 1) * 3_600_000, 100.0 + 2 * (hour + 1))
    [_] = store.settle(meter, T + (hour + 1) * 3_600_000)


def test_workers_sharing_a_ledger_anchor_its_head_once_per_crossing(tmp_path):
    """Two stores on one billing.sqlite (two rule workers), each anchoring after its own
    settlements: every anchor is the shared ledger's head, each crossing anchored once."""
    db = tmp_path / "billing.sqlite"
    stores = [BillingStore(db, billing_config.load(), FLEET, TZ) for _ in range(2)]
    sent: list[tuple[str, bytes]] = []
    anchors = [Anchor(s.head, tmp_path / "ledger-head.json", 3,
                      lambda t, p: sent.append((t, p)), clock=Clock()) for s in stores]
    try:
        for hour in range(5):  # worker 0 settles m-1, worker 1 m-2, turn about: 10 entries
            for i, (store, a) in enumerate(zip(stores, anchors, strict=True)):
                settle_one(store, f"m-{i + 1}", hour)
                a.check()
        entries = stores[0].entries()
    finally:
        for s in stores:
            s.close()
    published = [json.loads(p) for _, p in sent]
    assert [p["entries"] for p in published] == [3, 6, 9]
    hashes = {seq: h for seq, _, h in entries}
    assert all(p["head"] == hashes[p["entries"]] for p in published)
    assert read_anchor(tmp_path / "ledger-head.json") == published[-1]
    # An earlier anchor still verifies against the later ledger.
    assert verify(db, published[0]["head"]) == (10, hashes[10])


def test_the_head_topic_is_no_device_topic_and_the_rules_service_may_publish_it():
    with pytest.raises(ContractError):
        Topic.parse(HEAD_TOPIC)
    assert not any(can_match(HEAD_TOPIC, f) for f in ("city/v1/+/+/+/telemetry",
                                                      "city/v1/+/+/+/ack",
                                                      "city/v1/+/+/+/override"))
    assert HEAD_TOPIC in SERVICE_FILTERS
    # … but no rule's `publish` action may: a rule cannot forge an anchor.
    assert not publishable(HEAD_TOPIC, PUBLISH_FILTERS)
