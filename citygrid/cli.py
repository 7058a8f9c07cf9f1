"""The ``citygrid`` command: one entry point, a subcommand per service or tool."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

from citygrid.settings import Settings, SettingsError


def _settings_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings (flags win over CITYGRID_* environment variables)")
    g.add_argument("--mqtt-url", help="CITYGRID_MQTT_URL, mqtt://[user:pass@]host:port")
    g.add_argument("--influx-url", help="CITYGRID_INFLUX_URL; empty = embedded SQLite store")
    g.add_argument("--influx-db", help="CITYGRID_INFLUX_DB (default citygrid)")
    g.add_argument("--data-dir", help="CITYGRID_DATA_DIR (default ./.citygrid)")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(mqtt_url=args.mqtt_url, influx_url=args.influx_url,
                             influx_db=args.influx_db, data_dir=args.data_dir)


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


# --------------------------------------------------------------------------- ingest


def cmd_ingest(args: argparse.Namespace) -> int:
    from citygrid.store import open_store
    from ingest.service import IngestConfig, IngestService

    settings = _settings(args)
    config = IngestConfig(
        client_id=args.client_id, group=args.group, batch_size=args.batch_size,
        flush_interval_s=args.flush_interval, receive_maximum=args.receive_maximum,
        report_interval_s=args.report_interval, metrics_port=args.metrics_port,
        **({"topic": args.topic} if args.topic else {}),
    )
    service = IngestService(settings, open_store(settings), config)
    stop = threading.Event()
    _stop_on_signals(stop)
    service.start(timeout_s=None)
    # Each reading makes a few short-lived containers while a batch keeps thousands alive:
    # the default collector thresholds spent ~40% of ingest's per-message time scanning them.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    logging.getLogger("citygrid.ingest").info(
        "ingest running: %s → %s (batch %d, flush %.2fs, receive maximum %d)",
        settings.mqtt, service.store, config.batch_size, config.flush_interval_s,
        config.receive_maximum)
    try:
        stop.wait()
    finally:
        service.stop()
    return 0


def cmd_ingest_dlq(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest.deadletter import DeadLetterStore

    settings = _settings(args)
    path = Path(settings.data_dir) / "ingest.sqlite"
    if not path.exists():
        print(f"no dead letters: {path} does not exist yet")
        return 0
    store = DeadLetterStore(path)
    counts = store.counts()
    print("dead letters by reason (all time): " +
          (", ".join(f"{r}={n}" for r, n in sorted(counts.items())) or "none"))
    for d in store.latest(args.limit, args.reason):
        when = datetime.fromtimestamp(d.at_ms / 1000, UTC).isoformat(timespec="seconds")
        payload = d.payload[:120].decode("utf-8", "replace")
        print(f"{when}  {d.reason:<15} {d.topic}\n    {d.detail}\n    payload: {payload}")
    return 0


# --------------------------------------------------------------------------- contract


def cmd_contract_asyncapi(args: argparse.Namespace) -> int:
    from citygrid import asyncapi

    sys.stdout.write(asyncapi.render())
    return 0


# --------------------------------------------------------------------------- dashboards


def cmd_dashboards_build(args: argparse.Namespace) -> int:
    from dashboards.build import build

    for path in build():
        print(f"wrote {path}")
    return 0


def cmd_dashboards_push(args: argparse.Namespace) -> int:
    from dashboards.push import push

    for line in push(args.url, args.token, args.influx_url, args.influx_db, args.influx_token):
        print(line)
    return 0


# --------------------------------------------------------------------------- backup


def cmd_backup(args: argparse.Namespace) -> int:
    from citygrid import backup

    settings = _settings(args)
    try:
        if args.backup_command == "create":
            m = backup.create(settings.data_dir, args.dir)
        else:
            m = backup.restore(args.dir, settings.data_dir, force=args.force)
    except backup.BackupError as e:
        print(f"citygrid backup {args.backup_command}: {e}", file=sys.stderr)
        return 1
    ledger = m.get("ledger")
    verb = "backed up" if args.backup_command == "create" else "restored"
    print(f"{verb} {', '.join(m['files'])}"
          + (f"; ledger ok: {ledger['entries']} entries, head {ledger['head']}" if ledger
             else ""))
    return 0


# --------------------------------------------------------------------------- store


def cmd_store_init(args: argparse.Namespace) -> int:
    from citygrid.store import StoreError, open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        if hasattr(store, "ensure_lifecycle"):  # InfluxDB: say what changed
            store.query(f'CREATE DATABASE "{store.database}"')
            done = store.ensure_lifecycle()
        else:
            store.ensure_ready()
            done = []
        if hasattr(store, "maintain"):
            done += [f"{k}: {v}" for k, v in store.maintain().items() if v]
    except StoreError as e:
        print(f"citygrid store init: {e}", file=sys.stderr)
        return 1
    lc = settings.lifecycle
    print(f"{store}: raw readings {lc.raw_hours} h, hourly rollups {lc.rollup_hours} h, "
          f"long view beyond {lc.horizon_hours} h")
    for line in done or ["already as configured"]:
        print(f"  {line}")
    return 0


def cmd_store_rollup(args: argparse.Namespace) -> int:
    from citygrid.store import open_store
    from simulators.cli import iso_time

    store = open_store(_settings(args))
    if not hasattr(store, "rollup"):
        print("citygrid store rollup: the embedded store rolls up in `store init` and ingest",
              file=sys.stderr)
        return 2
    store.rollup(iso_time(args.start), iso_time(args.end))
    print(f"rolled up {args.start} … {args.end}")
    return 0


# --------------------------------------------------------------------------- up


def cmd_up(args: argparse.Namespace) -> int:
    from citygrid.up import run_up

    return run_up(_settings(args), args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = _settings_flags()
    parser = argparse.ArgumentParser(prog="citygrid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", parents=[common], help="MQTT → store pipeline")
    p.add_argument("--group", help="shared-subscription group: workers in one group split load")
    p.add_argument("--client-id", default="citygrid-ingest",
                   help="MQTT client id; the persistent session is keyed by it")
    p.add_argument("--topic", help="topic filter (default city/v1/+/+/+/telemetry)")
    p.add_argument("--batch-size", type=int, default=5000, help="lines per write (5000)")
    p.add_argument("--flush-interval", type=float, default=0.2,
                   help="seconds a partial batch may wait (0.2)")
    p.add_argument("--receive-maximum", type=int, default=10_000,
                   help="unacknowledged messages the broker may send us (10000, max 65535)")
    p.add_argument("--report-interval", type=float, default=10.0,
                   help="seconds between self-reports into citygrid_ingest (10)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.set_defaults(func=cmd_ingest)
    ingest_sub = p.add_subparsers(dest="ingest_command", metavar="SUBCOMMAND")
    d = ingest_sub.add_parser("dlq", parents=[common], help="show the latest dead letters")
    d.add_argument("--limit", type=int, default=20)
    d.add_argument("--reason", help="only this reason, e.g. out_of_range")
    d.set_defaults(func=cmd_ingest_dlq)

    p = sub.add_parser("contract", help="the device contract")
    csub = p.add_subparsers(dest="contract_command", required=True, metavar="SUBCOMMAND")
    a = csub.add_parser("asyncapi", help="print the AsyncAPI 3 document of MQTT contract v1")
    a.set_defaults(func=cmd_contract_asyncapi)

    from billing.cli import add_parsers as add_ledger_parsers
    from rules.cli import add_parsers as add_rules_parsers
    from simulators.cli import add_parsers as add_simulator_parsers

    add_simulator_parsers(sub, common)
    add_rules_parsers(sub, common)
    add_ledger_parsers(sub, common)
    d = sub.add_parser("dashboards", help="Grafana dashboards built from code")
    dsub = d.add_subparsers(dest="dashboards_command", required=True, metavar="SUBCOMMAND")
    b = dsub.add_parser("build", help="regenerate dashboards/json from dashboards/build.py")
    b.set_defaults(func=cmd_dashboards_build)
    pu = dsub.add_parser("push", help="upload the datasource and dashboards to a Grafana")
    pu.add_argument("--url", required=True, help="Grafana base URL")
    pu.add_argument("--token", required=True, help="a Grafana service-account token")
    pu.add_argument("--influx-url", required=True, help="InfluxDB URL as Grafana reaches it")
    pu.add_argument("--influx-db", default="citygrid")
    pu.add_argument("--influx-token", help="for InfluxDB 2.x/3 Core (v1 API)")
    pu.set_defaults(func=cmd_dashboards_push)

    from gateway.cli import add_parsers as add_gateway_parsers

    add_gateway_parsers(sub, common)

    from citygrid.up import add_parser as add_up_parser

    add_up_parser(sub, common, cmd_up)

    st = sub.add_parser("store", help="the telemetry store: retention and rollups")
    stsub = st.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    si = stsub.add_parser("init", parents=[common], help="create the database, retention "
                          "policies and continuous queries (idempotent; ingest does it too)")
    si.set_defaults(func=cmd_store_init)
    sr = stsub.add_parser("rollup", parents=[common], help="roll up a past range now (InfluxDB)")
    sr.add_argument("--from", dest="start", required=True, help="ISO time with offset")
    sr.add_argument("--to", dest="end", required=True, help="ISO time with offset")
    sr.set_defaults(func=cmd_store_rollup)

    b = sub.add_parser("backup", help="consistent copies of the state databases")
    bsub = b.add_subparsers(dest="backup_command", required=True, metavar="SUBCOMMAND")
    bc = bsub.add_parser("create", parents=[common], help="back up the state databases "
                         "(registry, rule state, billing and ledger, ingest) into DIR")
    bc.add_argument("dir")
    bc.set_defaults(func=cmd_backup)
    br = bsub.add_parser("restore", parents=[common], help="check a backup and restore it")
    br.add_argument("dir")
    br.add_argument("--force", action="store_true", help="replace existing databases (stop "
                    "the services first)")
    br.set_defaults(func=cmd_backup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per write is noise
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"citygrid: bad setting {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
