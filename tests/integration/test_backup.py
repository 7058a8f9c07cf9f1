"""Backups of the state databases, taken while the rule engine settles bills."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from cityctl import backup
from citygrid.contract import Topic
from citygrid.fleet import Fleet, FleetDevice
from tests.helpers import REPO, Publisher, meter, wait_until

pytestmark = pytest.mark.integration


def test_backups_taken_while_settling_restore_to_a_ledger_that_verifies(
        mosquitto, uid, tmp_path):
    meters = [FleetDevice(f"m-{i}", "meter", uid, 55.66, 12.5, account_id=f"acc-{i % 5}",
                          tariff="business-flat", max_power_w=17250.0) for i in range(20)]
    Fleet(meters).dump(tmp_path / "fleet.geojson")
    data = tmp_path / "data"
    log = open(tmp_path / "rules.log", "wb")  # noqa: SIM115 - the child keeps it
    rules = subprocess.Popen(
        [sys.executable, "-m", "cityctl", "rules", "run", "--mqtt-url", mosquitto.url,
         "--data-dir", str(data), "--fleet", str(tmp_path / "fleet.geojson"),
         "--topic", f"city/v1/{uid}/+/+/telemetry", "--client-id", f"rules-{uid}"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: "rules running" in (tmp_path / "rules.log").read_text(), 30,
               message="the rule engine")
    # Every meter 10 kWh an hour (10 kW, under its 17.25 kW): each reading settles a bill.
    t0 = int(time.time() * 1000) - 400 * 3_600_000
    readings = [(str(Topic(uid, "meter", m.device_id)), meter(t0 + h * 3_600_000, h,
                                                              energy_kwh=1000.0 + 10 * h))
                for h in range(300) for m in meters]
    device = Publisher(mosquitto.url, f"meters-{uid}")
    # 1,000 a second: six seconds of settling, room for eight backups on a loaded machine.
    sender = threading.Thread(target=device.send_all, args=(readings, 1000.0))
    try:
        sender.start()
        def settled() -> int:
            if not (data / "billing.sqlite").exists():
                return 0
            with sqlite3.connect(data / "billing.sqlite") as db:
                try:
                    return db.execute("SELECT count(*) FROM ledger").fetchone()[0]
                except sqlite3.OperationalError:
                    return 0

        wait_until(settled, 20, message="the first settlement")
        taken = []
        while sender.is_alive() and len(taken) < 8:
            target = tmp_path / f"backup-{len(taken)}"
            manifest = backup.create(data, target)
            taken.append((target, manifest))
            time.sleep(0.3)
        sender.join()
    finally:
        device.close()
        rules.terminate()
        rules.wait(30)
    counts = [m["ledger"]["entries"] for _, m in taken]
    assert len(taken) == 8 and counts[-1] > counts[0] > 0, counts  # mid-stream, growing
    assert counts == sorted(counts)
    for n, (target, manifest) in enumerate(taken):
        assert set(manifest["files"]) >= {"billing.sqlite", "rules.sqlite"}
        restored = tmp_path / f"restored-{n}"
        again = backup.restore(target, restored)
        assert again["ledger"] == manifest["ledger"]
        found = backup.ledger_check(restored)  # verifies, balances match
        assert found == manifest["ledger"]
        with sqlite3.connect(restored / "billing.sqlite") as db:
            keys = [json.loads(e)["key"] for (e,) in db.execute("SELECT entry FROM ledger")]
        assert len(keys) == len(set(keys))


def test_a_damaged_backup_is_refused_and_restore_does_not_overwrite_by_accident(tmp_path):
    from billing import config as billing_config
    from billing.ledger import BillingStore
    from citygrid.city import COPENHAGEN

    data = tmp_path / "data"
    fleet = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.5, account_id="acc-1",
                               tariff="business-flat", max_power_w=17250.0)])
    store = BillingStore(data / "billing.sqlite", billing_config.load(None), fleet,
                         COPENHAGEN.tz)
    t = int(time.time() * 1000) - 10 * 3_600_000
    store.on_reading("m-1", t, 100.0)
    store.on_reading("m-1", t + 3_600_000, 112.0)
    store.settle("m-1", t + 3_600_000)
    store.close()
    manifest = backup.create(data, tmp_path / "b")
    assert manifest["ledger"]["entries"] == 1
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.create(data, tmp_path / "b")
    with pytest.raises(backup.BackupError, match="already has billing.sqlite"):
        backup.restore(tmp_path / "b", data)
    assert backup.restore(tmp_path / "b", data, force=True)["ledger"] == manifest["ledger"]
    # A tampered copy: the manifest's hash no longer matches.
    with sqlite3.connect(tmp_path / "b" / "billing.sqlite") as db:
        db.execute("UPDATE accounts SET balance_minor = balance_minor + 100000")
    with pytest.raises(backup.BackupError, match="differs from the manifest"):
        backup.restore(tmp_path / "b", tmp_path / "elsewhere")

    out = subprocess.run([sys.executable, "-m", "cityctl", "backup", "create",
                          str(tmp_path / "c"), "--data-dir", str(data)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "ledger ok: 1 entries, head" in out.stdout


def test_the_ledger_anchor_is_backed_up_with_the_ledger_that_holds_its_head(tmp_path):
    """The anchor file travels with the ledger; a ledger rewritten under its anchor is not
    backed up; restoring an older backup keeps a newer anchor aside, never deletes it."""
    from billing import config as billing_config
    from billing.anchor import Anchor
    from billing.ledger import BillingStore
    from citygrid.city import COPENHAGEN

    data = tmp_path / "data"
    fleet = Fleet([FleetDevice("m-1", "meter", "valby", 55.66, 12.5, account_id="acc-1",
                               tariff="business-flat", max_power_w=17250.0)])
    store = BillingStore(data / "billing.sqlite", billing_config.load(None), fleet,
                         COPENHAGEN.tz)
    published = []
    anchor = Anchor(store.head, data / "ledger-head.json", 2,
                    lambda topic, payload: published.append(payload))
    t = int(time.time() * 1000) - 10 * 3_600_000
    store.on_reading("m-1", t, 100.0)
    for h in range(1, 4):  # three settlements: anchored at the second
        store.on_reading("m-1", t + h * 3_600_000, 100.0 + 12 * h)
        store.settle("m-1", t + h * 3_600_000)
        anchor.check()
    assert len(published) == 1
    manifest = backup.create(data, tmp_path / "b")
    held = json.loads(published[0])
    assert manifest["ledger"]["entries"] == 3
    assert (manifest["anchor"]["entries"], manifest["anchor"]["head"]) == (2, held["head"])
    assert (tmp_path / "b" / "ledger-head.json").read_bytes() == \
        (data / "ledger-head.json").read_bytes()
    out = subprocess.run([sys.executable, "-m", "cityctl", "backup", "restore",
                          str(tmp_path / "b"), "--data-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"anchor ok: entry 2, head {held['head']}" in out.stdout
    assert json.loads((tmp_path / "r" / "ledger-head.json").read_text())["head"] == held["head"]

    # An edited anchor file in the backup: refused.
    (tmp_path / "b" / "ledger-head.json").write_text(
        json.dumps({**held, "head": "0" * 64}) + "\n")
    with pytest.raises(backup.BackupError, match="ledger-head.json is missing or differs"):
        backup.restore(tmp_path / "b", tmp_path / "r2")

    # The ledger cut short under its anchor: the anchored head is no longer in it, and the
    # backup says so.
    with sqlite3.connect(data / "billing.sqlite") as db:
        db.execute("DELETE FROM ledger WHERE seq >= 2")
        db.execute("UPDATE accounts SET balance_minor = (SELECT json_extract(entry, "
                   "'$.balance_after_minor') FROM ledger WHERE seq = 1)")  # consistent
    with pytest.raises(backup.BackupError, match="does not hold its anchored head"):
        backup.create(data, tmp_path / "c")

    # An older backup, taken before any anchor, restored over the data: the anchor kept aside.
    old = tmp_path / "old"
    old_data = tmp_path / "old-data"
    old_data.mkdir()
    backup._copy(tmp_path / "b" / "billing.sqlite", old_data / "billing.sqlite")
    backup.create(old_data, old)
    assert "anchor" not in json.loads((old / "MANIFEST.json").read_text())
    with pytest.raises(backup.BackupError, match="ledger-head.json"):
        backup.restore(old, tmp_path / "r")  # without --force: it has an anchor there
    backup.restore(old, tmp_path / "r", force=True)
    assert not (tmp_path / "r" / "ledger-head.json").exists()
    assert (tmp_path / "r" / "ledger-head.json.before-restore").exists()
