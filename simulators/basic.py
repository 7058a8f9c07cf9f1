"""A small fleet of streetlights and meters publishing real-time readings.

Enough to run the pipeline end to end; the city simulator (fleet files, sun,
motion, commands) grows from here.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field

import orjson

from citygrid import mqtt
from citygrid.contract import Topic
from citygrid.settings import Settings

log = logging.getLogger("citygrid.simulate")
DISTRICTS = ("indre-by", "norrebro", "vesterbro", "osterbro", "amager", "valby")


@dataclass
class Device:
    topic: Topic
    seq: int = 0
    register: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def reading(self, now_ms: int, interval_s: float) -> dict:
        self.seq += 1
        if self.topic.kind == "streetlight":
            hour = (now_ms / 3_600_000) % 24
            dark = hour < 7 or hour >= 16
            motion = dark and self.rng.random() < 0.2
            level = (100.0 if motion else 40.0) if dark else 0.0
            power = 60.0 * level / 100
            self.register += power * interval_s / 3600
            lux = 2.0 if dark else 5000 + 3000 * math.sin(hour / 24 * math.pi)
            return {"ts": now_ms, "seq": self.seq, "brightness_pct": level, "power_w": power,
                    "energy_wh": round(self.register, 3), "lux": round(lux, 1),
                    "motion": motion}
        power = max(0.0, self.rng.gauss(600, 250))
        self.register += power * interval_s / 3_600_000
        return {"ts": now_ms, "seq": self.seq, "energy_kwh": round(self.register, 6),
                "power_w": round(power, 1), "voltage_v": round(self.rng.gauss(230, 2), 1)}


def make_fleet(streetlights: int, meters: int, seed: int = 1) -> list[Device]:
    rng = random.Random(seed)
    devices = []
    for kind, n in (("streetlight", streetlights), ("meter", meters)):
        prefix = "sl" if kind == "streetlight" else "m"
        for i in range(n):
            topic = Topic(DISTRICTS[i % len(DISTRICTS)], kind, f"{prefix}-{i:05d}")
            devices.append(Device(topic, rng=random.Random(rng.random())))
    return devices


def run(settings: Settings, devices: list[Device], *, interval_s: float = 5.0,
        duration_s: float | None = None, stop: threading.Event | None = None) -> int:
    """Publish a reading from every device each interval; returns how many were sent."""
    stop = stop or threading.Event()
    client = mqtt.make_client(settings.mqtt, f"citygrid-sim-{random.randrange(1 << 30):x}")
    client.max_queued_messages_set(0)
    mqtt.connect(client, settings.mqtt)
    client.loop_start()
    for device in devices:
        client.publish(str(device.topic.with_channel("status")), b'{"online":true}', qos=1,
                       retain=True)
    sent = 0
    deadline = time.monotonic() + duration_s if duration_s else math.inf
    spread = interval_s / max(len(devices), 1)
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            tick = time.monotonic()
            for device in devices:
                now_ms = int(time.time() * 1000)
                info = client.publish(str(device.topic), orjson.dumps(
                    device.reading(now_ms, interval_s)), qos=1)
                sent += 1
                if spread > 0.001:
                    stop.wait(spread)
            info.wait_for_publish(10)
            stop.wait(max(0.0, interval_s - (time.monotonic() - tick)))
    finally:
        client.loop_stop()
        client.disconnect()
    log.info("published %d readings from %d devices", sent, len(devices))
    return sent
