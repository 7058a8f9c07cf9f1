"""Data lifecycle: raw readings kept for a while, hourly rollups for years.

Raw readings live in the database's default retention policy (InfluxDB: `autogen`, its
duration set to CITYGRID_RAW_RETENTION, 30 days by default). Hourly rollups live in
`rollup_1h` (CITYGRID_ROLLUP_RETENTION, 5 years), under the same measurement names, filled by
continuous queries: for every numeric field of every device `mean_`, `min_`, `max_`, `sum_`,
`count_` and `last_` (so a long-range mean is exact: sum over count), and for each register
its advance over the hour (`energy_wh_delta`, `energy_kwh_delta`), and per district the sum
of those (`streetlight_district`, `meter_district`). `citygrid_lighting` (the rule engine's
per-district minutes) is rolled up the same way. Aggregates over ranges longer than
CITYGRID_ROLLUP_HORIZON (7 days) read the rollups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLLUP_RP = "rollup_1h"
HOUR_MS = 3_600_000
MEASUREMENTS = ("streetlight", "meter", "citygrid_lighting")
REGISTERS = {"streetlight": "energy_wh", "meter": "energy_kwh"}
LIGHTING_SUMS = ("energy_wh", "baseline_wh", "saved_wh", "co2_avoided_g")
_DURATION = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_HOURS = {"h": 1, "d": 24, "w": 168}


def hours(text: str) -> int:
    """``30d``, ``720h``, ``260w`` → hours; ValueError otherwise."""
    m = _DURATION.match(text)
    if not m or int(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration like 720h, 30d or 260w")
    return int(m[1]) * _HOURS[m[2]]


@dataclass(frozen=True)
class Lifecycle:
    raw_hours: int = 30 * 24
    rollup_hours: int = 5 * 365 * 24
    horizon_hours: int = 7 * 24

    @classmethod
    def parse(cls, raw: str, rollup: str, horizon: str) -> Lifecycle:
        return cls(hours(raw), hours(rollup), hours(horizon))


def rollup_queries(database: str, raw_rp: str = "autogen") -> dict[str, tuple[str, str]]:
    """Continuous-query name → (SELECT … INTO … GROUP BY time(1h), *, RESAMPLE clause).

    The same statements, with a time range added, roll up any past range by hand
    (`citygrid store rollup`, and the tests compare them with the raw aggregates).
    """
    db = f'"{database}"'
    out: dict[str, tuple[str, str]] = {}
    for m in MEASUREMENTS:
        src, dst = f'{db}."{raw_rp}"."{m}"', f'{db}."{ROLLUP_RP}"."{m}"'
        out[f"cg_{m}_1h"] = (
            f"SELECT mean(*), min(*), max(*), sum(*), count(*), last(*) INTO {dst} "
            f"FROM {src} GROUP BY time(1h), *", "")
        if m == "citygrid_lighting":
            # Under the raw names too, so a dashboard's sum("energy_wh") reads either policy.
            sums = ", ".join(f'sum("{f}") AS "{f}"' for f in LIGHTING_SUMS)
            out[f"cg_{m}_1h_sums"] = (f"SELECT {sums} INTO {dst} FROM {src} "
                                      f"GROUP BY time(1h), *", "")
        if m in REGISTERS:
            r = REGISTERS[m]
            # The register's advance from the end of the previous hour to the end of this
            # one: the CQ looks two hours back so the previous hour's last reading is there.
            out[f"cg_{m}_1h_delta"] = (
                f'SELECT non_negative_difference(last("{r}")) AS "{r}_delta" INTO {dst} '
                f"FROM {src} GROUP BY time(1h), *", "RESAMPLE FOR 2h")
            # Per district: the sum of its devices' advances, from the rollup above (a CQ
            # cannot nest queries); three hours back, so an hour summed before its devices'
            # deltas were written is summed again once they are.
            out[f"cg_{m}_1h_district"] = (
                f'SELECT sum("{r}_delta") AS "{r}_delta" INTO {db}."{ROLLUP_RP}"."{m}_district" '
                f'FROM {dst} GROUP BY time(1h), "district"', "RESAMPLE FOR 3h")
    return out


def with_range(select: str, start_ms: int, end_ms: int) -> str:
    """The statement for a past range (hour-aligned), as the CQ would have run it."""
    start = start_ms // HOUR_MS * HOUR_MS
    end = -(-end_ms // HOUR_MS) * HOUR_MS
    head, _, group = select.rpartition(" GROUP BY ")
    return f"{head} WHERE time >= {start}ms AND time < {end}ms GROUP BY {group}"


def rollup_select(field: str, fn: str) -> str:
    """The rollup expression that gives ``fn(field)`` over hours, exactly."""
    f = field.replace('"', '\\"')
    return {
        "mean": f'sum("sum_{f}") / sum("count_{f}")',
        "min": f'min("min_{f}")',
        "max": f'max("max_{f}")',
        "sum": f'sum("sum_{f}")',
        "count": f'sum("count_{f}")',
        "last": f'last("last_{f}")',
    }[fn]
