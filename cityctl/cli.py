"""The ``citygrid`` command: one entry point; each service adds its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from adapters import add_parsers as adapters_parsers
from billing import add_parsers as ledger_parsers
from cityctl.up import add_parser as add_up_parser
from cityctl.up import run_up
from citygrid.clock import iso_time
from citygrid.settings import Settings, SettingsError
from dashboards import add_parsers as dashboards_parsers
from gateway import add_parsers as gateway_parsers
from ingest import add_parsers as ingest_parsers
from rules import add_parsers as rules_parsers
from simulators import add_parsers as simulator_parsers


def _settings_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings (flags win over CITYGRID_* environment variables)")
    g.add_argument("--mqtt-url", help="CITYGRID_MQTT_URL, mqtt://[user:pass@]host:port"
                   "[,host:port…] (a cluster: every node, tried in turn)")
    g.add_argument("--influx-url", help="CITYGRID_INFLUX_URL; empty = embedded SQLite store")
    g.add_argument("--influx-db", help="CITYGRID_INFLUX_DB (default citygrid)")
    g.add_argument("--data-dir", help="CITYGRID_DATA_DIR (default ./.citygrid)")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(mqtt_url=args.mqtt_url, influx_url=args.influx_url,
                             influx_db=args.influx_db, data_dir=args.data_dir)


# --------------------------------------------------------------------------- contract


def cmd_contract_asyncapi(args: argparse.Namespace) -> int:
    from citygrid import asyncapi

    sys.stdout.write(asyncapi.render())
    return 0


# --------------------------------------------------------------------------- backup


def cmd_backup(args: argparse.Namespace) -> int:
    from cityctl import backup

    settings = _settings(args)
    try:
        if args.backup_command == "create":
            m = backup.create(settings.data_dir, args.dir)
        else:
            m = backup.restore(args.dir, settings.data_dir, force=args.force)
    except backup.BackupError as e:
        print(f"citygrid backup {args.backup_command}: {e}", file=sys.stderr)
        return 1
    ledger, anchor = m.get("ledger"), m.get("anchor")
    verb = "backed up" if args.backup_command == "create" else "restored"
    print(f"{verb} {', '.join(m['files'])}"
          + (f"; ledger ok: {ledger['entries']} entries, head {ledger['head']}" if ledger
             else "")
          + (f"; anchor ok: entry {anchor['entries']}, head {anchor['head']}" if anchor
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


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def cmd_store_rollup(args: argparse.Namespace) -> int:
    from citygrid.store import open_store

    store = open_store(_settings(args))
    if not hasattr(store, "rollup"):
        print("citygrid store rollup: the embedded store rolls up in `store init` and ingest",
              file=sys.stderr)
        return 2
    store.rollup(args.start, args.end)
    print(f"rolled up {_iso(args.start)} … {_iso(args.end)}")
    return 0


# --------------------------------------------------------------------------- up


def cmd_up(args: argparse.Namespace) -> int:
    return run_up(_settings(args), args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = _settings_flags()
    parser = argparse.ArgumentParser(prog="citygrid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("contract", help="the device contract")
    csub = p.add_subparsers(dest="contract_command", required=True, metavar="SUBCOMMAND")
    a = csub.add_parser("asyncapi", help="print the AsyncAPI 3 document of MQTT contract v1")
    a.set_defaults(func=cmd_contract_asyncapi)

    for add_parsers in (ingest_parsers, simulator_parsers, rules_parsers, ledger_parsers,
                        dashboards_parsers, gateway_parsers, adapters_parsers):
        add_parsers(sub, common)

    add_up_parser(sub, common, cmd_up)

    st = sub.add_parser("store", help="the telemetry store: retention and rollups")
    stsub = st.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    si = stsub.add_parser("init", parents=[common], help="create the database, retention "
                          "policies and continuous queries (idempotent; ingest does it too)")
    si.set_defaults(func=cmd_store_init)
    sr = stsub.add_parser("rollup", parents=[common], help="roll up a past range now (InfluxDB)")
    sr.add_argument("--from", dest="start", required=True, type=iso_time,
                    help="ISO time with offset")
    sr.add_argument("--to", dest="end", required=True, type=iso_time,
                    help="ISO time with offset")
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
