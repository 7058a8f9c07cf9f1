"""Plain query functions over the services' public read APIs: the routes and the status page
both call these (the status page never calls another route).

The rule engine's state through ``rules`` (health, alerts), billing's through ``billing``
(accounts, settlements, ledger status), devices through the kernel's registry, telemetry
through the store, live readings through the feed; alert acknowledgements are the gateway's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import billing
import rules
from citygrid.registry import Registry
from citygrid.settings import Settings
from citygrid.store import StoreError, TelemetryStore
from citygrid.store.lifecycle import HOUR_MS
from gateway.acks import Acks
from gateway.feed import Feed
from gateway.models import DEVICE_KEYS, AccountOut, AlertOut, Device, LedgerStatus, RuleHealthOut

WINDOW_MS = 24 * HOUR_MS  # what the status page sums up


# ------------------------------------------------------------------ devices


def device(record: dict[str, Any], latest: dict[str, Any] | None) -> Device:
    """A registry record as the API shows it, with the newest reading."""
    return Device(**{k: record[k] for k in DEVICE_KEYS}, latest=latest)


def devices(registry: Registry, feed: Feed, *, kind: str | None = None,
            district: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
    """Registered devices by id, each with the feed's newest reading (plain dicts: 10,000 of
    them are encoded as they are, validating each again would cost most of the time)."""
    latest = feed.snapshot()
    records = registry.records(kind=kind, district=district, status=status)
    # The registry's fresh records trimmed to what the API shows, in place (for 10,000 of
    # them, building new dicts would take a third longer).
    extra = [k for k in records[0] if k not in DEVICE_KEYS] if records else []
    for r in records:
        for k in extra:
            del r[k]
        r["latest"] = latest.get(r["device_id"])
    return records


# ------------------------------------------------------------------ rules and alerts


def ruleset(settings: Settings) -> Any:
    return rules.load(settings.rules or rules.DEFAULT_RULES)


def rule_health(settings: Settings) -> list[RuleHealthOut]:
    """The running rules with their evaluations, firings and errors (zero before any)."""
    health = rules.read_health(settings.data_dir)
    out = []
    for r in ruleset(settings).rules:
        h = health.get(r.id)
        out.append(RuleHealthOut(id=r.id, description=r.rule.description,
                                 evaluations=h.evaluations if h else 0,
                                 fired=h.fired if h else 0,
                                 last_fired_ms=h.last_fired_ms if h else None,
                                 errors=h.errors if h else 0,
                                 last_error=h.last_error if h else None))
    return out


def explain(settings: Settings, registry: Registry, device_id: str) -> dict[str, Any]:
    """Why a light is at its level, from the state the rule engine saved (none yet: no
    wishes, the default level)."""
    from citygrid.city import city

    engine = rules.engine_from_state(ruleset(settings), registry.fleet(), city(settings.city),
                                     Path(settings.data_dir) / "rules.sqlite")
    return engine.explain(device_id)


def alerts(data_dir: str | Path, acks: Acks, *, active: bool | None = None,
           limit: int = 100) -> list[AlertOut]:
    """Alerts newest first (only active or cleared ones, if asked), with their
    acknowledgements; filtered and limited in SQL."""
    rows = rules.read_alerts(data_dir, active=active, limit=limit)
    acked = acks.acked() if rows else {}
    return [AlertOut(key=a.key, rule=a.rule_id, severity=a.severity, message=a.message,
                     scope=a.scope, since_ms=a.since_ms, active=a.active,
                     cleared_ms=a.cleared_ms, acknowledged_ms=acked.get(a.key))
            for a in rows]


def alert_exists(data_dir: str | Path, key: str) -> bool:
    return bool(rules.read_alerts(data_dir, key=key, limit=1))


# ------------------------------------------------------------------ billing


def accounts(data_dir: str | Path) -> list[AccountOut]:
    return [AccountOut(account_id=a.account_id, balance_minor=a.balance_minor,
                       low_balance_minor=a.low_balance_minor, currency=a.currency, low=a.low)
            for a in billing.accounts(data_dir)]


def settlements(data_dir: str | Path, *, meter: str | None = None, account: str | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
    """Ledger entries, newest first, each with its hash."""
    return billing.settlements(data_dir, meter=meter, account=account, limit=limit)


def ledger(data_dir: str | Path) -> LedgerStatus:
    """Whether the ledger's hash chain verifies, its size and head."""
    return LedgerStatus(**dataclasses.asdict(billing.ledger_status(data_dir)))


def invoices(data_dir: str | Path, *, account: str | None = None, kind: str | None = None,
             limit: int = 500, scope: str | None = None) -> list[billing.Invoice]:
    """Invoices and credit notes, newest first. ``scope``: the one account the caller may see
    (a customer's token); another account's are not there for it."""
    if scope is not None:
        if account not in (None, scope):
            return []
        account = scope
    return billing.list_invoices(data_dir, account=account, kind=kind, limit=limit)


def invoice(data_dir: str | Path, number: str, *, scope: str | None = None) -> billing.Invoice:
    """One invoice or credit note; raises billing.NoSuchInvoice — also for another account's
    when ``scope`` is given (it is not there for that caller)."""
    return billing.get_invoice(data_dir, number, account=scope)


# ------------------------------------------------------------------ the status page


def _hourly(buckets: list, start_ms: int, end_ms: int) -> dict[int, float]:
    return {b.start_ms: b.value for b in buckets
            if b.value is not None and start_ms - HOUR_MS < b.start_ms < end_ms}


def lighting(store: TelemetryStore, start_ms: int, end_ms: int) -> dict[str, Any]:
    """Lighting energy against the all-night-full baseline, per hour and in all: the rule
    engine's `citygrid_lighting` minutes (the same figures as the Grafana dashboards)."""
    fields = {}
    for name in ("energy_wh", "baseline_wh", "co2_avoided_g"):
        fields[name] = _hourly(store.aggregate("citygrid_lighting", name, "sum",
                                               start_ms=start_ms, end_ms=end_ms,
                                               every_ms=HOUR_MS), start_ms, end_ms)
    hours = sorted(set(fields["energy_wh"]) | set(fields["baseline_wh"]))
    used = sum(fields["energy_wh"].values()) / 1000
    baseline = sum(fields["baseline_wh"].values()) / 1000
    return {
        "hours_ms": hours,
        "actual_kwh": [round(fields["energy_wh"].get(h, 0) / 1000, 3) for h in hours],
        "baseline_kwh": [round(fields["baseline_wh"].get(h, 0) / 1000, 3) for h in hours],
        "actual_total_kwh": round(used, 3), "baseline_total_kwh": round(baseline, 3),
        "saved_kwh": round(max(0.0, baseline - used), 3),
        "saved_pct": round((baseline - used) / baseline * 100, 1) if baseline > 0 else None,
        "co2_avoided_kg": round(sum(fields["co2_avoided_g"].values()) / 1000, 3),
    }


def lighting_by_district(store: TelemetryStore, districts: list[str], start_ms: int,
                         end_ms: int) -> list[dict[str, Any]]:
    """Per district with lights: energy used and the all-night-full baseline over the window,
    and the share saved (None where the window holds no lighting minutes for it)."""
    out = []
    for district in sorted(districts):
        sums = {}
        for name in ("energy_wh", "baseline_wh"):
            buckets = store.aggregate("citygrid_lighting", name, "sum", start_ms=start_ms,
                                      end_ms=end_ms, every_ms=HOUR_MS, district=district)
            sums[name] = sum(_hourly(buckets, start_ms, end_ms).values()) / 1000
        used, baseline = sums["energy_wh"], sums["baseline_wh"]
        out.append({"district": district, "used_kwh": round(used, 3),
                    "baseline_kwh": round(baseline, 3),
                    "saved_pct": round((baseline - used) / baseline * 100, 1)
                    if baseline > 0 else None})
    return out


def consumption(store: TelemetryStore, meters: dict[str, int], start_ms: int, end_ms: int
                ) -> list[dict[str, Any]]:
    """kWh per district over the window: hourly mean meter power × meters in the district."""
    out = []
    for district, n in sorted(meters.items()):
        buckets = _hourly(store.aggregate("meter", "power_w", "mean", start_ms=start_ms,
                                          end_ms=end_ms, every_ms=HOUR_MS, district=district),
                          start_ms, end_ms)
        wh = sum(w * n * (min(end_ms, b + HOUR_MS) - max(start_ms, b)) / HOUR_MS
                 for b, w in buckets.items())
        out.append({"district": district, "meters": n, "kwh": round(wh / 1000, 3)})
    return out


def status_summary(settings: Settings, registry: Registry, store: TelemetryStore, feed: Feed,
                   acks: Acks) -> dict[str, Any]:
    """The status page's figures over the last 24 h of data (``store_error`` says why the
    energy figures are missing, if they are)."""
    from citygrid.city import city

    profile = city(settings.city)
    feed.start()
    end = feed.newest_ts() or int(time.time() * 1000)
    start = end - WINDOW_MS
    meters: dict[str, int] = {}
    lights = 0
    light_districts: list[str] = []
    for kind, district, n in registry.counts():
        if kind == "meter":
            meters[district] = n
        else:
            lights += n
            light_districts.append(district)
    out: dict[str, Any] = {
        "city": {"name": profile.name, "lat": profile.lat, "lon": profile.lon,
                 "timezone": profile.timezone},
        "window": {"start_ms": start, "end_ms": end},
        "devices": {"streetlights": lights, "meters": sum(meters.values())},
    }
    try:
        out["lighting"] = lighting(store, start, end)
        out["lighting_districts"] = lighting_by_district(store, light_districts, start, end)
        out["districts"] = consumption(store, meters, start, end)
        out["store_error"] = None
    except StoreError as e:
        out["lighting"], out["districts"], out["store_error"] = None, [], str(e)
        out["lighting_districts"] = []
    out["ledger"] = ledger(settings.data_dir).model_dump()
    out["alerts"] = [a.model_dump() for a in alerts(settings.data_dir, acks, active=True,
                                                    limit=20)]
    out["settlements"] = settlements(settings.data_dir, limit=10)
    return out
