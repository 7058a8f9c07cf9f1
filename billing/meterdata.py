"""Interval data from a cumulative register: the energy a meter took (or gave) per interval.

- the register at each interval boundary is interpolated linearly between the readings
  around it (a reading exactly on the boundary is taken as it is);
- a boundary whose readings around it are more than ``max_gap_ms`` apart, or that has no
  reading on one side, is unknown, and an interval with an unknown boundary is left out:
  an export shows only what the readings cover, never a guess across an outage;
- a decrease is a reset or a meter swap, as in billing's accounting: the new register is
  counted from zero, never negative use;
- energies are integer milliwatt-hours, each interval the difference of the rounded
  registers at its boundaries, so the intervals add up exactly to the register's increase.

Spikes (an increase faster than the meter can draw) are not held out here: the export shows
what the meter reported; billing decides what is billed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_GAP_MS = 3_600_000  # readings further apart than this do not bracket a boundary


@dataclass(frozen=True)
class Interval:
    """Energy in [start, end): import, and export when the meter reports it (else None)."""

    start_ms: int
    end_ms: int
    import_mwh: int
    export_mwh: int | None = None


def _continuous(readings: Iterable[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """Times and a register that never goes down: each reset counted on from zero (kWh)."""
    by_ts = dict(sorted(readings))  # one reading per time: the last one stored wins
    times, values = list(by_ts), []
    last, total = None, 0.0
    for register in by_ts.values():
        if last is None:
            total = register
        elif register >= last:
            total += register - last
        else:  # reset or meter swap: the new register is all new use
            total += register
        values.append(total)
        last = register
    return times, values


def _at(times: Sequence[int], values: Sequence[float], ts: int, max_gap_ms: int) -> float | None:
    i = bisect_left(times, ts)
    if i < len(times) and times[i] == ts:
        return values[i]
    if i == 0 or i == len(times) or times[i] - times[i - 1] > max_gap_ms:
        return None
    t0, t1 = times[i - 1], times[i]
    return values[i - 1] + (values[i] - values[i - 1]) * (ts - t0) / (t1 - t0)


def _boundaries(readings: Iterable[tuple[int, float]], edges: Sequence[int],
                max_gap_ms: int) -> list[int | None]:
    times, values = _continuous(readings)
    out: list[int | None] = []
    for ts in edges:
        kwh = _at(times, values, ts, max_gap_ms)
        out.append(None if kwh is None else round(kwh * 1_000_000))
    return out


def intervals(readings: Iterable[tuple[int, float, float | None]], *, start_ms: int,
              end_ms: int, every_ms: int, max_gap_ms: int = MAX_GAP_MS) -> list[Interval]:
    """The intervals of ``every_ms`` from ``start_ms`` up to ``end_ms`` that the readings
    ``(ts_ms, import_kwh, export_kwh or None)`` cover, oldest first. Give the readings from
    ``max_gap_ms`` before the start to ``max_gap_ms`` after the end, so the edges are
    bracketed."""
    if every_ms <= 0 or end_ms <= start_ms:
        raise ValueError("need every_ms > 0 and end_ms > start_ms")
    rows = list(readings)
    edges = list(range(start_ms, end_ms, every_ms)) + [end_ms]
    imports = _boundaries(((ts, imp) for ts, imp, _ in rows), edges, max_gap_ms)
    exported = [(ts, exp) for ts, _, exp in rows if exp is not None]
    exports = _boundaries(exported, edges, max_gap_ms) if exported else [None] * len(edges)
    out = []
    for k in range(len(edges) - 1):
        a, b = imports[k], imports[k + 1]
        if a is None or b is None:
            continue
        ea, eb = exports[k], exports[k + 1]
        out.append(Interval(edges[k], edges[k + 1], b - a,
                            None if ea is None or eb is None else eb - ea))
    return out


__all__ = ["MAX_GAP_MS", "Interval", "intervals"]
