"""Meter accounting (DESIGN.md §7): consumption from a cumulative register, never twice.

- a reading not newer than the last one taken (a duplicate, a late arrival) is ignored:
  registers are cumulative, so the next reading's increase holds its consumption;
- a decrease is a reset or a meter swap: the new register counted from zero, never
  negative use;
- an increase faster than the meter's maximum power is implausible: it is held out of
  billing and flagged; if the next reading is plausible again it was a glitch and is
  dropped, if the register carries on from the jump the jump itself stays held;
- consumption across a gap is kept: the increase is the increase.

Registers are handled in integer milliwatt-hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOLERANCE = 1.10  # meters and clocks are not exact: 10 % over the maximum is still plausible


def to_mwh(kwh: float) -> int:
    return round(kwh * 1_000_000)


@dataclass
class MeterState:
    last_ts: int | None = None
    last_register: int = 0  # mWh
    spike_ts: int | None = None  # an implausible reading waiting for the next one
    spike_register: int = 0
    held_mwh: int = 0  # jumps held out of billing
    resets: int = 0
    ignored: int = 0


@dataclass
class Outcome:
    intervals: list[tuple[int, int, int]] = field(default_factory=list)  # (t0, t1, mWh)
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)


def _max_mwh(max_power_w: float, t0: int, t1: int) -> float:
    return max_power_w * (t1 - t0) / 3_600_000 * 1000 * TOLERANCE


def account(state: MeterState, ts: int, register: int, max_power_w: float) -> Outcome:
    """Take one reading (``register`` in mWh at ``ts``); return what it adds to the bill."""
    out = Outcome()
    if state.last_ts is None:
        state.last_ts, state.last_register = ts, register
        return out
    if ts <= state.last_ts:
        state.ignored += 1
        return out
    delta = register - state.last_register
    limit = _max_mwh(max_power_w, state.last_ts, ts)
    if state.spike_ts is not None:
        spike_ts, spike_register = state.spike_ts, state.spike_register
        state.spike_ts = None
        if 0 <= delta <= limit:
            out.events.append(("spike_dropped", f"register {spike_register / 1e6:.3f} kWh at "
                               f"{spike_ts} was a glitch"))
        elif 0 <= register - spike_register <= _max_mwh(max_power_w, spike_ts, ts):
            jump = spike_register - state.last_register
            state.held_mwh += jump
            out.events.append(("held", f"{jump / 1e6:.3f} kWh jump held out of billing"))
            state.last_ts, state.last_register = spike_ts, spike_register
            delta = register - spike_register
            limit = _max_mwh(max_power_w, spike_ts, ts)
    if delta < 0:
        state.resets += 1
        used = register if register <= limit else 0  # the new meter counted from zero
        out.events.append(("reset", f"register fell from {state.last_register / 1e6:.3f} to "
                           f"{register / 1e6:.3f} kWh: reset or meter swap"))
        if used:
            out.intervals.append((state.last_ts, ts, used))
        state.last_ts, state.last_register = ts, register
        return out
    if delta > limit:
        state.spike_ts, state.spike_register = ts, register
        out.events.append(("spike", f"{delta / 1e6:.3f} kWh in {(ts - state.last_ts) / 1000:.0f}"
                           f" s is more than the meter's {max_power_w:.0f} W allow"))
        return out
    if delta:
        out.intervals.append((state.last_ts, ts, delta))
    state.last_ts, state.last_register = ts, register
    return out
