"""``citygrid invoice issue | due | list | show | credit``: invoices and credit notes from the
command line, written to ``billing.sqlite`` through billing/invoices.py (the same functions
the gateway and the rule runner call)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from billing import invoices, render
from billing.config import load as load_config
from citygrid.city import city
from citygrid.clock import SYSTEM_CLOCK
from citygrid.settings import Settings
from citygrid.yamlconf import ConfigError


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("invoice", help="invoices and credit notes (docs/invoices.md)")
    s = p.add_subparsers(dest="invoice_command", required=True, metavar="SUBCOMMAND")
    i = s.add_parser("issue", parents=[common], help="issue an account's invoice: on demand "
                     "(everything not yet invoiced), or the monthly one with --period")
    i.add_argument("--account", required=True)
    i.add_argument("--period", help="YYYY-MM, a month that has ended (city time)")
    i.add_argument("--json", action="store_true", help="print the document")
    i.set_defaults(func=_guarded(cmd_issue))
    d = s.add_parser("due", parents=[common], help="issue every monthly invoice due now (the "
                     "rule runner does this by itself)")
    d.set_defaults(func=_guarded(cmd_due))
    li = s.add_parser("list", parents=[common], help="invoices and credit notes, newest first")
    li.add_argument("--account")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=_guarded(cmd_list))
    o = s.add_parser("overdue", parents=[common], help="invoices past their due date and "
                     "not paid, one per account (wall-clock date)")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=_guarded(cmd_overdue))
    sh = s.add_parser("show", parents=[common], help="one invoice or credit note")
    sh.add_argument("number")
    sh.add_argument("--html", metavar="FILE", help="write it as HTML")
    sh.add_argument("--pdf", metavar="FILE", help="write it as PDF")
    sh.add_argument("--json", action="store_true", help="print the stored document")
    sh.set_defaults(func=_guarded(cmd_show))
    c = s.add_parser("credit", parents=[common], help="a credit note against an invoice")
    c.add_argument("number")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--amount", help="gross amount credited, in currency units (12.50)")
    what.add_argument("--lines", help="the invoice's line numbers credited in full: 1,3")
    c.add_argument("--reason", required=True)
    c.set_defaults(func=_guarded(cmd_credit))


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input is one line on stderr and exit 2, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except invoices.InvoiceError as e:
            print(f"citygrid invoice: {e}", file=sys.stderr)
            return 2
        except ConfigError as e:
            print(f"citygrid invoice: billing configuration:\n{e}", file=sys.stderr)
            return 2

    run.__name__ = cmd.__name__
    return run


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(data_dir=args.data_dir)


def _writing(args: argparse.Namespace):
    settings = _settings(args)
    return (settings, invoices.open_db(settings.data_dir), load_config(settings.billing),
            city(settings.city).tz)


def _money(doc: dict[str, Any], minor: int) -> str:
    return f"{render.formatter(doc)(minor)} {doc['currency']}"


def _print_one(inv: invoices.Invoice, as_json: bool) -> None:
    if as_json:
        print(json.dumps(inv.document, indent=2, ensure_ascii=False))
        return
    d = inv.document
    due = f" due {d['due_date']}" if d.get("due_date") else ""
    print(f"{inv.number} {inv.kind} account {inv.account} period {inv.period or '-'} total "
          f"{_money(d, inv.total_minor)}{due} ledger #{inv.ledger_seq} sha256 {inv.sha256}")


def cmd_issue(args: argparse.Namespace) -> int:
    _, db, config, tz = _writing(args)
    try:
        inv = invoices.issue(db, config, tz, args.account, SYSTEM_CLOCK.now_ms(),
                             period=args.period)
    finally:
        db.close()
    _print_one(inv, args.json)
    return 0


def cmd_due(args: argparse.Namespace) -> int:
    _, db, config, tz = _writing(args)
    try:
        done = invoices.issue_due(db, config, tz, SYSTEM_CLOCK.now_ms())
    finally:
        db.close()
    for inv in done:
        _print_one(inv, False)
    print(f"{len(done)} invoices issued", file=sys.stderr)
    return 0


def cmd_overdue(args: argparse.Namespace) -> int:
    _, db, config, tz = _writing(args)
    try:
        found = invoices.overdue(db, tz, SYSTEM_CLOCK.now_ms())
    finally:
        db.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(o) for o in found], indent=2))
        return 0
    for o in found:
        print(f"{o.account} {o.number} due {o.due_date} owes "
              f"{o.owed_minor / config.minor_units:.2f} {o.currency} "
              f"(of {o.outstanding_minor / config.minor_units:.2f})")
    print(f"{len(found)} accounts overdue", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    found = invoices.list_invoices(_settings(args).data_dir, account=args.account, limit=-1)
    if args.json:
        print(json.dumps([i.summary() for i in found], indent=2))
        return 0
    for inv in found:
        _print_one(inv, False)
    print(f"{len(found)} invoices and credit notes", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    inv = invoices.get_invoice(_settings(args).data_dir, args.number)
    if args.html:
        Path(args.html).write_text(render.render_html(inv.document))
    if args.pdf:
        Path(args.pdf).write_bytes(render.render_pdf(inv.document))
    if args.json or not (args.html or args.pdf):
        _print_one(inv, args.json)
    return 0


def _line_numbers(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise invoices.BadCredit(f"--lines {text!r}: expected line numbers like 1,3") from None


def cmd_credit(args: argparse.Namespace) -> int:
    _, db, config, tz = _writing(args)
    try:
        cn = invoices.credit(db, config, tz, args.number, args.reason, SYSTEM_CLOCK.now_ms(),
                             amount=args.amount,
                             lines=_line_numbers(args.lines) if args.lines else None)
    finally:
        db.close()
    _print_one(cn, False)
    return 0
