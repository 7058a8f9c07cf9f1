"""Time, passed in: a clock services are given (so tests and replays can drive them), and
the one parser of ISO times that operators type on the command line."""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    """What a service asks of time: wall-clock milliseconds (for stamps and event time's
    fallback) and a monotonic reading in seconds (for timeouts, intervals and rates)."""

    def now_ms(self) -> int: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The machine's clocks."""

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


def iso_time(text: str) -> int:
    """An ISO 8601 time with its UTC offset, as epoch milliseconds (an ``argparse`` type).

    A time without an offset is refused rather than read as this machine's local time: the
    same command must mean the same instant on every machine.
    """
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO time; e.g. 2026-11-27T16:00+01:00") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} needs an offset, e.g. 2026-11-27T16:00+01:00 or …Z")
    return int(when.timestamp() * 1000)


__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "iso_time"]
