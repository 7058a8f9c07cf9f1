"""Ledger anchoring: the ledger's head, published every N entries, so an outside party holds it.

Whoever appends entries (the rule runner, after settlements) calls ``Anchor.check``: once the
ledger has grown past another multiple of ``every`` entries since the last anchor, its head —
read from the ledger itself, never from one worker's own count — is written to
``ledger-head.json`` (atomically) and published, retained, on ``HEAD_TOPIC``
(docs/ledger-anchoring.md). Anyone holding an anchor checks it later with
``citygrid ledger verify --head <hash>``: it passes while the ledger still contains that entry
and its chain is intact.

Several rule workers share one ledger: a file lock makes "read the head, compare with the
last anchor, write, publish" one step, so two workers never anchor the same crossing twice and
an anchor never goes back to an older head.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from citygrid.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("citygrid.billing")
# A platform topic: five levels, so never a device topic (city/v1/{district}/{kind}/{id}/{ch}).
HEAD_TOPIC = "city/v1/_platform/ledger/head"
FILENAME = "ledger-head.json"
LEDGER = "citygrid"  # the payload's "ledger": which ledger the head is of

# (entries, head hash or None when empty), read from the ledger
LedgerHead = Callable[[], tuple[int, str | None]]
Publish = Callable[[str, bytes], None]  # (topic, payload): retained, QoS 1


def path(data_dir: str | Path) -> Path:
    """Where the anchor file lives under a data dir."""
    return Path(data_dir) / FILENAME


def read(path: str | Path) -> dict[str, Any] | None:
    """The last anchor written to ``path``, or None (none yet, or not an anchor file)."""
    try:
        anchor = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(anchor, dict) and isinstance(anchor.get("head"), str)
            and isinstance(anchor.get("entries"), int)):
        return None
    return anchor


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Anchor:
    """Anchors the ledger ``head`` reports every ``every`` entries: to ``path`` and through
    ``publish`` on ``topic``; ``clock`` stamps the anchor."""

    def __init__(self, head: LedgerHead, path: str | Path, every: int, publish: Publish, *,
                 topic: str = HEAD_TOPIC, clock: Clock = SYSTEM_CLOCK):
        if every < 1:
            raise ValueError(f"anchor every {every} entries: must be at least 1")
        self.head, self.path, self.every = head, Path(path), every
        self.publish, self.topic, self.clock = publish, topic, clock

    def check(self, *, start: bool = False) -> dict[str, Any] | None:
        """Anchor if due; the anchor written, or None. Due: the ledger has crossed another
        multiple of ``every`` since the last anchor; at ``start``, also whenever its head is
        not the last anchor's (entries settled since, or a ledger rebuilt)."""
        if self.head()[1] is None:
            return None  # nothing to anchor (and no lock file in a data dir with no ledger)
        with _locked(self.path):
            entries, head = self.head()
            if head is None:  # emptied meanwhile
                return None
            last = read(self.path)
            done = last["entries"] if last else 0
            changed = last is None or last["head"] != head
            if not (entries // self.every > done // self.every or (start and changed)):
                return None
            anchor = {"head": head, "entries": entries, "ts": self.clock.now_ms(),
                      "ledger": LEDGER}
            payload = json.dumps(anchor, sort_keys=True, separators=(",", ":")).encode()
            _write_atomically(self.path, payload + b"\n")
            # Inside the lock: another worker's later anchor cannot reach the broker first.
            self.publish(self.topic, payload)
        log.info("ledger anchored: %d entries, head %s", entries, head)
        return anchor
