"""`citygrid rules run`: the engine live on MQTT, with state, reloads and health.

One engine thread drives the MQTT connection (``citygrid.wire``, its ``loop()``) and the rules
together: the PUBLISHes of one socket read are decoded and handed to the engine as one batch,
acknowledged in one write once the engine has taken them, and the commands they caused go out
in that same write. The engine needs no locks and a reading meets no queue or thread switch on
its way to a command. Event time comes from the readings; while none arrive the watermark
follows the wall clock.

A partitioned worker (``rules run --workers N``, rules/cli.py) owns some districts
(``RunnerConfig.districts``): it subscribes to their topics and to the telemetry of the foreign
border devices whose readings reach its lights, follows the registry for both, and writes into
the shared state files only what it owns (rules/state.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from billing import (
    Anchor,
    BillingStore,
    anchor_path,
    issue_due,
    load_config,
    overdue_invoices,
    payment_dispatcher,
)
from citygrid import lamps, wire
from citygrid.city import CityProfile
from citygrid.clock import SYSTEM_CLOCK, Clock
from citygrid.contract import ContractError, Topic, decode_readings, topic_filter
from citygrid.fleet import Fleet, FleetDevice
from citygrid.maintenance import WorkOrders
from citygrid.partition import Partition
from citygrid.registry import Follower, Registry
from citygrid.settings import Settings
from citygrid.store import Point, StoreError, TelemetryStore
from rules import loader
from rules.alertmanager import AlertmanagerNotifier
from rules.alerts import AlertState
from rules.engine import RuleEngine
from rules.lampmon import CABINET
from rules.ledgerfeed import LedgerFeed
from rules.report import RULES_MEASUREMENT
from rules.state import RuleStateStore
from rules.workorders import AlertOrders

log = logging.getLogger("citygrid.rules")
IDLE_S = 5.0  # no reading for this long: the watermark follows the wall clock
OVERDUE = "billing-overdue"  # an account's invoice past its due date, unpaid
INVOICES_EVERY_S = 60.0  # how often the monthly invoices due are looked for (a month ends once)
INVOICES_PER_LOOK = 100  # issued per look at most (~1.5 ms each); more due: look again in 1 s
SESSION_EXPIRY_S = wire.SESSION_EXPIRY_S  # rules/cli.py and the tests name it here
ROUTE_CACHE_MAX = 200_000  # topics remembered (parsed once); a city of 100,000 devices fits
# Makes the MQTT client; called as ``citygrid.wire.Client`` is (the default).
MqttClientFactory = Callable[..., wire.Client]
Reading = tuple[str, dict[str, Any], int]  # (device id, fields, ts): what the engine takes


def partition(districts: Iterable[str], workers: int) -> list[tuple[str, ...]]:
    """The districts each of ``workers`` owns: worker i every ``workers``-th of the sorted
    names from the i-th. The same districts always give the same assignment, and each worker
    gets as many districts as the next, give or take one."""
    names = sorted(set(districts))
    return [tuple(names[i::workers]) for i in range(workers)]


def share_filters(districts: Iterable[str], group: str | None = None,
                  foreign: Iterable[FleetDevice] = ()) -> list[tuple[str, int]]:
    """What a worker owning ``districts`` subscribes to: their telemetry, the telemetry of the
    ``foreign`` devices whose readings reach its lights, its lights' acks and overrides."""
    share = (lambda t: f"$share/{group}/{t}") if group else (lambda t: t)
    owned = sorted(districts)
    subs = [(share(topic_filter(district=d)), 1) for d in owned]
    subs += [(share(str(Topic(d.district, d.kind, d.device_id))), 1)
             for d in sorted(foreign, key=lambda d: d.device_id)]
    for d in owned:
        subs += [(topic_filter("ack", d, "streetlight"), 1),
                 (topic_filter("override", d, "streetlight"), 1)]
    return subs


class MqttOutbox:
    def __init__(self, client: wire.Client, store: TelemetryStore | None,
                 worker: str | None = None):
        self.client = client  # the runner swaps it when its subscriptions change
        self.store = store
        # A worker's own figures (citygrid_rules: its share's lights, commands, health) carry
        # its name: N workers' points of one minute would overwrite each other's otherwise.
        self.worker = worker
        self.commands = 0
        self.notifier: AlertmanagerNotifier | None = None  # CITYGRID_ALERTMANAGER_URL
        self.on_alert: Callable[[AlertState], object] | None = None  # work orders
        # Storage never blocks the rule loop: a writer thread takes the points.
        self._points: queue.Queue = queue.Queue(maxsize=1000)
        if store is not None:
            threading.Thread(target=self._write_points, name="rules-points", daemon=True).start()

    def command(self, device: FleetDevice, payload: dict[str, Any], expiry_s: float) -> None:
        topic = str(Topic(device.district, "streetlight", device.device_id, "cmd"))
        # QoS 1 with a message expiry (MQTT 5; over 3.1.1 the client leaves it out): a light
        # that comes back after the expiry does not act on a stale level.
        self.client.publish(topic, orjson.dumps(payload), qos=1,
                            expiry_s=max(1, int(expiry_s)))
        self.commands += 1

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def alert(self, alert: AlertState, raised: bool) -> None:
        if raised:
            log.warning("ALERT %s [%s] %s", alert.key, alert.severity, alert.message)
        else:
            log.info("alert cleared %s", alert.key)
        if self.notifier is not None:
            self.notifier.update(alert, raised)
        if raised and self.on_alert is not None:
            try:
                self.on_alert(alert)
            except Exception:  # a work order not opened never stops the rules
                log.exception("no work order for alert %s", alert.key)

    def points(self, points: list[Point]) -> None:
        if self.store is None:
            return
        if self.worker is not None:
            points = [p._replace(tags={**p.tags, "worker": self.worker}, key=None)
                      if p.measurement == RULES_MEASUREMENT else p for p in points]
        try:
            self._points.put_nowait(points)
        except queue.Full:
            log.warning("dropping %d lighting points: the store is not keeping up", len(points))

    def _write_points(self) -> None:
        while True:
            points = self._points.get()
            try:
                self.store.write(points)
            except StoreError as e:
                log.warning("could not write %d %s points: %s", len(points),
                            points[0].measurement if points else "", e)


@dataclass
class RunnerConfig:
    rules_path: Path
    topic: str = topic_filter()
    group: str | None = None
    client_id: str = "citygrid-rules"
    save_every_s: float = 0.2
    reload_every_s: float = 1.0
    # A partitioned worker: the districts it owns (None: all of them, the one engine), and
    # its name among the workers (its health rows in the shared state).
    districts: frozenset[str] | None = None
    worker: str | None = None
    # ``--partition i/N`` (citygrid/partition.py): the districts are those of the registry
    # that fall in the partition, now and as districts are added.
    partition: Partition | None = None


class RuleRunner:
    """``make_client`` makes its MQTT client, called as ``citygrid.wire.Client`` (the
    default); ``clock`` is its wall clock and monotonic clock (default: the system's)."""

    def __init__(self, settings: Settings, fleet: Fleet, city: CityProfile,
                 store: TelemetryStore | None, config: RunnerConfig, *,
                 make_client: MqttClientFactory | None = None, clock: Clock = SYSTEM_CLOCK,
                 inventory: Registry | None = None):
        self.settings, self.fleet, self.config = settings, fleet, config
        self.owned = config.districts
        # The one worker of several that looks after what is the whole city's, not a
        # district's (overdue invoices): the first, or the only one.
        self.leads = (config.worker in (None, "w0") and
                      (config.partition is None or config.partition.index == 0))
        self._districts = {d.district for d in fleet}
        if config.partition is not None:
            self.owned = frozenset(d for d in self._districts if config.partition.owns(d))
        # Set when the registry's districts change this partition's share: the engine is to
        # be started again with it (rules/cli.py does).
        self.repartition = threading.Event()
        # The registry, when the fleet comes from it: re-read whenever it changes.
        self.inventory = inventory
        self._follower = Follower(settings.data_dir, inventory) if inventory else None
        if self._follower is not None:
            self._follower.changed()  # the version `fleet` was read at
        self.clock = clock
        self._make_client = make_client or wire.Client
        self.ruleset = loader.load(config.rules_path)
        self._mtimes = self._rule_mtimes()
        self.state = RuleStateStore(Path(settings.data_dir) / "rules.sqlite",
                                    worker=config.worker,
                                    foreign=None if self.owned is None else self.foreign)
        self.billing = BillingStore(Path(settings.data_dir) / "billing.sqlite",
                                    load_config(settings.billing), fleet, city.tz)
        # Accounts with a payment agent are asked to pay (docs/payments.md); None without.
        self.payments = payment_dispatcher(self.billing.path, self.billing.config,
                                           settings.payment_callback, worker=config.worker)
        self.outbox = MqttOutbox(None, store,  # type: ignore[arg-type]  # the client: below
                                 None if self.owned is None else config.worker)
        # The ledger's head, anchored every N entries (billing/anchor.py): whoever appends
        # checks, and what it anchors is the shared ledger's head, whichever worker wrote it.
        self.anchor = Anchor(self.billing.head, anchor_path(settings.data_dir),
                             settings.ledger_anchor_every,
                             lambda topic, payload: self.outbox.publish(topic, payload, 1, True),
                             clock=clock)
        self._appended = 0
        partitioned = {} if self.owned is None else {"owned_districts": frozenset(self.owned)}
        self.engine = RuleEngine(self.ruleset, fleet, city, self.outbox, billing=self.billing,
                                 lamp_types=lamps.load(settings.lamp_types), **partitioned)
        self._routes: dict[str, tuple[str, str, str] | None] = {}
        # One connection for readings in and commands out, over the settings' protocol (MQTT
        # 5: commands carry their expiry). A persistent session: what arrives while it is
        # down (a broker restart, a keepalive lost under load, the engine restarting) waits
        # at the broker instead of being dropped with a clean session.
        self._subscriptions = self.subscriptions()
        self._session_key = f"mqtt_subscriptions:{config.client_id}"
        self.client = self._new_client()
        # Where every device stands, for maps (the Streetlights dashboard joins on device_id).
        now = clock.now_ms()
        self.outbox.points([Point("citygrid_devices", {
            "device_id": d.device_id, "district": d.district, "kind": d.kind},
            {"lat": d.lat, "lon": d.lon}, now) for d in self._mine(fleet)])
        self.state.restore(self.engine)
        self._orders_key = f"workorders_done_seq:{config.worker or ''}"
        seen = self.state.meta(self._orders_key)
        self.workorders = AlertOrders(WorkOrders(settings.data_dir), lambda: self.fleet,
                                      self.outbox.points, owned=self.owned,
                                      done_seq=int(seen) if seen else None)
        if not seen:  # from now on, and from here after a restart
            self.state.set_meta(self._orders_key, str(self.workorders.done_seq))
        self.outbox.on_alert = self.workorders.alert
        # The ledger's entries as citygrid_ledger points (rules/ledgerfeed.py), from the first
        # entry on a first start: each worker writes them; the same point twice is one point.
        self._ledger_key = f"ledger_feed_seq:{config.worker or ''}"
        self.ledger_feed = LedgerFeed(settings.data_dir, self.outbox.points,
                                      int(self.state.meta(self._ledger_key) or 0))
        if settings.alertmanager_url:
            self.outbox.notifier = AlertmanagerNotifier(
                settings.alertmanager_url, self.alert_labels, self.alert_link)
            for alert in self.engine.alerting.by_key.values():
                if alert.active:  # restored: Alertmanager hears of them again at once
                    self.outbox.notifier.update(alert, True)
        self.stopping = threading.Event()
        self.last_reload_error: str | None = None
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ alerts

    def alert_labels(self, alert: AlertState) -> dict[str, str]:
        """Alertmanager's labels for an alert's scope: a device (its id, district and
        cabinet), a district, a control cabinet (with its lights' district) or an account."""
        device = self.fleet.by_id.get(alert.scope)
        if device is not None:
            labels = {"device_id": device.device_id, "district": device.district}
            if device.cabinet:
                labels["cabinet"] = device.cabinet
            return labels
        if alert.rule_id == CABINET:
            district = next((d.district for d in self.fleet if d.cabinet == alert.scope), None)
            return {"cabinet": alert.scope, **({"district": district} if district else {})}
        if alert.scope in self._districts:
            return {"district": alert.scope}
        return {"account": alert.scope}

    def alert_link(self, alert: AlertState) -> str:
        """The status page, on the alert's light or meter (CITYGRID_STATUS_URL)."""
        base = self.settings.status_url.rstrip("/")
        if not base:
            return ""
        if alert.scope in self.fleet.by_id:
            return f"{base}/#device={quote(alert.scope)}"
        return f"{base}/"

    # ------------------------------------------------------------------ the partition

    def foreign(self, name: str) -> bool:
        """Is ``name`` (a device id or a district) another worker's?"""
        if self.owned is None:
            return False
        device = self.fleet.by_id.get(name)
        if device is not None:
            return device.district not in self.owned
        return name in self._districts and name not in self.owned

    def _mine(self, devices: Iterable[FleetDevice]) -> list[FleetDevice]:
        owned = self.owned
        return [d for d in devices if owned is None or d.district in owned]

    def foreign_devices(self) -> list[str]:
        """The other workers' devices whose readings this one must see too (border devices
        whose motion reaches its lights), as the engine says."""
        if self.owned is None:
            return []
        return sorted(self.engine.foreign_inputs())

    def subscriptions(self) -> list[tuple[str, int]]:
        """The filters this runner subscribes to, at QoS 1."""
        group = self.config.group
        if self.owned is None:
            telemetry = f"$share/{group}/{self.config.topic}" if group else self.config.topic
            return [(telemetry, 1), (topic_filter("ack", kind="streetlight"), 1),
                    (topic_filter("override", kind="streetlight"), 1)]
        foreign = [d for i in self.foreign_devices()
                   if (d := self.fleet.by_id.get(i)) is not None and d.district not in self.owned]
        return share_filters(self.owned, group, foreign)

    # ------------------------------------------------------------------ MQTT

    def _new_client(self) -> wire.Client:
        client = self._make_client(
            self.settings.mqtt, self.config.client_id, clean_start=False,
            session_expiry_s=SESSION_EXPIRY_S, subscriptions=self._subscriptions,
            on_messages=self._on_messages, on_connect=self._on_connect,
            reconnect_min_s=0.25, reconnect_max_s=2.0)
        self.outbox.client = client
        return client

    @property
    def subscribed(self) -> threading.Event:
        """Set once the broker has granted the subscriptions of the current connection."""
        return self.client.subscribed

    def _on_connect(self, session_present: bool) -> None:
        """On the engine thread. The session may still hold filters an earlier run (another
        partition) subscribed to: they go, so no worker receives what it no longer owns."""
        self.engine.mqtt_node = getattr(self.client, "node", "")
        self.engine.mqtt_failovers = getattr(self.client, "stats", {}).get("failovers", 0)
        if self.engine.mqtt_node:
            self.state.set_meta(f"mqtt_node:{self.config.client_id}", self.engine.mqtt_node)
        current = [t for t, _ in self._subscriptions]
        try:
            before = orjson.loads(self.state.meta(self._session_key) or "[]")
        except orjson.JSONDecodeError:
            before = []
        stale = sorted(set(before) - set(current))
        if stale:
            self.client.unsubscribe(stale)
            log.info("unsubscribed from %d filters this engine no longer needs", len(stale))
        if stale or before != current:
            self.state.set_meta(self._session_key, orjson.dumps(current).decode())

    def _resubscribe(self) -> None:
        """The filters changed (a border device added or moved): a new connection to the same
        session subscribes to the new ones, drops the old ones; nothing published meanwhile
        is lost (it waits in the session)."""
        subs = self.subscriptions()
        if subs == self._subscriptions:
            return
        self._drain(2.0)
        self.client.stop()
        self._subscriptions = subs
        self.client = self._new_client()
        log.info("subscriptions changed: %d filters", len(subs))

    def _drain(self, timeout_s: float) -> None:
        """Run the loop until the broker has acknowledged every command sent (this thread is
        the one that reads its PUBACKs)."""
        deadline = time.monotonic() + timeout_s  # real time, whatever the runner's clock
        while (self.client.inflight and self.client.connected.is_set()
               and time.monotonic() < deadline):
            self.client.loop(0.05)

    def _on_messages(self, messages: list[wire.Message]) -> None:
        """Every PUBLISH of one socket read (on the engine thread): to the engine as one
        batch, then acknowledged in one write, the commands they caused with it."""
        self._take(messages)
        mids = [m.mid for m in messages if m.qos]
        if mids:
            self.client.ack(mids, messages[0].epoch)

    def handle(self, topic: str, payload: bytes) -> None:
        """One message, as if it had arrived alone (no acknowledgement)."""
        self._take([wire.Message(topic, payload, 0, 0, False, 0)])

    def _route(self, topic: str) -> tuple[str, str, str] | None:
        try:
            t = Topic.parse(topic)
            route = (t.kind, t.device_id, t.channel)
        except ContractError:
            route = None
        if len(self._routes) >= ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _take(self, messages: list[wire.Message]) -> None:
        now_ms = self.clock.now_ms()
        routes = self._routes
        batch: list[Reading] = []
        telemetry = False
        for m in messages:
            topic = m.topic
            route = routes[topic] if topic in routes else self._route(topic)
            if route is None:
                continue
            kind, device_id, channel = route
            if channel == "telemetry":
                telemetry = True
                try:
                    readings = decode_readings(kind, m.payload, topic, now_ms=now_ms)
                except ContractError:
                    continue  # ingest dead-letters it; the rules only act on valid readings
                batch += [(device_id, r.fields(), r.ts) for r in readings]
                continue
            if batch:  # what came before an ack or an override is taken first: in order
                self._readings(batch)
                batch = []
            if channel == "override":
                self._override(device_id, m.payload)
            elif channel == "ack":
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    self.engine.on_ack(device_id, orjson.loads(m.payload))
        if batch:
            self._readings(batch)
        if telemetry:
            self._last_reading = (self.clock.monotonic(), self.engine.watermark)
        self._anchor_if_appended()

    def _anchor_if_appended(self) -> None:
        """Settled since the last look (a reading, or a timer): is an anchor due?"""
        if self.billing.appended != self._appended:
            self._appended = self.billing.appended
            self._anchor()

    def _anchor(self, start: bool = False) -> None:
        try:
            self.anchor.check(start=start)
        except Exception:  # an anchor not written never stops the rules; the next one comes
            log.exception("could not anchor the ledger's head")

    def _issue_invoices(self) -> bool:
        """The monthly invoices whose month has ended, in event time (billing/invoices.py;
        idempotent, and serialised with the other workers by the ledger's transaction); at
        most INVOICES_PER_LOOK at a time, so a month's end never holds the rules up long.
        Returns whether more may be due."""
        now = self.engine.watermark if self.engine.watermark is not None else \
            self.clock.now_ms()
        try:
            done = issue_due(self.billing.db, self.billing.config, self.billing.tz, now,
                             limit=INVOICES_PER_LOOK)
        except Exception:  # an invoice not issued never stops the rules; the next look comes
            log.exception("could not issue the monthly invoices")
            return False
        if done:
            self.billing.appended += len(done)  # ledger entries too: the anchor looks
            log.info("issued %d monthly invoices: %s … %s", len(done), done[0].number,
                     done[-1].number)
        if self.leads:
            self._follow_overdue(now)
        return len(done) >= INVOICES_PER_LOOK

    def _follow_overdue(self, now_ms: int) -> None:
        """``billing-overdue@<account>`` while an account's invoice is past its due date
        and not paid (billing.overdue_invoices); cleared once payments or credit notes have
        covered it."""
        try:
            found = overdue_invoices(self.billing.db, self.billing.tz, now_ms)
        except Exception:  # an alert not raised never stops the rules; the next look comes
            log.exception("could not look for overdue invoices")
            return
        alerting, minor = self.engine.alerting, self.billing.config.minor_units
        keys = set()
        for o in found:
            key = f"{OVERDUE}@{o.account}"
            keys.add(key)
            message = (f"Account {o.account}: invoice {o.number} was due {o.due_date}; "
                       f"{o.owed_minor / minor:.2f} {o.currency} of it is unpaid")
            alerting.raise_(key, OVERDUE, "major", message, o.account, now_ms)
            alerting.restate(key, message)  # paid in part, or a newer invoice fell due
        for key, alert in list(alerting.by_key.items()):
            if alert.rule_id == OVERDUE and alert.active and key not in keys:
                alerting.clear(key, None, now_ms)
        self.engine.overdue = (len(found), sum(o.owed_minor for o in found))

    def _readings(self, batch: list[Reading]) -> None:
        try:
            self.engine.on_readings(batch)  # one that fails is logged, the others go on
        except Exception:  # never the end of the loop
            log.exception("rule evaluation failed in a batch of %d readings", len(batch))

    def _override(self, device_id: str, payload: bytes) -> None:
        from pydantic import ValidationError

        from citygrid.contract import Override

        if device_id not in self.fleet.by_id or self.foreign(device_id):
            return
        try:
            o = Override.model_validate_json(payload)
        except ValidationError as e:
            log.warning("override for %s refused: %s", device_id, e)
            return
        now = self.engine.watermark if self.engine.watermark is not None else \
            self.clock.now_ms()
        if o.clear:
            self.engine.clear_override(device_id, now, o.who)
        elif o.level is not None:
            until = now + int(o.expires_in_s * 1000) if o.expires_in_s else None
            self.engine.set_override(device_id, o.level, now, until, o.who)

    # ------------------------------------------------------------------ rules and registry

    def _rule_mtimes(self) -> dict[Path, float]:
        return {p: p.stat().st_mtime for p in loader.rule_files(self.config.rules_path)}

    def reload_if_changed(self) -> bool:
        try:
            mtimes = self._rule_mtimes()
        except OSError:
            return False
        if mtimes == self._mtimes:
            return False
        self._mtimes = mtimes
        try:
            ruleset = loader.load(self.config.rules_path)
        except loader.RuleFileError as e:
            self.last_reload_error = str(e)
            log.error("rule file refused, the running rules go on:\n%s", e)
            self.state.set_meta("reload_error", str(e))
            return False
        self.last_reload_error = None
        self.state.execute("DELETE FROM rule_meta WHERE key = 'reload_error'")
        self.engine.set_rules(ruleset)
        self.ruleset = ruleset
        log.info("rules reloaded: %d rules", len(ruleset.rules))
        if self.owned is not None:
            self._resubscribe()  # other rules, other border devices
        return True

    def follow_inventory(self) -> bool:
        """Take the registry's devices again if it changed since the last look (a one-row
        read; a change reaches the engine within ``reload_every_s``)."""
        fleet = self._follower.changed() if self._follower is not None else None
        if fleet is None:
            return False
        old = self.fleet.by_id
        changed = [d for d in fleet if old.get(d.device_id) != d]
        gone = [i for i in old if i not in fleet.by_id]
        self.fleet = fleet
        self._districts = {d.district for d in fleet}
        self.engine.set_fleet(fleet)
        now = self.clock.now_ms()
        self.outbox.points([Point("citygrid_devices", {
            "device_id": d.device_id, "district": d.district, "kind": d.kind},
            {"lat": d.lat, "lon": d.lon}, now) for d in self._mine(changed)])
        log.info("inventory changed: %d devices (%d added or edited, %d gone)",
                 len(fleet), len(changed), len(gone))
        if self.config.partition is not None:
            owned = frozenset(d for d in self._districts if self.config.partition.owns(d))
            if owned != self.owned:
                log.info("partition %s: its districts are now %s (were %s): starting again "
                         "with them", self.config.partition, ", ".join(sorted(owned)) or "none",
                         ", ".join(sorted(self.owned or ())) or "none")
                self.repartition.set()
        if self.owned is not None:
            self._resubscribe()  # border devices added, moved or gone
        return True

    def follow_workorders(self) -> None:
        """Lamps replaced since the last look reach the engine; the maintenance figures."""
        before = self.workorders.done_seq
        try:
            self.workorders.tick(self.engine, self.engine.watermark)
        except Exception:  # never the end of the loop
            log.exception("could not read the work orders")
        if self.workorders.done_seq != before:
            self.state.set_meta(self._orders_key, str(self.workorders.done_seq))

    def follow_ledger(self) -> None:
        """Ledger entries appended since the last look, by anyone, become points."""
        try:
            if self.ledger_feed.tick():
                self.state.set_meta(self._ledger_key, str(self.ledger_feed.seq))
        except Exception:  # never the end of the loop
            log.exception("could not read the ledger")

    # ------------------------------------------------------------------ the engine thread

    def start(self, timeout_s: float | None = 10.0) -> None:
        self.thread = threading.Thread(target=self.run, name="rules-engine", daemon=True)
        self.thread.start()
        if not self.subscribed.wait(timeout_s):
            raise TimeoutError(f"not subscribed at {self.settings.mqtt}")

    def run(self) -> None:
        """The engine thread: it drives the MQTT connection's loop (connecting, reconnecting
        with backoff), so a reading goes from the socket to the rules without a queue or a
        thread switch; between reads it saves, reloads, follows the registry."""
        self._last_reading = (self.clock.monotonic(), self.engine.watermark)
        self._anchor(start=True)  # what was settled since the last anchor (or before any)
        if self.payments is not None:
            self.payments.start()
        last_save = last_reload = last_health = self.clock.monotonic()
        last_invoices = last_save - INVOICES_EVERY_S  # a first look at start
        try:
            while not self.stopping.is_set():
                try:
                    self.client.loop(0.05)
                except Exception:  # never the end of the engine
                    log.exception("the MQTT loop failed; going on")
                    self.stopping.wait(0.5)
                now = self.clock.monotonic()
                last_wall, last_wm = self._last_reading
                if now - last_wall > IDLE_S and last_wm is not None:
                    # Quiet: time still passes (holds expire, `for:` timers fire).
                    self.engine.advance(last_wm + int((now - last_wall) * 1000))
                self._anchor_if_appended()
                if now - last_save >= self.config.save_every_s:
                    self.state.save(self.engine)
                    last_save = now
                if now - last_reload >= self.config.reload_every_s:
                    self.reload_if_changed()
                    self.follow_inventory()
                    self.follow_workorders()
                    self.follow_ledger()
                    last_reload = now
                if now - last_health >= 5:
                    self.state.save_health(self.engine)
                    last_health = now
                if now - last_invoices >= INVOICES_EVERY_S:
                    more = self._issue_invoices()  # more due: look again in a second
                    last_invoices = now - INVOICES_EVERY_S + 1.0 if more else now
        finally:
            self._drain(2.0)  # the last commands acknowledged before DISCONNECT
            self.engine.lamps.settle()  # every lamp's burning time, not just each 5 minutes
            self.state.save(self.engine)
            self.state.save_health(self.engine)
            self.client.stop()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(15)
            if self.thread.is_alive():  # in a connect or its backoff: cut it short
                self.client.stop()
                self.thread.join(10)
        else:
            self.client.stop()
        self.state.close()
        if self.payments is not None:
            self.payments.stop()
        self.billing.close()
        self.workorders.store.close()
        if self.outbox.notifier is not None:
            self.outbox.notifier.close()
