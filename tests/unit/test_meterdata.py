"""Interval data from a cumulative register: boundaries interpolated, gaps left out, resets
counted from zero, and the intervals adding up to the register's increase."""

from __future__ import annotations

import pytest

from billing import Interval, intervals

H = 3_600_000
Q = 900_000


def test_the_register_at_a_boundary_is_interpolated_between_the_readings_around_it():
    # 10 kWh at 00:10, 11 kWh at 00:20: the 00:15 boundary is 10.5 kWh.
    readings = [(0, 9.0, None), (10 * 60_000, 10.0, None), (20 * 60_000, 11.0, None),
                (30 * 60_000, 13.0, None)]
    rows = intervals(readings, start_ms=0, end_ms=30 * 60_000, every_ms=Q)
    assert rows == [Interval(0, Q, 1_500_000), Interval(Q, 2 * Q, 2_500_000)]


def test_intervals_add_up_exactly_to_the_register_increase():
    readings = [(i * 7 * 60_000 + 13_000, 100 + i * 0.123456789, None) for i in range(40)]
    start, end = Q, 16 * Q
    rows = intervals(readings, start_ms=start, end_ms=end, every_ms=Q)
    assert len(rows) == 15
    assert sum(r.import_mwh for r in rows) == pytest.approx(
        15 * Q / (7 * 60_000) * 0.123456789 * 1e6, abs=1)


def test_an_interval_the_readings_do_not_cover_is_left_out():
    # Readings until 01:00, then none until 04:00 (more than an hour apart): 01:00–04:00 gone;
    # before the first reading nothing is known either.
    readings = [(H // 2, 1.0, None), (H, 2.0, None), (4 * H, 5.0, None), (5 * H, 6.0, None)]
    rows = intervals(readings, start_ms=0, end_ms=5 * H, every_ms=H)
    assert [(r.start_ms // H, r.import_mwh) for r in rows] == [(4, 1_000_000)]
    rows = intervals(readings, start_ms=0, end_ms=5 * H, every_ms=Q)
    assert [r.start_ms for r in rows][:2] == [2 * Q, 3 * Q]
    assert all(r.start_ms < H or r.start_ms >= 4 * H for r in rows)


def test_a_register_that_goes_down_is_a_reset_counted_from_zero():
    # 500 kWh, then the meter is swapped and reads 0.2 kWh, then 1.2 kWh.
    readings = [(0, 499.0, None), (Q, 500.0, None), (Q + 60_000, 0.2, None),
                (2 * Q, 1.2, None), (3 * Q, 2.2, None)]
    rows = intervals(readings, start_ms=0, end_ms=3 * Q, every_ms=Q)
    assert [r.import_mwh for r in rows] == [1_000_000, 1_200_000, 1_000_000]
    assert all(r.import_mwh >= 0 for r in rows)


def test_export_is_given_when_the_meter_reports_it():
    readings = [(0, 1.0, 10.0), (Q, 1.5, 10.25), (2 * Q, 2.0, None), (3 * Q, 2.5, 10.75)]
    rows = intervals(readings, start_ms=0, end_ms=3 * Q, every_ms=Q)
    assert [r.import_mwh for r in rows] == [500_000] * 3
    # 10.25 at Q, 10.75 at 3Q: 2Q interpolated to 10.5
    assert [r.export_mwh for r in rows] == [250_000, 250_000, 250_000]
    assert all(r.export_mwh is None
               for r in intervals([(0, 1.0, None), (Q, 2.0, None)], start_ms=0, end_ms=Q,
                                  every_ms=Q))


def test_a_reading_on_the_boundary_is_taken_as_it_is_and_duplicates_do_not_count_twice():
    readings = [(0, 1.0, None), (Q, 2.0, None), (Q, 2.0, None), (2 * Q, 2.5, None)]
    rows = intervals(readings, start_ms=Q, end_ms=2 * Q, every_ms=Q)
    assert rows == [Interval(Q, 2 * Q, 500_000)]


def test_an_empty_range_is_refused():
    with pytest.raises(ValueError):
        intervals([], start_ms=Q, end_ms=Q, every_ms=Q)
