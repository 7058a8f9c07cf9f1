"""The billing store's CPU per meter reading, by tariff: what spot prices, grid bands, the
capacity charge and the export register cost on the hot path.

Every tariff gets the same readings — 200 meters, one reading a minute each, for a day from
the sample price file's date, with an export register where the tariff credits export —
into a fresh ``BillingStore`` (SQLite on the temp dir, as in production), and one settlement
per meter at the end. CPU time of this process (``time.process_time``), median of
``--repeats``; the tariffs run interleaved, one repeat each in turn.

    .venv/bin/python bench/billing.py --repeats 5
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

from billing import BillingStore, load_config  # noqa: E402
from billing.config import EXAMPLE  # noqa: E402
from citygrid.city import COPENHAGEN  # noqa: E402
from citygrid.fleet import Fleet, FleetDevice  # noqa: E402

TARIFFS = ("household", "solar-household", "business-capacity")
EXPORTING = {"solar-household"}


def run(tariff: str, meters: int, minutes: int) -> tuple[float, int]:
    config = load_config(EXAMPLE.parent / "utility.yaml")
    fleet = Fleet([FleetDevice(f"m-{i}", "meter", "valby", 55.66, 12.5, account_id=f"a-{i}",
                               tariff=tariff, max_power_w=17250.0) for i in range(meters)])
    t0 = int(datetime(2026, 12, 1, tzinfo=COPENHAGEN.tz).timestamp() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        store = BillingStore(Path(tmp) / "billing.sqlite", config, fleet, COPENHAGEN.tz)
        export = tariff in EXPORTING
        start = time.process_time()
        n = 0
        for m in range(minutes):
            ts = t0 + m * 60_000
            hour = m // 60
            for i in range(meters):
                imp = m * 0.02 + i
                exp = (max(0, m - 600) * 0.03 if 10 <= hour < 16 else 0.0) if export else None
                store.on_reading(f"m-{i}", ts, imp, exp)
                n += 1
        for i in range(meters):
            store.settle(f"m-{i}", t0 + minutes * 60_000 + 1)
        cpu = time.process_time() - start
        store.close()
    return cpu, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--meters", type=int, default=200)
    ap.add_argument("--minutes", type=int, default=24 * 60)
    args = ap.parse_args()
    runs: dict[str, list[float]] = {t: [] for t in TARIFFS}
    for r in range(args.repeats):
        for tariff in TARIFFS if r % 2 == 0 else reversed(TARIFFS):
            cpu, n = run(tariff, args.meters, args.minutes)
            runs[tariff].append(cpu / n * 1e6)
            print(f"  repeat {r + 1} {tariff}: {cpu / n * 1e6:.2f} µs a reading ({n:,})",
                  flush=True)
    print(f"{args.meters} meters, a reading a minute for {args.minutes} minutes, "
          f"{args.repeats} repeats; µs of CPU a reading (settlement included), medians:")
    for tariff, values in runs.items():
        print(f"  {tariff:>18}: {statistics.median(values):.2f} "
              f"(runs {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
