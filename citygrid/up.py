"""``citygrid up``: the platform on one machine, each service its own process.

For now: a private Mosquitto, ``citygrid ingest`` into the configured store
(embedded SQLite unless CITYGRID_INFLUX_URL is set) and ``citygrid simulate``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from citygrid.localservices import Mosquitto, free_port
from citygrid.settings import Settings
from citygrid.store import open_store


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_up(settings: Settings, args: argparse.Namespace) -> int:
    data = Path(settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = 1883 if _port_free(1883) else free_port()
    broker = Mosquitto(data / "mosquitto", port)
    broker.start()
    settings = settings.with_(mqtt_url=broker.url, data_dir=str(data))
    env = {**os.environ, **settings.as_env()}
    python = [sys.executable, "-m", "citygrid"]
    children: dict[str, subprocess.Popen] = {}
    logs = data / "logs"
    logs.mkdir(exist_ok=True)

    def spawn(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            children[name] = subprocess.Popen(python + argv, env=env, stdout=log,
                                              stderr=subprocess.STDOUT)

    fleet = Path(settings.fleet) if settings.fleet else data / "fleet.geojson"
    if not fleet.exists():
        from citygrid.city import city
        from simulators.fleetgen import generate

        generate(city(settings.city), args.streetlights, args.meters).dump(fleet)
    env["CITYGRID_FLEET"] = str(fleet)
    spawn("ingest", ["ingest", "--report-interval", "5"])
    spawn("rules", ["rules", "run"])
    print(f"broker  {broker.url}  (Mosquitto, data in {broker.dir})")
    print(f"store   {settings.influx_url or data / 'telemetry.sqlite'}")
    print(f"logs    {logs}")
    if args.no_simulator:
        reading = orjson.dumps({"ts": int(time.time() * 1000), "seq": 1, "brightness_pct": 40,
                                "power_w": 24, "energy_wh": 1, "lux": 3,
                                "motion": False}).decode()
        print(f"send a reading by hand:\n  mosquitto_pub -p {port} -q 1 -t "
              f"city/v1/norrebro/streetlight/sl-1/telemetry -m '{reading}'")
    else:
        spawn("simulate", ["simulate", "--interval", f"{args.interval}s",
                           "--speed", str(args.speed), "--mode", "per-device"])

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deadline = time.monotonic() + args.duration if args.duration else None
    store = open_store(settings)
    try:
        while not stop.wait(3.0):
            for name, child in children.items():
                if child.poll() is not None:
                    print(f"{name} exited with {child.returncode}; see {logs / (name + '.log')}")
                    stop.set()
            try:
                counts = {k: store.count(k) for k in ("streetlight", "meter")}
                rules_log = (logs / "rules.log").read_text(errors="replace")
                print(f"stored: {counts['streetlight']} streetlight and {counts['meter']} meter "
                      f"readings; alerts so far: {rules_log.count('ALERT ')}", flush=True)
            except Exception as e:  # the store may still be starting
                print(f"store not answering yet: {e}")
            if deadline and time.monotonic() > deadline:
                break
    finally:
        for child in children.values():
            child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
        broker.stop()
        store.close()
    print("stopped; state kept in", data)
    return 0
