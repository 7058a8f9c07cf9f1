"""The simulator's physics and device behaviour, without a broker."""

import random
from datetime import date, datetime, timedelta
from statistics import mean

import orjson
import pytest

from citygrid import sun
from citygrid.city import COPENHAGEN
from citygrid.contract import decode_readings
from citygrid.fleet import Fleet, FleetDevice, FleetError, distance_m
from simulators.devices import (
    DRIVER_LOSS,
    STANDBY_W,
    MeterSim,
    StreetlightSim,
    World,
    make_device,
)
from simulators.engine import SimClock
from simulators.fleetgen import generate

TZ = COPENHAGEN.tz
WORLD = World(COPENHAGEN)


def light(faults=None, character="downtown", rated=100.0, seed=1) -> StreetlightSim:
    spec = FleetDevice("sl-1", "streetlight", "indre-by", 55.68, 12.58, rated_w=rated)
    return make_device(spec, character, random.Random(seed), faults or {})


def meter(faults=None, profile="household", seed=1) -> MeterSim:
    spec = FleetDevice("m-1", "meter", "valby", 55.66, 12.50, account_id="a", tariff="t",
                       profile=profile)
    return make_device(spec, "suburban", random.Random(seed), faults or {})


def ms(local: datetime) -> int:
    return int(local.timestamp() * 1000)


def readings(device, start: datetime, count: int, interval_s: float = 60) -> list[dict]:
    out = []
    for k in range(count):
        for payload in device.tick(ms(start) + k * int(interval_s * 1000), interval_s, WORLD):
            [r] = decode_readings(device.spec.kind, payload)  # every reading obeys the contract
            out.append(orjson.loads(payload))
    return out


class TestSun:
    @pytest.mark.parametrize("day, event, expected", [
        (date(2026, 6, 21), "sunrise", "04:25"), (date(2026, 6, 21), "sunset", "21:57"),
        (date(2026, 12, 21), "sunrise", "08:37"), (date(2026, 12, 21), "sunset", "15:38"),
    ])
    def test_copenhagen_sun_events_within_three_minutes(self, day, event, expected):
        # Published times for Copenhagen (timeanddate.com).
        got = sun.event(event, COPENHAGEN.lat, COPENHAGEN.lon, day).astimezone(TZ)
        hour, minute = map(int, expected.split(":"))
        want = datetime(day.year, day.month, day.day, hour, minute, tzinfo=TZ)
        assert abs(got - want) <= timedelta(minutes=3), got

    def test_no_sunset_in_polar_summer(self):
        assert sun.event("sunset", 78.2, 15.6, date(2026, 6, 21)) is None  # Longyearbyen


class TestStreetlight:
    def test_lux_near_zero_at_midnight_and_bright_at_june_noon(self):
        midnight = readings(light(), datetime(2026, 6, 21, 0, 30, tzinfo=TZ), 30)
        noon = readings(light(), datetime(2026, 6, 21, 12, 30, tzinfo=TZ), 30)
        assert max(r["lux"] for r in midnight) < 5
        assert min(r["lux"] for r in noon) > 1000
        # The photocell: on at night, off at noon (no command given).
        assert {r["brightness_pct"] for r in midnight} == {100.0}
        assert {r["brightness_pct"] for r in noon} == {0.0}

    def test_motion_peaks_in_the_morning_and_evening(self):
        def count_at(hour: int) -> float:
            device = light(character="urban", seed=hour)
            # Weekdays only: 10 mornings/evenings/nights, 30 one-minute readings each.
            days = [datetime(2026, 11, 2, hour, 0, tzinfo=TZ) + timedelta(days=d)
                    for d in range(12) if (datetime(2026, 11, 2) + timedelta(days=d)).weekday() < 5]
            return mean(r["motion_count"] for d in days for r in readings(device, d, 30))

        night, morning, evening = count_at(3), count_at(8), count_at(17)
        assert morning > 8 * night and evening > 8 * night, (night, morning, evening)

    def test_power_tracks_the_commanded_level(self):
        device = light(rated=100.0)
        night = datetime(2026, 11, 28, 23, 0, tzinfo=TZ)
        for level in (30.0, 75.0, 0.0):
            ack = device.command(orjson.dumps({"id": f"c{level}", "ts": ms(night),
                                               "brightness_pct": level, "reason": "test"}),
                                 ms(night))
            assert ack == {"id": f"c{level}", "ts": ms(night), "brightness_pct": level,
                           "ok": True}
            [r] = readings(device, night, 1)
            assert r["brightness_pct"] == level
            assert r["power_w"] == pytest.approx(100 * level / 100 * (1 + DRIVER_LOSS)
                                                 + STANDBY_W)

    def test_hold_expires_back_to_the_program(self):
        device = light()
        night = datetime(2026, 11, 28, 23, 0, tzinfo=TZ)
        device.command(orjson.dumps({"id": "c", "ts": ms(night), "brightness_pct": 40,
                                     "reason": "rule:motion", "hold_s": 120}), ms(night))
        levels = [r["brightness_pct"] for r in readings(device, night, 4)]
        assert levels == [40.0, 40.0, 100.0, 100.0]  # held for 120 s, then the photocell

    @pytest.mark.parametrize("payload, error", [
        (b'{"id":"c1","ts":1790000000000,"brightness_pct":150,"reason":"x"}', "out_of_range"),
        (b'{"id":"c2","ts":1790000000000,"brightness_pct":"50","reason":"x"}', "wrong_type"),
        (b'{"id":"c3","brightness_pct":50,"reason":"x"}', "missing_field"),
        (b"dim please", "not_json"),
    ])
    def test_bad_commands_are_refused_and_change_nothing(self, payload, error):
        device = light()
        night = datetime(2026, 11, 28, 23, 0, tzinfo=TZ)
        readings(device, night, 1)
        ack = device.command(payload, ms(night))
        assert ack["ok"] is False and ack["error"].startswith(error)
        assert ack["brightness_pct"] == 100.0
        assert ack["id"] == (orjson.loads(payload)["id"] if payload.startswith(b"{") else "?")
        assert readings(device, night + timedelta(minutes=1), 1)[0]["brightness_pct"] == 100.0

    def test_lamp_failure_draws_no_power_while_on(self):
        device = light(faults={"lamp_failure": 1.0})
        [r] = readings(device, datetime(2026, 11, 28, 23, 0, tzinfo=TZ), 1)
        assert r["brightness_pct"] == 100.0 and r["power_w"] == STANDBY_W
        assert r["fault"] == "lamp_failure"

    def test_stuck_sensor_repeats_itself(self):
        device = light(faults={"stuck_sensor": 1.0})
        rs = readings(device, datetime(2026, 11, 28, 14, 0, tzinfo=TZ), 120)  # into the dusk
        assert len({r["lux"] for r in rs}) == 1 and len({r["motion_count"] for r in rs}) == 1


class TestMeter:
    def test_register_never_decreases_without_a_reset(self):
        rs = readings(meter(), datetime(2026, 11, 2, 0, 0, tzinfo=TZ), 3000)
        registers = [r["energy_kwh"] for r in sorted(rs, key=lambda r: r["seq"])]
        assert all(b >= a for a, b in zip(registers, registers[1:], strict=False))
        assert registers[-1] > registers[0]

    def test_a_reset_is_the_only_decrease(self):
        device = meter(faults={"reset": 0.01})
        rs = readings(device, datetime(2026, 11, 2, 0, 0, tzinfo=TZ), 3000)
        registers = [r["energy_kwh"] for r in rs]
        decreases = sum(b < a for a, b in zip(registers, registers[1:], strict=False))
        assert decreases == device.injected["reset"] > 0

    def test_evening_peak_and_business_hours(self):
        home = readings(meter(), datetime(2026, 11, 3, 0, 0, tzinfo=TZ), 24 * 60)
        by_hour = {h: mean(r["power_w"] for r in home[h * 60:(h + 1) * 60]) for h in range(24)}
        assert by_hour[19] > 3 * by_hour[3]
        shop = readings(meter(profile="business"), datetime(2026, 11, 3, 0, 0, tzinfo=TZ), 1440)
        assert mean(r["power_w"] for r in shop[11 * 60:12 * 60]) > 3 * mean(
            r["power_w"] for r in shop[2 * 60:3 * 60])

    @pytest.mark.parametrize("fault", ["duplicate", "out_of_order", "spike", "gap", "offline",
                                       "reset"])
    def test_fault_happens_at_about_its_rate(self, fault):
        device = meter(faults={fault: 0.05}, seed=7)
        readings(device, datetime(2026, 11, 2, tzinfo=TZ), 4000)
        ticks = 4000 if fault != "offline" else 4000 - 17 * device.injected["offline"]
        # Binomial(≈4000, 0.05): mean ≈ 200, sd ≈ 14; five sd either way.
        assert abs(device.injected[fault] - 0.05 * ticks) < 5 * (ticks * 0.05 * 0.95) ** 0.5

    def test_duplicates_and_out_of_order_show_on_the_wire(self):
        device = meter(faults={"duplicate": 0.1, "out_of_order": 0.1}, seed=3)
        rs = readings(device, datetime(2026, 11, 2, tzinfo=TZ), 1000)
        seqs = [r["seq"] for r in rs]
        assert len(seqs) - len(set(seqs)) == device.injected["duplicate"]
        assert sum(b < a for a, b in zip(seqs, seqs[1:], strict=False)) >= device.injected[
            "out_of_order"] - 1


class TestFleet:
    def test_lights_stand_25_to_40_m_apart_along_their_street(self):
        fleet = generate(COPENHAGEN, 600, 50, seed=2)
        lights = fleet.of_kind("streetlight")
        assert len(lights) == 600 and len(fleet.of_kind("meter")) == 50
        by_street: dict[str, list[FleetDevice]] = {}
        for d in lights:
            by_street.setdefault(d.street, []).append(d)
        gaps = [distance_m(a, b) for street in by_street.values()
                for a, b in zip(street, street[1:], strict=False)]
        assert gaps and all(24.5 <= g <= 40.5 for g in gaps), (min(gaps), max(gaps))
        with_neighbours = sum(bool(fleet.neighbours(d.device_id, 60)) for d in lights[:100])
        assert with_neighbours >= 95

    def test_districts_accounts_and_tariffs(self):
        fleet = generate(COPENHAGEN, 100, 200, seed=3)
        assert {d.district for d in fleet} <= {d.slug for d in COPENHAGEN.districts}
        meters = fleet.of_kind("meter")
        tariffs = [m.tariff for m in meters]
        assert tariffs.count("household-tou") > 0.7 * len(meters)
        assert tariffs.count("business-flat") > 0
        assert len({m.account_id for m in meters}) == len(meters)

    def test_same_seed_same_fleet_and_round_trip(self, tmp_path):
        a = generate(COPENHAGEN, 50, 10, seed=9)
        assert a.dump() == generate(COPENHAGEN, 50, 10, seed=9).dump()
        a.dump(tmp_path / "fleet.geojson")
        assert Fleet.load(tmp_path / "fleet.geojson").devices == a.devices

    def test_bad_fleet_errors_name_the_feature(self):
        doc = generate(COPENHAGEN, 2, 1, seed=1).geojson()
        doc["features"][1]["properties"]["rated_w"] = -5
        del doc["features"][2]["properties"]["tariff"]
        with pytest.raises(FleetError) as e:
            Fleet.parse(doc, "city.geojson")
        assert "city.geojson: features[1].properties.rated_w" in str(e.value)
        assert "features[2]" in str(e.value) and "tariff" in str(e.value)


def test_accelerated_clock_never_passes_the_wall_clock(monkeypatch):
    import time as real_time

    t = [1000.0]
    epoch = 1_790_000_000.0
    monkeypatch.setattr("simulators.engine.time.monotonic", lambda: t[0])
    monkeypatch.setattr("simulators.engine.time.time", lambda: epoch + (t[0] - 1000.0))
    clock = SimClock(int((epoch - 3600) * 1000), speed=60)
    assert clock.now_ms() == (epoch - 3600) * 1000
    t[0] += 30  # 30 s × 60 = 30 simulated minutes
    assert clock.now_ms() == (epoch - 1800) * 1000
    t[0] += 600  # would be 10 h ahead: caught up, now real time
    assert clock.now_ms() == (epoch + 630) * 1000
    assert clock.wall_at((epoch - 1800) * 1000) == 1030.0
    assert real_time.time() > 0


def test_same_seed_same_readings():
    from simulators.engine import Engine, SimConfig  # noqa: F401  (the engine seeds devices so)

    def run(seed):
        rng = random.Random(seed)
        fleet = generate(COPENHAGEN, 5, 5, seed=seed)
        devices = [make_device(d, "urban", random.Random(rng.getrandbits(64)),
                               {"duplicate": 0.1, "lamp_failure": 0.01}) for d in fleet]
        start = datetime(2026, 11, 27, 16, 0, tzinfo=TZ)
        return [p for d in devices for k in range(100)
                for p in d.tick(ms(start) + k * 60_000, 60, WORLD)]

    assert run(11) == run(11)
    assert run(11) != run(12)
