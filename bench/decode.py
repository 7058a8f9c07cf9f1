"""CPU per decode on the ingest hot path: a contract JSON reading (streetlight, meter), one
that lists `unmeasured`, and a SenML pack. CPU time (process_time) over N decodes, median of
five rounds; one process, so the figures compare with each other, not across machines.

    .venv/bin/python bench/decode.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

from citygrid.contract import decode_readings

NOW = 1_790_000_000_000
CASES = {
    "streetlight JSON": ("streetlight", b'{"ts":1790000000000,"seq":12,"brightness_pct":40.0,'
                         b'"power_w":24.5,"energy_wh":1520.5,"lux":3.2,"motion":false}'),
    "meter JSON": ("meter", b'{"ts":1790000000000,"seq":12,"energy_kwh":1520.5,'
                   b'"power_w":500.0}'),
    "streetlight JSON, unmeasured": ("streetlight", b'{"ts":1790000000000,"seq":12,'
                                     b'"brightness_pct":40.0,"unmeasured":["lux","motion",'
                                     b'"power_w","energy_wh"]}'),
    "meter SenML, 3 records, Wh": ("meter", b'[{"bn":"m-1/","bt":1790000000,"n":"seq","v":12},'
                                   b'{"n":"energy_kwh","u":"Wh","v":1520500},'
                                   b'{"n":"power_w","u":"W","v":500}]'),
}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    for name, (kind, payload) in CASES.items():
        rounds = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(n):
                decode_readings(kind, payload, now_ms=NOW)
            rounds.append((time.process_time() - t) / n * 1e6)
        print(f"{name:<32} {statistics.median(rounds):6.1f} µs CPU a decode (median of 5)")


if __name__ == "__main__":
    main()
