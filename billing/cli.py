"""``citygrid ledger verify | list | head``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

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


def _path(args: argparse.Namespace) -> Path:
    settings = Settings.from_env(data_dir=args.data_dir)
    path = Path(settings.data_dir) / "billing.sqlite"
    if not path.exists():
        raise SystemExit(f"citygrid ledger: no ledger at {path}")
    return path


def cmd_verify(args: argparse.Namespace) -> int:
    from billing.ledger import LedgerError, verify

    try:
        count, head = verify(_path(args), args.head)
    except LedgerError as e:
        print(f"ledger BROKEN: {e}")
        return 1
    print(f"ledger ok: {count} entries, head {head}")
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    from billing.ledger import verify

    print(verify(_path(args))[1])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import sqlite3

    db = sqlite3.connect(_path(args))
    rows = [(json.loads(e), h) for e, h in db.execute("SELECT entry, hash FROM ledger "
                                                      "ORDER BY seq")]
    rows = [(e, h) for e, h in rows if (not args.meter or e["meter"] == args.meter)
            and (not args.account or e["account"] == args.account)]
    if args.json:
        print(json.dumps([{**e, "hash": h} for e, h in rows], indent=2))
        return 0
    for e, h in rows:
        when = datetime.fromtimestamp(e["settled_at_ms"] / 1000, UTC).isoformat(timespec="seconds")
        print(f"{e['seq']:>5} {when} {e['meter']:<10} {e['account']:<10} {e['kwh']:>12} kWh "
              f"{e['amount_minor'] / 100:>10.2f} {e['currency']} {e['period']} {e['key']} "
              f"{h[:16]}…")
    print(f"{len(rows)} entries", file=sys.stderr)
    return 0
