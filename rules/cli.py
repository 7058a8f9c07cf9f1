"""``citygrid rules …``: run, check, schema, test, explain, backtest, status."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from citygrid.clock import iso_time
from citygrid.settings import Settings

log = logging.getLogger("citygrid.rules")


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("rules", help="the rule engine and tools for rule authors")
    rs = p.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")

    run = rs.add_parser("run", parents=[common], help="run the rules live on MQTT")
    run.add_argument("--rules", help="rule file or folder (CITYGRID_RULES; default: the "
                     "Copenhagen example)")
    run.add_argument("--fleet", help="fleet GeoJSON (CITYGRID_FLEET): where the lights stand")
    run.add_argument("--group", help="shared-subscription group for several rule workers")
    run.add_argument("--topic", help="telemetry filter, e.g. city/v1/norrebro/+/+/telemetry")
    run.add_argument("--client-id", default="citygrid-rules")
    run.set_defaults(func=cmd_run)

    check = rs.add_parser("check", help="check rule files: every error with file:line:column "
                          "(and publish actions the broker's ACL would drop)")
    check.add_argument("path")
    check.set_defaults(func=cmd_check)

    schema = rs.add_parser("schema", help="print the JSON Schema of a rule file")
    schema.set_defaults(func=cmd_schema)

    test = rs.add_parser("test", help="run YAML rule tests (readings in, commands out)")
    test.add_argument("files", nargs="+")
    test.set_defaults(func=cmd_test)

    explain = rs.add_parser("explain", parents=[common],
                            help="why is this light at its level?")
    explain.add_argument("device")
    explain.add_argument("--rules")
    explain.add_argument("--fleet")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=cmd_explain)

    status = rs.add_parser("status", parents=[common], help="rules with their health")
    status.add_argument("--rules")
    status.set_defaults(func=cmd_status)

    bt = rs.add_parser("backtest", parents=[common],
                       help="replay stored history through the rules")
    bt.add_argument("--from", dest="start", required=True, type=iso_time,
                    help="ISO time with offset")
    bt.add_argument("--to", dest="end", required=True, type=iso_time,
                    help="ISO time with offset")
    bt.add_argument("--rules")
    bt.add_argument("--fleet")
    bt.add_argument("--json", action="store_true", help="the report as JSON")
    bt.set_defaults(func=cmd_backtest)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(mqtt_url=getattr(args, "mqtt_url", None),
                             influx_url=getattr(args, "influx_url", None),
                             influx_db=getattr(args, "influx_db", None),
                             data_dir=getattr(args, "data_dir", None),
                             rules=getattr(args, "rules", None),
                             fleet=getattr(args, "fleet", None))


def _fleet(settings: Settings):
    """Where the lights stand, for the commands that only read: the fleet file when one is
    named, else the registry."""
    from citygrid.fleet import Fleet
    from citygrid.registry import FILENAME, Registry

    if settings.fleet:
        return Fleet.load(settings.fleet)
    if not (Path(settings.data_dir) / FILENAME).exists():
        raise SystemExit(f"citygrid rules: no devices: neither CITYGRID_FLEET (or --fleet) nor a "
                         f"registry in {settings.data_dir} (citygrid devices import|add)")
    return Registry(settings.data_dir).fleet()


def _inventory(settings: Settings):
    """The registry the engine follows, with CITYGRID_FLEET (if set) imported into it first
    (idempotently: the same file twice changes nothing)."""
    from billing import load_config
    from citygrid.fleet import Fleet, FleetError
    from citygrid.registry import Catalogue, Registry, RegistryError

    registry = Registry(settings.data_dir,
                        Catalogue(tariffs=frozenset(load_config(settings.billing).tariffs)))
    if settings.fleet:
        try:
            n = registry.import_fleet(Fleet.load(settings.fleet))
        except (FleetError, RegistryError) as e:
            raise SystemExit(f"citygrid rules: {settings.fleet}: not imported:\n{e}") from None
        log.info("imported %d devices from %s into the registry", n, settings.fleet)
    return registry


def _rules_path(settings: Settings) -> Path:
    from rules.loader import DEFAULT_RULES

    return Path(settings.rules) if settings.rules else DEFAULT_RULES


def cmd_check(args: argparse.Namespace) -> int:
    from rules.acl import acl_problems
    from rules.loader import RuleFileError, load

    ruleset, problems = None, []
    try:
        ruleset = load(args.path)
    except RuleFileError as e:
        problems = list(e.problems)
    problems += acl_problems(args.path)  # publishing where the broker drops it is an error
    if problems:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} error{'s' * (len(problems) != 1)}", file=sys.stderr)
        return 1
    print(f"ok: {len(ruleset.rules)} rules in {', '.join(ruleset.sources)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from rules.loader import schema

    print(json.dumps(schema(), indent=2))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from citygrid.casefiles import run_files
    from rules.loader import RuleFileError
    from rules.testing import run_file

    return run_files(args.files, run_file, (RuleFileError,), says="the rules do not load",
                     code=1)


def _engine_from_state(settings: Settings):
    from citygrid.city import city
    from rules.loader import load
    from rules.state import engine_from_state

    path = Path(settings.data_dir) / "rules.sqlite"
    if not path.exists():
        raise SystemExit(f"citygrid rules: no rule state at {path} (is `rules run` using "
                         "this CITYGRID_DATA_DIR?)")
    return engine_from_state(load(_rules_path(settings)), _fleet(settings),
                             city(settings.city), path)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def cmd_explain(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine_from_state(settings)
    if args.device not in engine.fleet.by_id:
        print(f"citygrid rules: no device {args.device!r} in the fleet", file=sys.stderr)
        return 2
    e = engine.explain(args.device)
    if args.json:
        print(json.dumps(e, indent=2))
        return 0
    print(f"{args.device} is at {e['level']:g} % ({e['reason']}) at {_when(e['at_ms'])} "
          "event time")
    floor = e["safety_floor"]
    print(f"safety floor: {floor['level']:g} % {'active' if floor['active'] else 'inactive'}"
          + (" — it lifted the level" if floor["applied"] else ""))
    if not e["wishes"]:
        print("no rule wants this light now: the default level applies")
    for w in e["wishes"]:
        mark = "→" if e["winner"] and w["key"] == e["winner"]["key"] else " "
        expiry = (f"expires in {w['expires_in_s']:.0f} s" if w["expires_in_s"] is not None
                  else "until its condition clears")
        print(f" {mark} {w['class']:<8} {w['level']:>5g} %  {w['reason']:<28} {expiry}"
              f"  (since {_when(w['since_ms'])}, {w['key']})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rules.loader import load
    from rules.state import RuleHealthRow, read_health, read_reload_error

    settings = _settings(args)
    ruleset = load(_rules_path(settings))
    health = read_health(settings.data_dir)  # read-only; empty before `rules run` saved any
    error = read_reload_error(settings.data_dir)
    if error:
        print(f"LAST RELOAD REFUSED (the previous rules are running):\n{error}\n")
    print(f"{'rule':<24} {'evaluations':>11} {'fired':>7} {'last fired':<26} errors")
    for r in ruleset.rules:
        h = health.get(r.id) or RuleHealthRow(r.id, 0, 0, None, 0, None)
        print(f"{r.id:<24} {h.evaluations:>11} {h.fired:>7} {_when(h.last_fired_ms):<26} "
              f"{h.errors}" + (f"  last: {h.last_error}" if h.last_error else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from citygrid.city import city
    from citygrid.contract import topic_filter
    from citygrid.store import StoreUnavailable, open_store
    from rules.runner import RuleRunner, RunnerConfig

    settings = _settings(args)
    config = RunnerConfig(_rules_path(settings), args.topic or topic_filter(), args.group,
                          args.client_id)
    store = open_store(settings)
    try:
        store.ensure_ready()
    except StoreUnavailable as e:
        log.warning("store not ready (lighting figures will be retried): %s", e)
    inventory = _inventory(settings)
    fleet = inventory.fleet()
    if not len(fleet):
        log.warning("the registry in %s has no devices yet: the engine takes them as they are "
                    "added (citygrid devices add|import)", settings.data_dir)
    runner = RuleRunner(settings, fleet, city(settings.city), store, config, inventory=inventory)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runner.start(timeout_s=None)
    import gc

    # The fleet and the compiled rules live forever: keep the collector off them. (Unlike
    # ingest, the default thresholds suit the engine: raising them made each young-generation
    # collection scan ~1M objects, a 15–20 ms pause every second — bench/rules.py p99.)
    gc.freeze()
    _watch_gc()
    log.info("rules running: %d rules from %s, %d devices", len(runner.ruleset.rules),
             config.rules_path, len(runner.fleet))
    try:
        stop.wait()
    finally:
        runner.stop()
    return 0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def cmd_backtest(args: argparse.Namespace) -> int:
    from citygrid.city import city
    from citygrid.store import open_store
    from rules.backtest import backtest

    settings = _settings(args)
    start, end = args.start, args.end
    store = open_store(settings)
    started = time.monotonic()
    report = backtest(store, _rules_path(settings), _fleet(settings), city(settings.city),
                      start, end, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"\nreplayed {report['readings']:,} readings from {_iso(start)} to {_iso(end)} "
          f"in {time.monotonic() - started:.1f} s")
    print(f"commands the rules would have issued: {report['commands']:,}")
    for reason, n in sorted(report["commands_by_reason"].items(), key=lambda x: -x[1]):
        print(f"  {reason:<28} {n:,}")
    print(f"lighting energy: {report['energy_kwh']:.2f} kWh against {report['baseline_kwh']:.2f}"
          f" kWh for 100 % all night: {report['saved_pct']:.1f} % saved, "
          f"{report['co2_avoided_kg']:.2f} kg CO2 avoided")
    print(f"alerts raised: {report['alerts']}")
    return 0


def _watch_gc(threshold_ms: float = 100.0) -> None:
    """Log collections that hold the engine up for longer than ``threshold_ms``: a full
    collection over a big fleet's state is the one pause the engine cannot avoid by design."""
    import gc
    import time

    started: list[float] = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif (took := (time.perf_counter() - started[0]) * 1000) > threshold_ms:
            log.warning("garbage collection of generation %d held the engine for %.0f ms "
                        "(%d collected)", info["generation"], took, info["collected"])

    gc.callbacks.append(callback)
