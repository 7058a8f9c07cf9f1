"""`citygrid backup create|restore DIR`: the state databases, copied consistently while the
services run, with the ledger's head hash recorded beside them.

Each database is copied with SQLite's online backup API (a consistent snapshot even while
the rule engine is settling bills: a settlement's debit and ledger entry are one
transaction, so a copy has both or neither), never with a file copy, which can tear a WAL
database. `MANIFEST.json` records, per file, its SHA-256, and the ledger's entry count and
head hash; `restore` checks those, puts the files in place and verifies the ledger again.

The ledger's anchor file (`ledger-head.json`, billing/anchor.py) is copied too — before the
databases, so the head it names is one the copied ledger already holds — and the backup's
ledger must contain that head (`ledger verify --head`): a ledger rewritten under its anchor
is refused, not backed up.
Telemetry history lives in InfluxDB: back it up with `influxd backup -portable` (README).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from billing import LedgerError, check_balances, entries_after, read_anchor

# registry (devices, credentials hashes, tokens), rule state (holds, timers, alerts),
# billing (meters, unbilled, accounts, ledger), ingest (spool, dead letters), maintenance
# (work orders and citizens' reports).
DATABASES = ("registry.sqlite", "rules.sqlite", "billing.sqlite", "ingest.sqlite",
             "maintenance.sqlite")
MANIFEST = "MANIFEST.json"
ANCHOR = "ledger-head.json"  # billing's anchor file (billing.anchor_path)


class BackupError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(source: Path, target: Path) -> None:
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # pages in one read transaction: a consistent snapshot
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        dst.close()
        src.close()


def ledger_check(data_dir: Path) -> dict[str, Any]:
    """The ledger in ``data_dir`` verifies and no account's balance disagrees with its newest
    entry (billing's own check, through its read API)."""
    try:
        entries, head = check_balances(data_dir)
    except LedgerError as e:
        raise BackupError(str(e)) from None
    return {"entries": entries, "head": head}


def anchor_check(directory: Path) -> dict[str, Any]:
    """The anchor file in ``directory`` names a head its ledger holds. Called after
    ``ledger_check`` walked the chain (its entries numbered 1…n, each hash checked): the
    anchored entry is the one numbered as the anchor counts, with the anchor's hash."""
    anchor = read_anchor(directory / ANCHOR)
    if anchor is None:
        raise BackupError(f"{directory / ANCHOR} is not a ledger anchor")
    at = entries_after(directory, anchor["entries"] - 1, limit=1)
    if not at or at[0][0] != anchor["entries"] or at[0][2] != anchor["head"]:
        raise BackupError(f"the ledger does not hold its anchored head (entry "
                          f"{anchor['entries']}, {anchor['head']}): cut short or rewritten "
                          "since it was anchored")
    return {"entries": anchor["entries"], "head": anchor["head"],
            "sha256": _sha256(directory / ANCHOR)}


def create(data_dir: str | Path, target: str | Path) -> dict[str, Any]:
    data, out = Path(data_dir), Path(target)
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: a backup goes into a new directory")
    present = [name for name in DATABASES if (data / name).exists()]
    if not present:
        raise BackupError(f"no state databases in {data}")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"created_ms": int(time.time() * 1000), "from": str(data),
                                "files": {}}
    # The anchor first: the ledger only grows, so the copy taken next holds its head.
    anchored = (data / ANCHOR).exists() and "billing.sqlite" in present
    if anchored:
        shutil.copyfile(data / ANCHOR, out / ANCHOR)
    for name in present:
        _copy(data / name, out / name)
    if "billing.sqlite" in present:
        manifest["ledger"] = ledger_check(out)
    if anchored:
        manifest["anchor"] = anchor_check(out)
    for name in present:
        manifest["files"][name] = {"sha256": _sha256(out / name),
                                   "bytes": (out / name).stat().st_size}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check(source: str | Path) -> dict[str, Any]:
    """A backup's files are the ones its manifest names, and its ledger verifies."""
    src = Path(source)
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BackupError(f"{src / MANIFEST}: {e}") from None
    for name, meta in manifest["files"].items():
        if name not in DATABASES:
            raise BackupError(f"{name}: not a CityGrid state database")
        if not (src / name).exists() or _sha256(src / name) != meta["sha256"]:
            raise BackupError(f"{name} is missing or differs from the manifest")
    if "ledger" in manifest:
        found = ledger_check(src)
        if found["head"] != manifest["ledger"]["head"]:
            raise BackupError(f"ledger head {found['head']} is not the recorded "
                              f"{manifest['ledger']['head']}")
    if "anchor" in manifest:
        if not (src / ANCHOR).exists() or _sha256(src / ANCHOR) != manifest["anchor"]["sha256"]:
            raise BackupError(f"{ANCHOR} is missing or differs from the manifest")
        anchor_check(src)
    return manifest


def restore(source: str | Path, data_dir: str | Path, *, force: bool = False
            ) -> dict[str, Any]:
    """Check the backup, put its databases in ``data_dir``, verify the ledger there."""
    src, data = Path(source), Path(data_dir)
    manifest = check(src)
    clash = [n for n in [*manifest["files"], ANCHOR] if (data / n).exists()]
    if clash and not force:
        raise BackupError(f"{data} already has {', '.join(clash)}: stop the services and "
                          "restore with --force to replace them")
    data.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]:
        for suffix in ("-wal", "-shm"):  # a stale WAL would be replayed over the restore
            (data / (name + suffix)).unlink(missing_ok=True)
        tmp = data / (name + ".restoring")
        shutil.copyfile(src / name, tmp)
        tmp.replace(data / name)
    if "anchor" in manifest:  # the anchor that goes with the restored ledger
        tmp = data / (ANCHOR + ".restoring")
        shutil.copyfile(src / ANCHOR, tmp)
        tmp.replace(data / ANCHOR)
    elif (data / ANCHOR).exists():  # newer than the backup: kept aside, never deleted
        (data / ANCHOR).replace(data / (ANCHOR + ".before-restore"))
    if "ledger" in manifest:
        found = ledger_check(data)
        if found["head"] != manifest["ledger"]["head"]:
            raise BackupError("the restored ledger's head differs from the backup's")
    return manifest
