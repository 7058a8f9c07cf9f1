"""``citygrid ledger verify | list | head`` (every kind of entry: settlements, payments,
invoices, credit notes)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from billing import read
from citygrid.settings import Settings


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ledger", help="the billing ledger")
    ls = p.add_subparsers(dest="ledger_command", required=True, metavar="SUBCOMMAND")
    v = ls.add_parser("verify", parents=[common], help="check the hash chain")
    v.add_argument("--head", help="an earlier head hash the ledger must still contain")
    v.set_defaults(func=cmd_verify)
    h = ls.add_parser("head", parents=[common], help="print the head hash (to anchor it)")
    h.set_defaults(func=cmd_head)
    li = ls.add_parser("list", parents=[common], help="print ledger entries")
    li.add_argument("--meter")
    li.add_argument("--account")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)


def _data_dir(args: argparse.Namespace) -> str:
    data_dir = Settings.from_env(data_dir=args.data_dir).data_dir
    if not read.path(data_dir).exists():
        raise SystemExit(f"citygrid ledger: no ledger at {read.path(data_dir)}")
    return data_dir


def cmd_verify(args: argparse.Namespace) -> int:
    status = read.ledger_status(_data_dir(args), args.head)
    if not status.ok:
        print(f"ledger BROKEN: {status.error}")
        return 1
    print(f"ledger ok: {status.entries} entries, head {status.head}")
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    status = read.ledger_status(_data_dir(args))
    if not status.ok:
        print(f"ledger BROKEN: {status.error}", file=sys.stderr)
        return 1
    print(status.head)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    entries = read.settlements(_data_dir(args), meter=args.meter, account=args.account,
                               limit=-1, newest_first=False, every_kind=True)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        h, at = e["hash"], read.entry_time(e)
        when = "?" if at is None else datetime.fromtimestamp(at / 1000, UTC).isoformat(
            timespec="seconds")
        kind = e.get("kind", "settlement")
        what = (f"{e.get('meter', ''):<10} {e.get('kwh', ''):>12} kWh" if kind == "settlement"
                else f"{kind:<10} {e.get('number', e.get('request', '')):>16}")
        amount = e.get("total_minor", e.get("amount_minor", 0))
        print(f"{e['seq']:>5} {when} {e['account']:<10} {what} {amount / 100:>10.2f} "
              f"{e.get('currency', '')} {e.get('period') or ''} {e['key']} {h[:16]}…")
    print(f"{len(entries)} entries", file=sys.stderr)
    return 0
