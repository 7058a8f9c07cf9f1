"""What the rule engine's once-a-minute look for overdue invoices costs
(``billing.overdue_invoices``): 10,000 post-paid accounts with one invoice each, past due.

Three looks, each timed (CPU of this process, ``time.process_time``; median of
``--repeats``): every invoice unpaid (the worst case: one alert each), half of them paid
(the look that finds them paid and marks them), and the look after (the paid ones are no
longer read).

    .venv/bin/python bench/overdue.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billing import BillingStore, issue_due, overdue_invoices  # noqa: E402
from billing.config import parse_text  # noqa: E402
from billing.ledger import append  # noqa: E402
from citygrid.city import COPENHAGEN  # noqa: E402
from citygrid.fleet import Fleet, FleetDevice  # noqa: E402

TZ = COPENHAGEN.tz
CONFIG = parse_text("""
currency: DKK
seller: {name: Bench Forsyning, payment_terms_days: 14}
tariffs: {flat: {price: 2.00, standing_charge_per_month: 25.00}}
""")


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def run(accounts: int) -> tuple[float, float, float, int, int]:
    fleet = Fleet([FleetDevice(f"m-{i}", "meter", "valby", 55.66, 12.5, account_id=f"a-{i}",
                               tariff="flat", max_power_w=17250.0) for i in range(accounts)])
    with tempfile.TemporaryDirectory() as tmp:
        store = BillingStore(Path(tmp) / "billing.sqlite", CONFIG, fleet, TZ)
        for i in range(accounts):
            store.on_reading(f"m-{i}", ms(2026, 3, 2), 100.0)
            store.on_reading(f"m-{i}", ms(2026, 3, 20), 150.0)
            store.settle(f"m-{i}", ms(2026, 4, 1, 0, 30))
        while issue_due(store.db, CONFIG, TZ, ms(2026, 4, 1, 1), limit=1000):
            pass
        now = ms(2026, 4, 16)
        t = time.process_time()
        unpaid = len(overdue_invoices(store.db, TZ, now))
        all_unpaid = time.process_time() - t
        for i in range(0, accounts, 2):
            append(store.db, CONFIG, f"pay-{i}", f"a-{i}", {
                "kind": "payment", "amount_minor": 100_000, "currency": "DKK",
                "paid_at_ms": now}, 100_000)
        t = time.process_time()
        half = len(overdue_invoices(store.db, TZ, now + 60_000))
        half_paid = time.process_time() - t
        t = time.process_time()
        overdue_invoices(store.db, TZ, now + 120_000)
        after = time.process_time() - t
        store.close()
    return all_unpaid, half_paid, after, unpaid, half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--accounts", type=int, default=10_000)
    args = ap.parse_args()
    runs = [run(args.accounts) for _ in range(args.repeats)]
    unpaid, half = runs[0][3], runs[0][4]
    print(f"{args.accounts} accounts, {args.repeats} repeats (median CPU of a look):")
    for name, k in (("every invoice unpaid", 0), ("half paid meanwhile", 1),
                    ("the look after", 2)):
        print(f"  {name:22s} {statistics.median(r[k] for r in runs) * 1000:8.1f} ms")
    print(f"  overdue found: {unpaid}, then {half}")


if __name__ == "__main__":
    main()
