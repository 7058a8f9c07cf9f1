"""The demo city's simulator: road classes and cabinets in the fleet, traffic by road class,
motion as events, injected faults — without a broker."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import datetime, timedelta

import orjson
import pytest

from cityctl.up import DEMO_RULES, demo_faults
from citygrid.city import COPENHAGEN
from citygrid.contract import decode_readings
from citygrid.fleet import ROADS, FleetDevice, distance_m
from citygrid.settings import MqttUrl
from simulators import physics
from simulators.devices import BLIND_MS, DRIVER_LOSS, STANDBY_W, WRONG_POWER, World, make_device
from simulators.engine import Engine, Injection, SimConfig
from simulators.fleetgen import CABINET_LIGHTS, generate

TZ = COPENHAGEN.tz
WORLD = World(COPENHAGEN)
LAMP_TYPES = {"led-30w", "led-40w", "led-55w", "led-90w", "led-110w", "led-120w"}


def ms(local: datetime) -> int:
    return int(local.timestamp() * 1000)


def light(road="residential", rated=40.0, seed=1, character="urban"):
    spec = FleetDevice("sl-1", "streetlight", "norrebro", 55.69, 12.55, rated_w=rated,
                       road=road)
    return make_device(spec, character, random.Random(seed), {})


def run(device, start: datetime, count: int, interval_s: float = 60) -> list[tuple[str, dict]]:
    """Periodic readings and the motion events between them, in time order, each checked
    against the contract: ("tick" | "event", reading)."""
    out = []
    step = int(interval_s * 1000)
    for k in range(count):
        t = ms(start) + k * step
        while device.planned and device.planned[0][0] <= t:
            for payload in device.motion_event(WORLD):
                decode_readings("streetlight", payload)
                out.append(("event", orjson.loads(payload)))
        for payload in device.tick(t, interval_s, WORLD):
            decode_readings(device.spec.kind, payload)
            out.append(("tick", orjson.loads(payload)))
    return out


class TestFleet:
    def test_streets_have_road_classes_lamps_and_cabinets(self):
        fleet = generate(COPENHAGEN, 300, 20)
        lights = [d for d in fleet if d.kind == "streetlight"]
        assert [d.device_id for d in lights] == [f"sl-{i:05d}" for i in range(300)]
        roads = Counter(d.road for d in lights)
        assert set(roads) == set(ROADS)
        assert 0.2 <= roads["arterial"] / 300 <= 0.4 and roads["residential"] > 100
        for d in lights:
            assert d.lamp_type == f"led-{d.rated_w:.0f}w" and d.lamp_type in LAMP_TYPES
            assert (d.rated_w >= 90) == (d.road == "arterial")
        cabinets = defaultdict(list)
        for d in lights:
            assert d.cabinet.startswith(f"cab-{d.district}-")
            cabinets[d.cabinet].append(d)
        for members in cabinets.values():
            # A cabinet feeds lights that stand near each other: within its district.
            assert CABINET_LIGHTS[0] <= len(members) <= CABINET_LIGHTS[1] or len(
                {d.district for d in lights if d.district == members[0].district}) < 15
            assert max(distance_m(members[0], d) for d in members) < 3000
        assert not any(d.road or d.cabinet for d in fleet if d.kind == "meter")

    def test_the_same_seed_gives_the_same_file(self, tmp_path):
        a, b = tmp_path / "a.geojson", tmp_path / "b.geojson"
        generate(COPENHAGEN, 200, 10, seed=3).dump(a)
        generate(COPENHAGEN, 200, 10, seed=3).dump(b)
        assert a.read_bytes() == b.read_bytes()
        generate(COPENHAGEN, 200, 10, seed=4).dump(b)
        assert a.read_bytes() != b.read_bytes()


class TestTraffic:
    @pytest.mark.parametrize("road", ROADS)
    def test_a_day_has_the_roads_daily_passings(self, road):
        day = datetime(2026, 12, 1, 0, 0, tzinfo=TZ)  # a Tuesday
        total = sum(physics.traffic_per_min(day + timedelta(minutes=m), "urban", road)
                    for m in range(24 * 60))
        assert total == pytest.approx(physics.DAILY_PASSINGS[road], rel=0.01)

    def test_quiet_streets_are_quiet_at_night_and_arterials_busy_in_the_evening(self):
        def per_hour(road: str, hour: int) -> float:
            return 60 * physics.traffic_per_min(datetime(2026, 12, 1, hour, tzinfo=TZ),
                                                "urban", road)

        assert per_hour("residential", 2) < 1 and per_hour("park", 2) < 0.2
        assert per_hour("arterial", 17) > 1000 and per_hour("arterial", 17) > 30 * per_hour(
            "arterial", 3)
        assert per_hour("residential", 17) > 20 * per_hour("residential", 3)
        # A Saturday night is busier than a Tuesday's.
        assert physics.traffic_per_min(datetime(2026, 12, 5, 1, tzinfo=TZ), "urban",
                                       "residential") > per_hour("residential", 1) / 60 * 2


class TestMotionEvents:
    def test_a_detection_is_a_reading_at_once_then_the_sensor_is_blind(self):
        device = light(road="arterial", rated=90.0)  # busy: several passings a minute
        out = run(device, datetime(2026, 12, 1, 21, 0, tzinfo=TZ), 30)
        events = [r for kind, r in out if kind == "event"]
        ticks = [r for kind, r in out if kind == "tick"]
        assert len(ticks) == 30 and len(events) >= 20
        assert all(r["motion"] is True and r["motion_count"] >= 1 for r in events)
        stamps = [r["ts"] for _, r in out]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert [r["seq"] for _, r in out] == list(range(1, len(out) + 1))
        gaps = [b["ts"] - a["ts"] for a, b in zip(events, events[1:], strict=False)]
        assert min(gaps) >= BLIND_MS  # the blind time: no flood from a busy street
        # Every passing is reported once: in its detection or in the next reading's count.
        passings = sum(r["motion_count"] for _, r in out)
        mean = sum(physics.traffic_per_min(datetime.fromtimestamp(r["ts"] / 1000, TZ),
                                           "urban", "arterial") for r in ticks[:-1])
        assert passings == pytest.approx(mean, rel=0.25)

    def test_the_register_integrates_the_power_between_any_two_readings(self):
        device = light(road="arterial", rated=90.0)
        out = [r for _, r in run(device, datetime(2026, 12, 1, 21, 0, tzinfo=TZ), 10)]
        device.command(orjson.dumps({"id": "c", "ts": out[-1]["ts"], "brightness_pct": 50,
                                     "reason": "test"}), out[-1]["ts"])
        out += [r for _, r in run(device, datetime(2026, 12, 1, 21, 10, tzinfo=TZ), 5)]
        for a, b in zip(out, out[1:], strict=False):
            assert b["energy_wh"] - a["energy_wh"] == pytest.approx(
                b["power_w"] * (b["ts"] - a["ts"]) / 3_600_000, abs=2e-3)
        assert out[-1]["power_w"] == pytest.approx(90 * 0.5 * (1 + DRIVER_LOSS) + STANDBY_W)

    def test_a_quiet_street_at_night_and_a_light_that_is_off_send_no_events(self):
        quiet = run(light(road="park"), datetime(2026, 12, 1, 3, 0, tzinfo=TZ), 60)
        assert sum(kind == "event" for kind, _ in quiet) <= 2
        day = run(light(road="arterial"), datetime(2026, 12, 1, 12, 0, tzinfo=TZ), 30)
        assert {kind for kind, _ in day} == {"tick"}  # the lamp is off: its count only
        assert sum(r["motion_count"] for _, r in day) > 100


class TestInjectedFaults:
    NOON = datetime(2026, 12, 1, 12, 0, tzinfo=TZ)

    def test_a_day_burner_burns_at_full_power_whatever_it_is_told(self):
        device = light(rated=40.0)
        device.inject("day_burner")
        ack = device.command(orjson.dumps({"id": "c", "ts": ms(self.NOON), "brightness_pct": 0,
                                           "reason": "rule:daylight-off"}), ms(self.NOON))
        assert ack["ok"] is True and ack["brightness_pct"] == 0
        out = [r for kind, r in run(device, self.NOON, 3) if kind == "tick"]
        assert {r["brightness_pct"] for r in out} == {100.0} and min(r["lux"] for r in out) > 60
        assert out[-1]["power_w"] == pytest.approx(40 * (1 + DRIVER_LOSS) + STANDBY_W)

    def test_wrong_power_and_lamp_failure(self):
        night = datetime(2026, 12, 1, 23, 0, tzinfo=TZ)
        wrong, failed = light(rated=40.0), light(rated=40.0, seed=2)
        wrong.inject("wrong_power")
        failed.inject("lamp_failure")
        [w] = [r for kind, r in run(wrong, night, 1) if kind == "tick"]
        [f] = [r for kind, r in run(failed, night, 1) if kind == "tick"]
        assert w["power_w"] == pytest.approx(40 * (1 + DRIVER_LOSS) * WRONG_POWER + STANDBY_W)
        assert f["brightness_pct"] == 100.0 and f["power_w"] == STANDBY_W
        assert f["fault"] == "lamp_failure"

    @pytest.mark.parametrize("text, parsed", [
        ("lamp_failure:sl-00012@+2m", Injection("lamp_failure", "sl-00012", 120.0)),
        ("cabinet_outage:cab-indre-by-03@+5m/30m",
         Injection("cabinet_outage", "cab-indre-by-03", 300.0, 1800.0)),
        ("day_burner:sl-00001", Injection("day_burner", "sl-00001")),
    ])
    def test_injections_parse(self, text, parsed):
        assert Injection.parse(text) == parsed

    @pytest.mark.parametrize("text, error", [
        ("melt:sl-1@+1m", "no fault 'melt'"), ("lamp_failure", "NAME:TARGET"),
        ("lamp_failure:sl-1@2m", "an offset"), ("lamp_failure:sl-1@+soon", "duration"),
    ])
    def test_bad_injections_are_refused_with_what_is_wrong(self, text, error):
        with pytest.raises(ValueError, match=error):
            Injection.parse(text)

    def test_an_injection_on_a_device_or_cabinet_the_fleet_has_not_is_refused(self):
        fleet = generate(COPENHAGEN, 30, 2)
        for text in ("lamp_failure:sl-99999@+1m", "cabinet_outage:cab-nowhere-01@+1m/5m",
                     "day_burner:m-00000@+1m"):
            with pytest.raises(ValueError, match="no such|streetlight"):
                Engine(MqttUrl.parse("mqtt://127.0.0.1:1"), fleet, COPENHAGEN,
                       SimConfig(inject=[Injection.parse(text)]))

    def test_a_cabinet_outage_silences_its_lights_then_they_restart(self):
        fleet = generate(COPENHAGEN, 60, 0)
        cabinet = fleet.devices[0].cabinet
        start = datetime(2026, 12, 1, 22, 0, tzinfo=TZ)
        engine = Engine(MqttUrl.parse("mqtt://127.0.0.1:1"), fleet, COPENHAGEN, SimConfig(
            start_ms=ms(start), interval_s=60,
            inject=[Injection.parse(f"cabinet_outage:{cabinet}@+5m/10m")]))
        members = [i for i, d in enumerate(engine.devices) if d.spec.cabinet == cabinet]
        light0 = engine.devices[members[0]]
        light0.command(orjson.dumps({"id": "c", "ts": ms(start), "brightness_pct": 30,
                                     "reason": "test", "hold_s": 7200}), ms(start))
        published = Counter()
        for minute in range(25):
            now = ms(start) + minute * 60_000
            engine._inject_due(now)
            for i in members:
                published[minute] += len(engine.devices[i].tick(now, 60, WORLD))
        assert published[4] == len(members) and published[6] == published[14] == 0
        assert published[16] == len(members)
        assert light0.commanded is None  # the controller restarted: its photocell again
        assert engine.stats["injected_cabinet_outage"] == len(members)


def test_up_injects_each_fault_on_its_fleet_and_runs_the_demo_rules():
    fleet = generate(COPENHAGEN, 300, 100)
    faults = demo_faults(fleet)
    assert faults == demo_faults(generate(COPENHAGEN, 300, 100))  # the same every time
    names = Counter(f.split(":")[0] for f in faults)
    assert names == {"lamp_failure": 3, "wrong_power": 1, "day_burner": 1, "cabinet_outage": 1}
    engine = Engine(MqttUrl.parse("mqtt://127.0.0.1:1"), fleet, COPENHAGEN,
                    SimConfig(inject=[Injection.parse(f) for f in faults]))
    assert len(engine.injections) == len(faults)  # every target is in the fleet
    # All within the first ten simulated minutes (ten real seconds at 60×).
    assert max(Injection.parse(f).after_s for f in faults) <= 600
    assert DEMO_RULES.exists() and DEMO_RULES.name == "demo-city.yaml"
