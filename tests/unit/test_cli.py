"""The command line: times operators type are refused without an offset or when malformed."""

from __future__ import annotations

import argparse

import pytest

from cityctl.cli import build_parser
from citygrid.clock import iso_time

COMMANDS = [["rules", "backtest"], ["store", "rollup"]]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad, says", [("2026-11-27T16:00", "needs an offset"),
                                       ("yesterday", "is not an ISO time")])
def test_a_time_without_offset_or_malformed_is_refused_with_a_message(command, bad, says,
                                                                       capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--from", bad, "--to", "2026-11-28T08:00+01:00"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--from" in err and says in err and repr(bad) in err


@pytest.mark.parametrize("command", COMMANDS)
def test_times_with_an_offset_mean_the_same_instant_everywhere(command):
    args = build_parser().parse_args([*command, "--from", "2026-11-27T16:00+01:00",
                                      "--to", "2026-11-27T15:00:00Z"])
    assert args.start == args.end == 1_795_791_600_000


def test_iso_time_is_an_argparse_type():
    assert iso_time("1970-01-01T00:00:01+00:00") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        iso_time("1970-01-01T00:00:01")
