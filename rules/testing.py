"""`citygrid rules test FILE`: rule tests in YAML, like `promtool test rules`.

A test file names the rules it tests, a small fleet, and cases: readings at
times in, the commands and alerts expected at times out. Unit of time: offsets
from the case's ``start`` (``0s``, ``90s``, ``5m``).

    rules: copenhagen.yaml
    fleet:
      - {device_id: sl-1, kind: streetlight, district: norrebro, lat: 55.696, lon: 12.544,
         rated_w: 50}
    tests:
      - name: motion boosts the light
        start: 2026-11-27T22:00:00+01:00
        readings:
          - {at: 0s, device: sl-1}
          - {at: 60s, device: sl-1, motion: true}
        until: 5m
        expect:
          commands:
            - {at: 0s, device: sl-1, level: 30, reason: rule:dark-baseline}
            - {at: 60s, device: sl-1, level: 100, reason: rule:motion-boost}
            - {at: 180s, device: sl-1, level: 30}
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from citygrid.casefiles import CaseResult
from citygrid.city import city as city_profile
from citygrid.fleet import Fleet, FleetDevice
from rules import loader
from rules.alerts import AlertState
from rules.engine import RuleEngine
from rules.expr import parse_duration

LIGHT_DEFAULTS = {"seq": 1, "brightness_pct": 30.0, "energy_wh": 0.0, "lux": 1.0,
                  "motion": False}
METER_DEFAULTS = {"seq": 1, "energy_kwh": 0.0, "power_w": 500.0}


class _Recorder:
    def __init__(self, start_ms: int):
        self.start_ms = start_ms
        self.events: list[dict[str, Any]] = []
        self.now_ms = start_ms

    def command(self, device: FleetDevice, payload: dict, expiry_s: float) -> None:
        self.events.append({"type": "command", "at": (payload["ts"] - self.start_ms) / 1000,
                            "device": device.device_id, "level": payload["brightness_pct"],
                            "reason": payload["reason"]})

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.events.append({"type": "publish", "at": (self.now_ms - self.start_ms) / 1000,
                            "topic": topic, "payload": payload.decode()})

    def alert(self, alert: AlertState, raised: bool) -> None:
        at = alert.since_ms if raised else alert.cleared_ms
        self.events.append({"type": "alert", "at": (at - self.start_ms) / 1000,
                            "rule": alert.rule_id, "scope": alert.scope,
                            "state": "raised" if raised else "cleared",
                            "severity": alert.severity, "message": alert.message})

    def points(self, points: list) -> None:
        pass




def _fmt(event: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in event.items() if k != "type") + "}"


def _matches(expected: dict, got: dict) -> bool:
    for k, v in expected.items():
        if k == "at":
            if abs(parse_duration(v) - got["at"]) > 0.5:
                return False
        elif k == "message_contains":
            if str(v) not in got.get("message", ""):
                return False
        elif got.get(k) != v and not (isinstance(v, int | float) and got.get(k) == float(v)):
            return False
    return True


def _compare(kind: str, expected: list[dict], got: list[dict]) -> list[str]:
    failures = []
    remaining = list(got)
    for exp in expected:
        for i, g in enumerate(remaining):
            if _matches(exp, g):
                del remaining[i]
                break
        else:
            failures.append(f"  missing {kind}: {_fmt(exp)}")
    failures += [f"  unexpected {kind}: {_fmt(g)}" for g in remaining]
    if failures:
        failures.append(f"  all {kind}s issued:")
        failures += [f"    {_fmt(g)}" for g in got] or ["    (none)"]
    return failures


def run_file(path: str | Path) -> list[CaseResult]:
    path = Path(path)
    doc = yaml.safe_load(path.read_text())
    ruleset = loader.load(path.parent / doc["rules"])
    fleet = Fleet.parse({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [d.pop("lon"),
                                                                          d.pop("lat")]},
         "properties": d} for d in (dict(x) for x in doc["fleet"])]}, f"{path}: fleet")
    city = city_profile(doc.get("city", "copenhagen"))
    results = []
    for case in doc["tests"]:
        start = case["start"]
        start = start if isinstance(start, datetime) else datetime.fromisoformat(str(start))
        start_ms = int(start.timestamp() * 1000)
        recorder = _Recorder(start_ms)
        engine = RuleEngine(ruleset, fleet, city, recorder, track_acks=False)
        engine.advance(start_ms)
        seq: dict[str, int] = {}
        steps = sorted(case.get("readings", []), key=lambda r: parse_duration(r["at"]))
        for step in steps:
            step = dict(step)
            at_ms = start_ms + int(parse_duration(step.pop("at")) * 1000)
            device_id = step.pop("device")
            device = fleet.by_id[device_id]
            reading = dict(LIGHT_DEFAULTS if device.kind == "streetlight" else METER_DEFAULTS)
            if device.kind == "streetlight":
                reading["power_w"] = (device.rated_w or 0) * 0.3
            seq[device_id] = seq.get(device_id, 0) + 1
            reading["seq"] = seq[device_id]
            reading.update(step)
            recorder.now_ms = at_ms
            engine.on_reading(device_id, reading, at_ms)
        until = start_ms + int(parse_duration(case.get("until", "0s")) * 1000)
        for t in range(engine.watermark or start_ms, until + 1, 1000):  # let time pass
            recorder.now_ms = t
            engine.advance(t)
        result = CaseResult(case["name"])
        expect = case.get("expect", {})
        for kind in ("commands", "alerts", "publishes"):
            if kind in expect:
                got = [e for e in recorder.events if e["type"] == {"commands": "command",
                                                                   "alerts": "alert",
                                                                   "publishes": "publish"}[kind]]
                result.failures += _compare(kind[:-1] if kind != "publishes" else "publish",
                                            expect[kind] or [], got)
        for device_id, want in (expect.get("levels") or {}).items():
            explained = engine.explain(device_id)
            if explained["level"] != float(want):
                result.failures.append(f"  level of {device_id} at the end: expected {want}, "
                                       f"got {explained['level']} ({explained['reason']})")
        results.append(result)
    return results
