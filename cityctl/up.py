"""``citygrid up``: the whole city on one machine, each service its own supervised process.

A broker (Mosquitto when installed, else the embedded amqtt broker), ingest into the
configured store (embedded SQLite unless CITYGRID_INFLUX_URL is set), the rule engine with
the demo city's lighting and the billing example (rules/examples/demo-city.yaml), the gateway
with the status page, the adapters for off-the-shelf devices (registered with a device
profile), and a simulated fleet at 60× from yesterday's late afternoon — with a few faults
injected at fixed times (``demo_faults``), so that the operator has something to find.
Everything lives in the data directory, so a second `citygrid up` goes on where the first one
stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import orjson

from cityctl.localservices import MissingBinary, Mosquitto, find_binary, free_port
from cityctl.supervisor import Supervisor
from cityctl.upview import CityWatch, render
from citygrid.city import city as city_profile
from citygrid.fleet import Fleet
from citygrid.registry import Registry
from citygrid.settings import Settings
from gateway import create_token, token_role
from rules import DEFAULT_RULES, read_running
from simulators import generate

# Readings per real second the demo offers each broker: Mosquitto carries tens of thousands
# (docs/platform-facts.md); amqtt about 1,200 QoS 1 messages/s, and each reading goes to four
# subscribers (ingest, rules, gateway, this summary).
BROKER_BUDGET = {"mosquitto": 400.0, "embedded": 60.0}
# Rule engine processes (`rules run --workers`): half the cores — the broker, ingest, the
# gateway and the simulator share the machine — at least two, at most four.
RULES_WORKERS = max(2, min(4, (os.cpu_count() or 2) // 2))
STOP_ORDER = ["simulate", "gateway", "adapters", "rules", "ingest", "broker"]
# The demo city's lighting: by road class and hour, with presence (docs/demo-city.md). A
# fleet without road classes (a data directory from before them) keeps the Copenhagen example.
DEMO_RULES = DEFAULT_RULES.parent / "demo-city.yaml"


def demo_faults(fleet: Fleet) -> list[str]:
    """The faults the demo injects (``citygrid simulate --inject``), the same for a fleet every
    time: three lamp failures (two, four and six simulated minutes in), a lamp drawing the
    wrong power (three minutes in), a day-burner from the start (it shows in the dusk and the
    next day) and, ten minutes in, the biggest cabinet's supply cut for 30 minutes."""
    lights = sorted((d for d in fleet if d.kind == "streetlight"), key=lambda d: d.device_id)
    residential = [d for d in lights if d.road in ("residential", None)]
    faults = []
    seen: set[str] = set()
    for d in residential:  # one in each of the first three districts
        if d.district not in seen and len(seen) < 3:
            seen.add(d.district)
            faults.append(f"lamp_failure:{d.device_id}@+{2 * len(seen)}m")
    taken = {f.split(":")[1].split("@")[0] for f in faults}
    spare = [d for d in residential if d.device_id not in taken]
    if spare:
        faults.append(f"wrong_power:{spare[len(spare) // 2].device_id}@+3m")
    arterials = [d for d in lights if d.road == "arterial"] or lights[1:]
    if arterials:
        faults.append(f"day_burner:{arterials[0].device_id}@+0m")
    cabinets: dict[str, int] = {}
    for d in lights:
        if d.cabinet:
            cabinets[d.cabinet] = cabinets.get(d.cabinet, 0) + 1
    if cabinets:
        biggest = min(cabinets, key=lambda c: (-cabinets[c], c))
        faults.append(f"cabinet_outage:{biggest}@+10m/30m")
    return faults


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port(wanted: int | None, default: int) -> int:
    if wanted:
        return wanted
    for port in range(default, default + 10):
        if _port_free(port):
            return port
    return free_port()


def late_afternoon_yesterday(tz) -> int:
    """16:00 yesterday in the city: dusk, the night and the morning play out at 60×."""
    now = datetime.now(tz)
    start = (now - timedelta(days=1)).replace(hour=16, minute=0, second=0, microsecond=0)
    return int(start.timestamp() * 1000)


def demo_token(data: Path) -> str:
    """The demo's operator token: kept (mode 600) so a resumed city keeps its address."""
    path = data / "demo-token"
    if path.exists():
        token = path.read_text().strip()
        if token_role(data, token) == "operator":
            return token
    token = create_token(data, "operator", "citygrid up")
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def _choose_broker(kind: str) -> str:
    if kind != "auto":
        return kind
    try:
        find_binary("mosquitto")
        return "mosquitto"
    except MissingBinary:
        return "embedded"


def _wait_ready(url: str, watch: CityWatch, supervisor: Supervisor, need_readings: bool,
                timeout_s: float, data: Path, since_s: float) -> bool:
    """Ready: the gateway answers, every rule worker is subscribed (a reading sent now is
    acted on) and, with the simulator, readings flow."""
    deadline = time.monotonic() + timeout_s
    gateway = rules = False
    while time.monotonic() < deadline:
        supervisor.check()
        if not gateway:
            with contextlib.suppress(httpx.HTTPError):
                gateway = httpx.get(f"{url}/health", timeout=1).status_code == 200
        if not rules:
            with contextlib.suppress(sqlite3.Error):
                rules = sum(t >= since_s for t in read_running(data).values()) >= RULES_WORKERS
        if gateway and rules and (not need_readings or watch.readings > 0):
            return True
        time.sleep(0.2)
    return False


def run_up(settings: Settings, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    data = Path(settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    profile = city_profile(settings.city)
    broker_kind = _choose_broker(args.broker)
    broker_port = _port(args.broker_port, 1883)
    gateway_port = _port(args.port, 8000)
    settings = settings.with_(mqtt_url=f"mqtt://127.0.0.1:{broker_port}", data_dir=str(data),
                              mqtt_protocol="5" if broker_kind == "mosquitto" else "3.1.1")

    fleet_path = Path(settings.fleet) if settings.fleet else data / "fleet.geojson"
    if not fleet_path.exists():
        generate(profile, args.streetlights, args.meters).dump(fleet_path)
    settings = settings.with_(fleet=str(fleet_path),  # alerts link to their light here
                              status_url=settings.status_url or f"http://127.0.0.1:{gateway_port}")
    fleet = Fleet.load(fleet_path)
    if not settings.rules and any(d.road for d in fleet):
        settings = settings.with_(rules=str(DEMO_RULES))
    registry = Registry(data)
    registry.import_fleet(fleet)  # the gateway's map and device list
    registry.close()
    token = demo_token(data)

    env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
    python = [sys.executable, "-m", "cityctl"]
    supervisor = Supervisor(data / "logs")
    if broker_kind == "mosquitto":
        supervisor.start("broker", Mosquitto(data / "mosquitto", broker_port).argv(), env)
    else:
        supervisor.start("broker", [sys.executable, "-m", "cityctl.embedded_broker",
                                    str(broker_port)], env)
    supervisor.start("ingest", python + ["ingest", "--report-interval", "5"], env)
    started_s = time.time()
    supervisor.start("rules", python + ["rules", "run", "--workers", str(RULES_WORKERS)], env)
    # Off-the-shelf devices (registered with --profile/--native-id) ⇄ the contract.
    supervisor.start("adapters", python + ["adapters", "run", "--report-interval", "30"], env)
    supervisor.start("gateway", python + ["gateway", "--port", str(gateway_port)], env)
    interval = args.interval or max(60.0, len(fleet) * args.speed / BROKER_BUDGET[broker_kind])
    if not args.no_simulator:
        sim = ["simulate", "--mode", "multiplexed", "--speed", str(args.speed),
               "--interval", f"{interval:g}s", "--state", str(data / "simulator.json"),
               "--report-every", "30"]
        for fault in demo_faults(fleet):
            sim += ["--inject", fault]
        if not (data / "simulator.json").exists():
            start = datetime.fromtimestamp(late_afternoon_yesterday(profile.tz) / 1000,
                                           profile.tz)
            sim += ["--start", start.isoformat(timespec="minutes")]
        supervisor.start("simulate", python + sim, env)

    watch = CityWatch(settings, profile.tz)
    watch.start()
    url = f"http://127.0.0.1:{gateway_port}"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    lights = sum(1 for d in fleet if d.kind == "streetlight")
    print(f"CityGrid — {profile.name}: {lights} streetlights, {len(fleet) - lights} meters "
          f"(data in {data})")
    print(f"broker   mqtt://127.0.0.1:{broker_port}  "
          f"({'Mosquitto' if broker_kind == 'mosquitto' else 'embedded amqtt, MQTT 3.1.1'})")
    print(f"store    {settings.influx_url or data / 'telemetry.sqlite'}")
    print(f"status   {url}/#token={token}")
    print(f"api      {url}/docs   (operator token in {data / 'demo-token'})")
    print(f"logs     {data / 'logs'}")
    print(f"rules    {settings.rules or DEFAULT_RULES}")
    if args.no_simulator:
        reading = orjson.dumps({"ts": int(time.time() * 1000), "seq": 1, "brightness_pct": 40,
                                "power_w": 24, "energy_wh": 1, "lux": 3,
                                "motion": True}).decode()
        light = next(d for d in fleet if d.kind == "streetlight")
        print(f"send a reading as {light.device_id}:\n  mosquitto_pub -h 127.0.0.1 -p "
              f"{broker_port} -q 1 -t city/v1/{light.district}/streetlight/{light.device_id}"
              f"/telemetry -m '{reading}'")
    else:
        print(f"simulator {args.speed:g}× from "
              f"{'where it stopped' if '--start' not in sim else sim[sim.index('--start') + 1]}"
              f", a reading per device every {interval:g} simulated s")
        print("faults   " + ", ".join(demo_faults(fleet)) + " (after the simulator's start)")
    sys.stdout.flush()
    ready = _wait_ready(url, watch, supervisor, not args.no_simulator, args.ready_timeout, data,
                        started_s)
    elapsed = time.monotonic() - t0
    print(f"{'ready' if ready else 'NOT READY'} in {elapsed:.1f} s"
          + ("" if ready else f" — see the logs in {data / 'logs'}"), flush=True)

    deadline = time.monotonic() + args.duration if args.duration else None
    live = None
    if sys.stdout.isatty() and not args.plain:
        from rich.live import Live

        live = Live(render(watch, supervisor, f"CityGrid {url}"), refresh_per_second=1,
                    screen=False)
        live.start()
    try:
        next_line = time.monotonic()
        while not stop.wait(1.0):
            supervisor.check()
            if live is not None:
                live.update(render(watch, supervisor, f"CityGrid {url}"))
            elif time.monotonic() >= next_line:
                print(watch.line(), flush=True)
                for _, message in list(supervisor.events):
                    print("  " + message, flush=True)
                supervisor.events.clear()
                next_line = time.monotonic() + args.report_every
            if deadline and time.monotonic() > deadline:
                break
    finally:
        if live is not None:
            live.stop()
        print("stopping …", flush=True)
        supervisor.stop(STOP_ORDER)
        watch.stop()
    print(f"stopped; the city's state is kept in {data} (run `citygrid up` again to go on)")
    return 0


def add_parser(sub, common: argparse.ArgumentParser, handler) -> None:
    p = sub.add_parser("up", parents=[common], help="the whole city on this machine",
                       description="Broker, ingest, rules with billing, gateway with the status "
                       "page, and a simulated fleet — each its own supervised process.")
    p.add_argument("--streetlights", type=int, default=300, help="for a new fleet (300)")
    p.add_argument("--meters", type=int, default=100, help="for a new fleet (100)")
    p.add_argument("--speed", type=float, default=60.0, help="simulated time speed-up (60)")
    p.add_argument("--interval", type=float, help="simulated seconds between a device's "
                   "readings (default: what the broker carries comfortably)")
    p.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                   help="Mosquitto when installed (auto), or the embedded amqtt broker")
    p.add_argument("--broker-port", type=int, help="default 1883, or the next free port")
    p.add_argument("--port", type=int, help="the gateway's port: 8000, or the next free one")
    p.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--no-simulator", action="store_true",
                   help="the platform alone, ready for real devices")
    p.add_argument("--plain", action="store_true", help="a line of figures now and then "
                   "instead of the live view (automatic when not on a terminal)")
    p.add_argument("--report-every", type=float, default=5.0, help="seconds between lines")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.set_defaults(func=handler)
