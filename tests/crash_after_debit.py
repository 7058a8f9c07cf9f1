"""Run the `citygrid` command line, but die (exit 9) the moment billing has debited an account
and before the ledger entry is written — the settlement crash test's fault, injected from
outside the production code.

    python tests/crash_after_debit.py rules run …
"""

import os
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_connect = sqlite3.connect


class _DiesAfterDebit(sqlite3.Connection):
    def execute(self, sql, *args):
        cursor = super().execute(sql, *args)
        if sql.lstrip().startswith("UPDATE accounts SET balance_minor"):
            os._exit(9)  # debited inside the settlement's transaction, no ledger entry yet
        return cursor


def _connect_billing_dies(database, *args, **kwargs):
    if str(database).endswith("billing.sqlite"):
        kwargs["factory"] = _DiesAfterDebit
    return _connect(database, *args, **kwargs)


sqlite3.connect = _connect_billing_dies

from cityctl.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
