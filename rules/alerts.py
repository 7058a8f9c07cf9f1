"""Alerts: raised and cleared by rules, by the billing store's events (meter resets, spikes,
held readings, low balances) and by commands no light acknowledged; kept with what changed
since the engine's last snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from citygrid.fleet import FleetDevice

if TYPE_CHECKING:
    from billing import Settlement
    from rules.engine import Outbox

ACK_RULE = "missing-ack"


@dataclass
class AlertState:
    key: str  # "rule-id@device" or "rule-id@district"
    rule_id: str
    severity: str
    message: str
    scope: str
    since_ms: int
    sources: set[str] = field(default_factory=set)
    active: bool = True
    cleared_ms: int | None = None


class Alerts:
    """Every alert by key, active and cleared; each change told to the outbox once."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.by_key: dict[str, AlertState] = {}
        self.dirty: set[str] = set()  # keys changed since the engine's last snapshot

    def join(self, key: str, source: str) -> bool:
        """One more source keeps an active alert up; False if the alert is not active."""
        alert = self.by_key.get(key)
        if alert is None or not alert.active:
            return False
        alert.sources.add(source)
        self.dirty.add(key)
        return True

    def raise_(self, key: str, rule_id: str, severity: str, message: str, scope: str,
               now_ms: int, source: str | None = None) -> None:
        """Raise the alert unless it is active already (its source: ``scope`` if not given)."""
        alert = self.by_key.get(key)
        if alert is not None and alert.active:
            return
        alert = self.by_key[key] = AlertState(key, rule_id, severity, message, scope, now_ms,
                                              {scope if source is None else source})
        self.dirty.add(key)
        self.outbox.alert(alert, True)

    def restate(self, key: str, message: str) -> None:
        """An active alert's message changed (what an overdue account still owes): told again
        with the new one; nothing if it is not active or says that already."""
        alert = self.by_key.get(key)
        if alert is None or not alert.active or alert.message == message:
            return
        alert.message = message
        self.dirty.add(key)
        self.outbox.alert(alert, True)

    def clear(self, key: str, source: str | None, now_ms: int) -> None:
        """``source`` no longer holds the alert up; it clears when no source does (at once
        if ``source`` is None)."""
        alert = self.by_key.get(key)
        if alert is None or not alert.active:
            return
        if source is not None:
            alert.sources.discard(source)
            if alert.sources:
                self.dirty.add(key)
                return
        alert.active, alert.cleared_ms = False, now_ms
        self.dirty.add(key)
        self.outbox.alert(alert, False)

    def clear_rule(self, rule_id: str, now_ms: int) -> None:
        for key in [k for k, a in self.by_key.items() if a.rule_id == rule_id]:
            self.clear(key, None, now_ms)

    def active_count(self) -> int:
        return sum(1 for a in self.by_key.values() if a.active)

    # ------------------------------------------------------------------ acknowledgements

    def missing_ack(self, device_id: str, cmd_id: str, now_ms: int) -> None:
        self.raise_(f"{ACK_RULE}@{device_id}", ACK_RULE, "minor",
                    f"No acknowledgement from {device_id} for command {cmd_id}", device_id,
                    now_ms)

    def acknowledged(self, device_id: str, now_ms: int) -> None:
        self.clear(f"{ACK_RULE}@{device_id}", None, now_ms)

    # ------------------------------------------------------------------ billing

    def billing(self, kind: str, device: FleetDevice, detail: str, now_ms: int) -> None:
        """An event of a meter's accounting; a spike that was dropped clears its alert."""
        key = f"billing-{kind}@{device.device_id}"
        if kind.endswith("spike_dropped"):  # spike_dropped, export-spike_dropped
            self.clear(f"billing-{kind.removesuffix('_dropped')}@{device.device_id}", None,
                       now_ms)
            return
        severity = "major" if kind.removeprefix("export-") in ("spike", "held") else "minor"
        self.raise_(key, f"billing-{kind}", severity, f"Meter {device.device_id}: {detail}",
                    device.device_id, now_ms)

    def settled(self, s: Settlement, now_ms: int) -> None:
        """After a settlement: the account's low-balance alert raised, or cleared."""
        account = s.entry["account"]
        key = f"low-balance@{account}"
        if s.low_balance:
            self.raise_(key, "low-balance", "major",
                        f"Account {account} balance {s.entry['balance_after_minor'] / 100:.2f} "
                        f"{s.entry['currency']} is low", account, now_ms)
        else:
            self.clear(key, None, now_ms)
