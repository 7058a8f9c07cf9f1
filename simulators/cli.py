"""``citygrid fleet generate`` and ``citygrid simulate``."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from datetime import datetime

from citygrid.city import city as city_profile
from citygrid.clock import iso_time
from citygrid.fleet import Fleet, FleetError
from citygrid.settings import Settings
from simulators.devices import FAULTS, INJECTED_FAULTS

log = logging.getLogger("citygrid.simulate")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``14h``, ``2d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 14h, 2d")
    return float(match[1]) * _UNITS[match[2] or "s"]


def fault_rate(text: str) -> tuple[str, float]:
    name, _, rate = text.partition("=")
    if name not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    try:
        value = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate must be a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate is a probability, 0…1")
    return name, value


def injection(text: str):
    from simulators.engine import Injection

    try:
        return Injection.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("fleet", help="the city's device inventory (GeoJSON)")
    fsub = p.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND")
    g = fsub.add_parser("generate", help="generate a city fleet as GeoJSON")
    g.add_argument("--city", default="copenhagen")
    g.add_argument("--streetlights", type=int, default=300)
    g.add_argument("--meters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("-o", "--output", help="write here instead of standard output")
    g.set_defaults(func=cmd_fleet_generate)

    s = sub.add_parser("simulate", parents=[common], help="simulated streetlights and meters",
                       description="Devices that behave like real ones on the wire. Faults: "
                       + ", ".join(FAULTS) + " (rate = chance per reading).")
    s.add_argument("--fleet", help="GeoJSON fleet file (CITYGRID_FLEET); else generated")
    s.add_argument("--registry", action="store_true",
                   help="simulate the registry's devices (in the data directory) that speak "
                        "the contract, instead of a fleet file or a generated city")
    s.add_argument("--city", default=None, help="city profile (CITYGRID_CITY, copenhagen)")
    s.add_argument("--streetlights", type=int, default=300)
    s.add_argument("--meters", type=int, default=100)
    s.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    s.add_argument("--start", type=iso_time, help="simulated start (ISO with offset); an "
                   "accelerated run defaults to far enough back never to pass the wall clock")
    s.add_argument("--duration", type=duration, help="simulated time to run: 90s, 15m, 14h")
    s.add_argument("--interval", type=duration, default=60.0,
                   help="simulated time between a device's readings (60s)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--mode", choices=("multiplexed", "per-device"), default="multiplexed",
                   help="one connection per device (own client id and Last Will), or many "
                   "devices per connection")
    s.add_argument("--devices-per-connection", type=int, default=1000)
    s.add_argument("--protocol", choices=("5", "3.1.1"), default=None,
                   help="the MQTT version the devices speak (CITYGRID_MQTT_PROTOCOL, 5)")
    s.add_argument("--fault", type=fault_rate, action="append", default=[],
                   metavar="NAME=RATE", help="inject a fault, e.g. --fault lamp_failure=0.001")
    s.add_argument("--inject", type=injection, action="append", default=[],
                   metavar="NAME:TARGET@+OFFSET[/DURATION]",
                   help="inject a fault on a device (a cabinet's lights for cabinet_outage) "
                   "that long after the start, for a while: e.g. lamp_failure:sl-00012@+2m, "
                   "cabinet_outage:cab-indre-by-03@+5m/30m; faults: "
                   + ", ".join(INJECTED_FAULTS))
    s.add_argument("--state", metavar="FILE", help="keep the clock and the devices' registers "
                   "here and go on from them at the next start (as `citygrid up` does)")
    s.add_argument("--report-every", type=float, default=5.0, help="seconds between rate lines")
    s.set_defaults(func=cmd_simulate)


def cmd_fleet_generate(args: argparse.Namespace) -> int:
    from simulators.fleetgen import generate

    fleet = generate(city_profile(args.city), args.streetlights, args.meters, args.seed)
    text = fleet.dump(args.output)
    if not args.output:
        sys.stdout.write(text + "\n")
    else:
        print(f"wrote {len(fleet)} devices to {args.output}", file=sys.stderr)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import signal

    from simulators.engine import Engine, SimConfig
    from simulators.fleetgen import generate

    settings = Settings.from_env(mqtt_url=args.mqtt_url, data_dir=args.data_dir,
                                 fleet=args.fleet, city=args.city)
    profile = city_profile(settings.city)
    try:
        if args.registry:
            from citygrid.registry import Registry

            fleet = Fleet(d for d in Registry(settings.data_dir).fleet()
                          if d.device_profile is None)  # profiled devices speak their own
        else:
            fleet = (Fleet.load(settings.fleet) if settings.fleet else
                     generate(profile, args.streetlights, args.meters, args.seed))
    except FleetError as e:
        print(f"citygrid simulate: {e}", file=sys.stderr)
        return 2
    config = SimConfig(speed=args.speed, start_ms=args.start, duration_s=args.duration,
                       interval_s=args.interval, seed=args.seed, mode=args.mode,
                       devices_per_connection=args.devices_per_connection,
                       faults=dict(args.fault), report_every_s=args.report_every,
                       protocol=args.protocol or settings.mqtt_protocol, state_path=args.state,
                       inject=args.inject)
    try:
        engine = Engine(settings.mqtt, fleet, profile, config)
    except ValueError as e:  # an injection on a device or cabinet the fleet has not
        print(f"citygrid simulate: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: engine.stop())
    log.info("simulating %d devices from %s at %g× (interval %gs); clock: simulated %d ms "
             "at wall %d ms", len(fleet),
             datetime.fromtimestamp(engine.clock.start_ms / 1000, profile.tz).isoformat(
                 timespec="minutes"), config.speed, config.interval_s,
             engine.clock.start_ms, int(engine.clock.epoch0_ms))
    engine.connect()
    stats = engine.run()
    log.info("done: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return 0
