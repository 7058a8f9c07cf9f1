"""`citygrid rules run`: the engine live on MQTT, with state, reloads and health.

One engine thread runs the inbound MQTT loop and the rules together, so the
engine needs no locks and a reading meets no queue on its way to a command.
Event time comes from the readings; while none arrive the watermark follows
the wall clock.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho

from billing import BillingStore, load_config
from citygrid import mqtt
from citygrid.city import CityProfile
from citygrid.clock import SYSTEM_CLOCK, Clock
from citygrid.contract import ContractError, Topic, decode_readings, topic_filter
from citygrid.fleet import Fleet, FleetDevice
from citygrid.registry import Follower, Registry
from citygrid.settings import Settings
from citygrid.store import Point, StoreError, TelemetryStore
from rules import loader
from rules.alerts import AlertState
from rules.engine import RuleEngine
from rules.state import RuleStateStore

log = logging.getLogger("citygrid.rules")
IDLE_S = 5.0  # no reading for this long: the watermark follows the wall clock
# Makes an MQTT client: (broker URL, client id, *, protocol=…, manual_ack=…), as
# citygrid.mqtt.make_client does.
MqttClientFactory = Callable[..., paho.Client]


class MqttOutbox:
    def __init__(self, client: paho.Client, store: TelemetryStore | None):
        self.client = client
        self.store = store
        self.commands = 0
        # Storage never blocks the rule loop: a writer thread takes the points.
        self._points: queue.Queue = queue.Queue(maxsize=1000)
        if store is not None:
            threading.Thread(target=self._write_points, name="rules-points", daemon=True).start()

    def command(self, device: FleetDevice, payload: dict[str, Any], expiry_s: float) -> None:
        topic = str(Topic(device.district, "streetlight", device.device_id, "cmd"))
        expiry = mqtt.message_expiry(self.client, max(1, int(expiry_s)))
        self.client.publish(topic, orjson.dumps(payload), qos=1, properties=expiry)
        self.commands += 1

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def alert(self, alert: AlertState, raised: bool) -> None:
        if raised:
            log.warning("ALERT %s [%s] %s", alert.key, alert.severity, alert.message)
        else:
            log.info("alert cleared %s", alert.key)

    def points(self, points: list[Point]) -> None:
        if self.store is None:
            return
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


class RuleRunner:
    """``make_client`` makes its MQTT clients (default: citygrid.mqtt.make_client); ``clock``
    is its wall clock and monotonic clock (default: the system's)."""

    def __init__(self, settings: Settings, fleet: Fleet, city: CityProfile,
                 store: TelemetryStore | None, config: RunnerConfig, *,
                 make_client: MqttClientFactory | None = None, clock: Clock = SYSTEM_CLOCK,
                 inventory: Registry | None = None):
        self.settings, self.fleet, self.config = settings, fleet, config
        # The registry, when the fleet comes from it: re-read whenever it changes.
        self.inventory = inventory
        self._follower = Follower(settings.data_dir, inventory) if inventory else None
        if self._follower is not None:
            self._follower.changed()  # the version `fleet` was read at
        self.clock = clock
        make_client = make_client or mqtt.make_client
        self.ruleset = loader.load(config.rules_path)
        self._mtimes = self._rule_mtimes()
        self.state = RuleStateStore(Path(settings.data_dir) / "rules.sqlite")
        # Two connections: readings come in over MQTT 3.1.1, whose PUBLISH packets paho
        # parses without MQTT 5 property objects (a third of its time at 5,000 readings/s,
        # and that thread shares the GIL with the engine); commands go out over MQTT 5,
        # which carries their message expiry.
        # Acknowledged by us, after the engine has taken the reading, all of one loop turn's
        # PUBACKs in one write (paho's own ack costs a packet and a wake-up per message).
        self.client = make_client(settings.mqtt, config.client_id + "-in",
                                  protocol=paho.MQTTv311, manual_ack=True)
        self._acks: list[int] = []
        self.publisher = make_client(settings.mqtt, config.client_id + "-out")
        self.publisher.max_inflight_messages_set(1000)
        self.publisher.max_queued_messages_set(0)
        self.outbox = MqttOutbox(self.publisher, store)

        self.billing = BillingStore(Path(settings.data_dir) / "billing.sqlite",
                                    load_config(settings.billing), fleet, city.tz)
        self.engine = RuleEngine(self.ruleset, fleet, city, self.outbox, billing=self.billing)
        # Where every device stands, for maps (the Streetlights dashboard joins on device_id).
        now = clock.now_ms()
        self.outbox.points([Point("citygrid_devices", {
            "device_id": d.device_id, "district": d.district, "kind": d.kind},
            {"lat": d.lat, "lon": d.lon}, now) for d in fleet])
        self.state.restore(self.engine)
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self.last_reload_error: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused: %s", reason_code)
            return
        telemetry = (f"$share/{self.config.group}/{self.config.topic}" if self.config.group
                     else self.config.topic)
        client.subscribe([(telemetry, 1), (topic_filter("ack", kind="streetlight"), 1),
                          (topic_filter("override", kind="streetlight"), 1)])

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
            self.state.execute("INSERT OR REPLACE INTO rule_meta VALUES ('reload_error', ?)",
                               (str(e),))
            return False
        self.last_reload_error = None
        self.state.execute("DELETE FROM rule_meta WHERE key = 'reload_error'")
        self.engine.set_rules(ruleset)
        self.ruleset = ruleset
        log.info("rules reloaded: %d rules", len(ruleset.rules))
        return True

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            t = Topic.parse(topic)
        except ContractError:
            return
        if t.channel == "override":
            self._override(t, payload)
            return
        if t.channel == "ack":
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                self.engine.on_ack(t.device_id, orjson.loads(payload))
            return
        try:
            readings = decode_readings(t.kind, payload, topic, now_ms=self.clock.now_ms())
        except ContractError:
            return  # ingest dead-letters it; the rules only act on valid readings
        for r in readings:
            try:
                self.engine.on_reading(t.device_id, r.fields(), r.ts)
            except Exception:  # one bad event never stops the loop
                log.exception("rule evaluation failed for %s", topic)

    def _override(self, t: Topic, payload: bytes) -> None:
        from pydantic import ValidationError

        from citygrid.contract import Override

        if t.device_id not in self.fleet.by_id:
            return
        try:
            o = Override.model_validate_json(payload)
        except ValidationError as e:
            log.warning("override for %s refused: %s", t.device_id, e)
            return
        now = self.engine.watermark if self.engine.watermark is not None else \
            self.clock.now_ms()
        if o.clear:
            self.engine.clear_override(t.device_id, now, o.who)
        elif o.level is not None:
            until = now + int(o.expires_in_s * 1000) if o.expires_in_s else None
            self.engine.set_override(t.device_id, o.level, now, until, o.who)

    def start(self, timeout_s: float | None = 10.0) -> None:
        mqtt.connect(self.publisher, self.settings.mqtt, wait=False)
        self.publisher.loop_start()
        self.thread = threading.Thread(target=self.run, name="rules-engine", daemon=True)
        self.thread.start()
        if not self.subscribed.wait(timeout_s):
            raise TimeoutError(f"not subscribed at {self.settings.mqtt}")

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        topic = message.topic
        self.handle(topic, message.payload)
        if message.qos:
            self._acks.append(message.mid)
        if topic.endswith("/telemetry"):
            self._last_reading = (self.clock.monotonic(), self.engine.watermark)

    def run(self) -> None:
        """The engine thread: it also runs the inbound MQTT connection's loop, so a reading
        goes from the socket to the rules without a queue or a thread switch."""
        self._last_reading = (self.clock.monotonic(), self.engine.watermark)
        last_save = last_reload = last_health = self.clock.monotonic()
        connected = False
        while not self.stopping.is_set():
            if not connected:
                try:
                    # A persistent session: what arrives while the connection is down (a
                    # broker restart, a keepalive lost under load, the engine restarting) waits
                    # at the broker instead of being dropped with a clean session.
                    mqtt.connect(self.client, self.settings.mqtt, clean_start=False)
                    connected = True
                except OSError as e:
                    log.warning("waiting for the broker at %s: %s", self.settings.mqtt, e)
                    self.stopping.wait(1.0)
                    continue
            rc = self.client.loop(timeout=0.05)
            if self._acks:
                if rc == paho.MQTT_ERR_SUCCESS:  # message ids of a lost connection mean nothing
                    mqtt.ack_many(self.client, self._acks)
                self._acks = []
            if rc != paho.MQTT_ERR_SUCCESS:
                log.warning("lost the broker (%s); reconnecting", rc)
                connected = False
                self.stopping.wait(0.5)
            now = self.clock.monotonic()
            last_wall, last_wm = self._last_reading
            if now - last_wall > IDLE_S and last_wm is not None:
                # Quiet: time still passes (holds expire, `for:` timers fire).
                self.engine.advance(last_wm + int((now - last_wall) * 1000))
            if now - last_save >= self.config.save_every_s:
                self.state.save(self.engine)
                last_save = now
            if now - last_reload >= self.config.reload_every_s:
                self.reload_if_changed()
                self.follow_inventory()
                last_reload = now
            if now - last_health >= 5:
                self.state.save_health(self.engine)
                last_health = now
        self.state.save(self.engine)
        self.state.save_health(self.engine)
        self.client.disconnect()

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
        self.engine.set_fleet(fleet)
        now = self.clock.now_ms()
        self.outbox.points([Point("citygrid_devices", {
            "device_id": d.device_id, "district": d.district, "kind": d.kind},
            {"lat": d.lat, "lon": d.lon}, now) for d in changed])
        log.info("inventory changed: %d devices (%d added or edited, %d gone)",
                 len(fleet), len(changed), len(gone))
        return True

    def stop(self) -> None:
        self.stopping.set()
        if hasattr(self, "thread"):
            self.thread.join(10)
        self.publisher.disconnect()
        self.publisher.loop_stop()
        self.state.close()
        self.billing.close()
