"""``citygrid rules …``: run, check, schema, test, explain, backtest, status; and ``citygrid
calendar show`` (the lighting calendar's programs for a day, rules/calendar.py).

``rules run --workers N`` (N > 1) is a supervisor: N worker processes (``rules run --worker
i/N --districts …``, each a RuleRunner with its own MQTT session), each owning every N-th of
the registry's sorted districts (rules.runner.partition). It restarts a worker that dies (with
backoff), gives up with exit status 1 when they keep dying, stops them all on SIGTERM/SIGINT,
and follows the registry: when a district appears or goes, or a device moves to another
worker's district, the workers whose share changed are stopped (their state saved) and started
again with the new share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
    run.add_argument("--client-id", default=None,
                     help="MQTT client id (default citygrid-rules; with --partition "
                          "citygrid-rules-p<I>of<N>)")
    run.add_argument("--workers", type=_positive, default=1,
                     help="engine processes, each owning a share of the districts (default 1)")
    run.add_argument("--partition", metavar="I/N",
                     help="run the districts of partition I of N only (0/3, 1/3, 2/3: three "
                          "engines, on one host or several; docs/scale-out.md)")
    # A worker of `--workers N`, started by its supervisor: which one, and its districts.
    run.add_argument("--worker", help=argparse.SUPPRESS)
    run.add_argument("--districts", help=argparse.SUPPRESS)
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

    cal = sub.add_parser("calendar", help="lighting calendars: which program the lights get")
    cs = cal.add_subparsers(dest="calendar_command", required=True, metavar="SUBCOMMAND")
    show = cs.add_parser("show", parents=[common],
                         help="what each group of lights gets on a day, steps at local times")
    show.add_argument("--date", type=_day, help="YYYY-MM-DD (default: today, the city's time)")
    show.add_argument("--rules", help="rule file or folder (CITYGRID_RULES; default: the "
                      "Copenhagen example)")
    show.add_argument("--fleet", help="fleet GeoJSON (CITYGRID_FLEET; default: the registry, "
                      "if there is one): how many lights each entry wins")
    show.set_defaults(func=cmd_calendar_show)


def _day(text: str):
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-12-24") from None


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


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
    from citygrid import lamps
    from citygrid.fleet import Fleet, FleetError
    from citygrid.registry import Catalogue, Registry, RegistryError

    registry = Registry(settings.data_dir,
                        Catalogue(tariffs=frozenset(load_config(settings.billing).tariffs),
                                  lamp_types=frozenset(lamps.load(settings.lamp_types))))
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
    _print_calendar(e.get("calendar"))
    if not e["wishes"]:
        print("no rule wants this light now: the default level applies")
    for w in e["wishes"]:
        mark = "→" if e["winner"] and w["key"] == e["winner"]["key"] else " "
        expiry = (f"expires in {w['expires_in_s']:.0f} s" if w["expires_in_s"] is not None
                  else "until the calendar's next step" if w["key"].startswith("calendar@")
                  else "until its condition clears")
        print(f" {mark} {w['class']:<8} {w['level']:>5g} %  {w['reason']:<28} {expiry}"
              f"  (since {_when(w['since_ms'])}, {w['key']})")
    return 0


def _print_calendar(c: dict | None) -> None:
    if c is None:
        return
    if c["entry"] is None:
        print(f"calendar: no entry takes this light on the lighting day {c['day']}")
        return
    program = "an inline program" if c["inline"] else f"program {c['program']}"
    print(f"calendar: entry {c['entry']}, {program} ({c['reason']}) on the lighting day "
          f"{c['day']}" + (f", {c['holiday']}" if c["holiday"] else "")
          + f": {c['level']:g} % now")
    for s in c["steps"]:
        print(f"   {'→' if s['in_force'] else ' '} {s['time']}  {s['level']:>5g} %  ({s['at']})")


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
    if getattr(args, "partition", None):
        from citygrid.partition import Partition

        try:
            args.partition = Partition.parse(args.partition)
        except ValueError as e:
            raise SystemExit(f"citygrid rules run: {e}") from None
        if args.workers > 1 or args.topic:
            raise SystemExit("citygrid rules run: --partition goes with neither --workers nor "
                             "--topic (a partition subscribes to its own districts)")
    if getattr(args, "client_id", None) is None and not getattr(args, "partition", None):
        args.client_id = "citygrid-rules"
    if getattr(args, "workers", 1) > 1 and not getattr(args, "worker", None):
        if args.topic:
            raise SystemExit("citygrid rules run: --topic and --workers do not go together "
                             "(each worker subscribes to its own districts' topics)")
        return _supervise(args, _settings(args), args.workers)
    return _run_one(args)


def _run_one(args: argparse.Namespace) -> int:
    """One engine: all districts, or (``--worker``) the share its supervisor gave it."""
    from citygrid.city import city
    from citygrid.contract import topic_filter
    from citygrid.store import StoreUnavailable, open_store
    from rules.runner import RuleRunner, RunnerConfig
    from rules.state import RUNNING_META

    settings = _settings(args)
    worker = getattr(args, "worker", None)
    partition = getattr(args, "partition", None)
    districts = None
    if worker and args.districts is not None:
        districts = frozenset(d for d in args.districts.split(",") if d)
    name = (f"w{worker.split('/')[0]}" if worker else
            f"p{partition.index}of{partition.count}" if partition else None)
    client_id = args.client_id or ("citygrid-rules" if partition is None else
                                   f"citygrid-rules-{name}")
    config = RunnerConfig(_rules_path(settings), args.topic or topic_filter(), args.group,
                          client_id, districts=districts, worker=name, partition=partition)
    if args.group and not worker:  # a broker that drops $share would lose every reading
        from citygrid import wire

        if why := wire.group_refusal(settings.mqtt, args.group, client_id):
            raise SystemExit(f"citygrid rules run: {why}")
    store = open_store(settings)
    try:
        store.ensure_ready()
    except StoreUnavailable as e:
        log.warning("store not ready (lighting figures will be retried): %s", e)
    # A worker's supervisor imported the fleet file into the registry already.
    inventory = _inventory(settings.with_(fleet=None) if worker else settings)
    fleet = inventory.fleet()
    if not len(fleet):
        log.warning("the registry in %s has no devices yet: the engine takes them as they are "
                    "added (citygrid devices add|import)", settings.data_dir)
    runner = RuleRunner(settings, fleet, city(settings.city), store, config, inventory=inventory)
    if partition is not None:
        log.info("partition %s: districts %s", partition,
                 ", ".join(sorted(runner.owned or ())) or "none yet (taken as they are added)")
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
    share = ""
    if worker:
        share = (f" (worker {worker}, {config.client_id}: districts "
                 f"{', '.join(sorted(districts)) if districts is not None else 'all'})")
    log.info("rules running%s: %d rules from %s, %d devices", share, len(runner.ruleset.rules),
             config.rules_path, len(runner.fleet))
    # Subscribed: readings from now on reach the rules (`citygrid up` waits for every worker).
    runner.state.set_meta(f"{RUNNING_META}{config.client_id}", f"{time.time():.3f}")
    try:
        parent = os.getppid()
        while not stop.wait(1.0):
            if worker and os.getppid() != parent:  # the supervisor is gone: so are we
                log.warning("the rules supervisor is gone; stopping")
                break
            if runner.repartition.is_set():  # districts joined or left this partition
                runner.stop()  # its state saved, its session kept
                runner = RuleRunner(settings, inventory.fleet(), city(settings.city), store,
                                    config, inventory=inventory)
                runner.start(timeout_s=None)
    finally:
        runner.stop()
    return 0


# ------------------------------------------------------------------ the workers' supervisor

QUICK_S = 60.0  # a worker that dies sooner than this after its start counts as failing
GIVE_UP_AFTER = 5  # quick deaths in a row of one worker: the supervisor gives up
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child, between fork and exec
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    count: int
    client_id: str
    districts: tuple[str, ...] | None  # None: all of them (the only worker)
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0  # quick deaths in a row
    next_start: float | None = None  # dead: when it starts again


def _assignment(fleet, workers: int) -> list[tuple[str, ...] | None]:
    """Each worker's districts; fewer workers than districts make no sense, and a single one
    owns all (districts to come, too)."""
    from rules.runner import partition

    districts = {d.district for d in fleet}
    n = max(1, min(workers, len(districts)))
    return [None] if n == 1 else list(partition(districts, n))


def _owners(fleet, assignment: list[tuple[str, ...] | None]) -> dict[str, int]:
    by_district = {d: i for i, ds in enumerate(assignment) if ds is not None for d in ds}
    return {d.device_id: by_district.get(d.district, 0) for d in fleet}


class _Workers:
    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args, self.settings = args, settings
        env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
        env.pop("CITYGRID_FLEET", None)  # imported into the registry by us, once
        self.env = env
        self.workers: list[_Worker] = []
        self.failed = False

    def _argv(self, w: _Worker) -> list[str]:
        argv = [sys.executable, "-m", "cityctl", "rules", "run", "--worker",
                f"{w.index}/{w.count}", "--client-id", w.client_id,
                "--log-level", getattr(self.args, "log_level", None) or "INFO"]
        if w.districts is not None:
            argv += ["--districts", ",".join(w.districts)]
        if self.args.group:
            argv += ["--group", self.args.group]
        return argv

    def _spawn(self, w: _Worker) -> None:
        w.process = subprocess.Popen(self._argv(w), env=self.env, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        w.started_at, w.next_start = time.monotonic(), None
        share = "every district" if w.districts is None else (
            f"{len(w.districts)} district{'s' * (len(w.districts) != 1)}: "
            + ", ".join(w.districts))
        log.info("rules worker %d/%d (%s, pid %d) owns %s", w.index, w.count, w.client_id,
                 w.process.pid, share)

    def _stop(self, workers: list[_Worker], timeout_s: float = 20.0) -> None:
        """SIGTERM (each saves its state), then wait; SIGKILL what does not stop."""
        for w in workers:
            if w.process is not None and w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for w in workers:
            if w.process is None:
                continue
            try:
                w.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rules worker %d did not stop in %.0f s; killed", w.index, timeout_s)
                w.process.kill()
                w.process.wait()

    def assign(self, assignment: list[tuple[str, ...] | None], restart: set[int]) -> None:
        """Workers for ``assignment``: those whose share changed (or in ``restart``) are
        stopped first, all of them, then started with their new share — a district never has
        two engines at once."""
        count = len(assignment)
        old = {w.index: w for w in self.workers}
        moved = [w for w in self.workers if w.index >= count or w.count != count
                 or w.districts != assignment[w.index] or w.index in restart]
        self._stop(moved)
        again = {w.index for w in moved}
        for i in sorted(again):
            if i < count and assignment[i] is not None:
                # Its new districts' readings wait in its session from now on, not from
                # whenever it has started: the hand-over loses nothing but this moment.
                _presubscribe(self.settings, f"{self.args.client_id}-w{i}", assignment[i],
                              self.args.group)
        gone = [w for w in self.workers if w.index >= count]
        if gone:
            _retire(self.settings, [w.client_id for w in gone], [f"w{w.index}" for w in gone])
        workers = []
        for i, districts in enumerate(assignment):
            w = old.get(i)
            if w is None or i in again:
                w = _Worker(i, count, f"{self.args.client_id}-w{i}", districts)
                self._spawn(w)
            workers.append(w)
        if len(workers) > len(old):
            _record_sessions(self.settings, [w.client_id for w in workers])
        self.workers = workers

    def check(self) -> None:
        """Restart what died, with backoff: 1 s, 2 s, 4 s … 30 s; a run of a minute resets
        it; a worker that keeps dying makes the supervisor give up."""
        now = time.monotonic()
        for w in self.workers:
            if w.process is None or w.process.poll() is None:
                continue
            if w.next_start is None:  # just noticed
                quick = now - w.started_at < QUICK_S
                w.failures = w.failures + 1 if quick else 0
                if w.failures >= GIVE_UP_AFTER:
                    log.error("rules worker %d died %d times in a row within %.0f s of its "
                              "start; giving up", w.index, w.failures, QUICK_S)
                    self.failed = True
                    return
                delay = min(30.0, 2.0 ** max(0, w.failures - 1)) if quick else 1.0
                w.next_start = now + delay
                log.warning("rules worker %d exited with %s; restarting in %.0f s", w.index,
                            w.process.returncode, delay)
            elif now >= w.next_start:
                self._spawn(w)

    def stop(self) -> None:
        self._stop(self.workers)


def _presubscribe(settings: Settings, client_id: str, districts: tuple[str, ...],
                  group: str | None) -> None:
    """Subscribe a (stopped) worker's session to its districts' topics: a connection of a
    moment, acknowledging nothing (what it is sent goes to the worker again)."""
    from citygrid import wire
    from rules.runner import SESSION_EXPIRY_S, share_filters

    client = wire.Client(settings.mqtt, client_id, clean_start=False,
                         session_expiry_s=SESSION_EXPIRY_S,
                         subscriptions=share_filters(districts, group), connect_timeout_s=5.0)
    try:
        deadline = time.monotonic() + 5.0
        while not client.subscribed.is_set() and time.monotonic() < deadline:
            client.loop(0.1)
        if not client.subscribed.is_set():
            log.warning("could not subscribe %s to its new districts ahead of its start: %s",
                        client_id, client.last_error)
    finally:
        client.stop()


def _forget_sessions(settings: Settings, client_ids: list[str]) -> None:
    """End the broker sessions of workers there are no more of: they would hold messages
    for nobody until they expire."""
    from citygrid import wire

    for client_id in client_ids:
        client = wire.Client(settings.mqtt, client_id, clean_start=True, session_expiry_s=0,
                             connect_timeout_s=5.0)
        try:
            client.loop(1.0)
            if client.connected.is_set():
                log.info("ended the MQTT session of %s (no such worker any more)", client_id)
        finally:
            client.stop()


def _retire(settings: Settings, client_ids: list[str], names: list[str]) -> None:
    """Workers there are no more of: their sessions end, their health counts go."""
    from rules.state import RuleStateStore

    _forget_sessions(settings, client_ids)
    state = RuleStateStore(Path(settings.data_dir) / "rules.sqlite")
    try:
        for client_id in client_ids:
            state.execute("DELETE FROM rule_meta WHERE key = ?",
                          (f"mqtt_subscriptions:{client_id}",))
        for name in names:
            state.execute("DELETE FROM rule_health_workers WHERE worker = ?", (name,))
        before = json.loads(state.meta("worker_sessions") or "[]")
        state.set_meta("worker_sessions",
                       json.dumps(sorted(set(before) - set(client_ids))))
    finally:
        state.close()


def _record_sessions(settings: Settings, client_ids: list[str]) -> None:
    from rules.state import RuleStateStore

    state = RuleStateStore(Path(settings.data_dir) / "rules.sqlite")
    try:
        before = json.loads(state.meta("worker_sessions") or "[]")
        state.set_meta("worker_sessions", json.dumps(sorted(set(before) | set(client_ids))))
    finally:
        state.close()


def _prepare_state(settings: Settings, workers: list[str]) -> None:
    """Create the shared state files before the workers open them at once, start the health
    counts of this set of workers afresh, and end the sessions of workers gone since the
    last run."""
    from billing import BillingStore, load_config
    from citygrid.city import city
    from rules.state import RuleStateStore

    data = Path(settings.data_dir)
    BillingStore(data / "billing.sqlite", load_config(settings.billing), None,
                 city(settings.city).tz).close()
    state = RuleStateStore(data / "rules.sqlite")
    try:
        state.forget_workers()
        before = json.loads(state.meta("worker_sessions") or "[]")
        gone = [c for c in before if c not in workers]
        if gone:
            _forget_sessions(settings, gone)
            for c in gone:
                state.execute("DELETE FROM rule_meta WHERE key = ?", (f"mqtt_subscriptions:{c}",))
        state.set_meta("worker_sessions", json.dumps(sorted(set(workers))))
    finally:
        state.close()


def _supervise(args: argparse.Namespace, settings: Settings, wanted: int) -> int:
    from citygrid.registry import Follower
    from rules.engine import partition_caveats
    from rules.loader import load

    settings = settings.with_(data_dir=str(Path(settings.data_dir).resolve()))
    if args.group:  # checked once here: its workers inherit the group
        from citygrid import wire

        if why := wire.group_refusal(settings.mqtt, args.group, args.client_id):
            raise SystemExit(f"citygrid rules run: {why}")
    ruleset = load(_rules_path(settings))  # a broken rule file: refused here, not N times
    inventory = _inventory(settings)
    follower = Follower(settings.data_dir, inventory)
    fleet = follower.changed()
    for caveat in partition_caveats(ruleset, fleet):
        log.warning("with the districts shared out, %s", caveat)
    assignment = _assignment(fleet, wanted)
    owners = _owners(fleet, assignment)
    _prepare_state(settings, [f"{args.client_id}-w{i}" for i in range(len(assignment))])
    workers = _Workers(args, settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workers.assign(assignment, set())
    log.info("rules supervising %d workers over %d districts (%s)", len(assignment),
             len({d.district for d in fleet}), settings.data_dir)
    last_look = time.monotonic()
    try:
        while not stop.wait(0.2):
            workers.check()
            if workers.failed:
                return 1
            if time.monotonic() - last_look < 1.0:
                continue
            last_look = time.monotonic()
            changed = follower.changed()
            if changed is None:
                continue
            new = _assignment(changed, wanted)
            new_owners = _owners(changed, new)
            # Devices that now belong to another worker (moved, or their district did): both
            # workers start again, so each holds (and saves) only what it owns, the billing
            # store of neither keeps a meter the other now bills.
            moved = {i for d, o in owners.items() if d in new_owners and new_owners[d] != o
                     for i in (o, new_owners[d])}
            if new != assignment or moved:
                which = sorted({i for i, ds in enumerate(new) if i >= len(assignment)
                                or ds != assignment[i]} | moved)
                log.info("the registry changed the districts' shares: restarting %s",
                         "all workers" if len(new) != len(assignment) else
                         "worker" + "s" * (len(which) != 1) + " "
                         + ", ".join(str(i) for i in which))
                workers.assign(new, moved)
            assignment, owners = new, new_owners
    finally:
        workers.stop()
        inventory.close()
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
    steps = report.get("calendar_steps") or []
    if steps:
        print(f"calendar steps: {len(steps)}")
        tz = city(settings.city).tz
        for s in steps:
            when = datetime.fromtimestamp(s["ts_ms"] / 1000, tz).strftime("%Y-%m-%d %H:%M")
            print(f"  {when}  {s['reason']:<40} {s['level']:>5g} %  on {s['lights']:,} "
                  f"light{'s' * (s['lights'] != 1)}")
    print(f"alerts raised: {report['alerts']}")
    return 0


def cmd_calendar_show(args: argparse.Namespace) -> int:
    from citygrid.city import city
    from citygrid.registry import FILENAME
    from rules.calendar import show
    from rules.loader import RuleFileError, load
    from rules.schedules import CityTime

    settings = _settings(args)
    profile = city(settings.city)
    try:
        ruleset = load(_rules_path(settings))
    except RuleFileError as e:
        print(e, file=sys.stderr)
        return 1
    fleet = None
    if settings.fleet or (Path(settings.data_dir) / FILENAME).exists():
        fleet = list(_fleet(settings))
    day = args.date or datetime.now(profile.tz).date()
    print(f"{', '.join(ruleset.sources)}:")
    print("\n".join(show(ruleset.calendar, CityTime(profile), day, fleet)))
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
