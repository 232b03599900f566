"""Exact ends: a discharge to a cut-off is sampled closely through its knee and never counts charge across a
change of the current's sign (issue: 97 of 183 discharges overshot 2.5 V and ended charging)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellbench.bench.results.analysis import cycle_table
from cellbench.bench.runtime import policy
from cellbench.profiles.schema import Limit
from cellbench.roles import Reading
from tests.conftest import dry_run


def test_charge_through_zero_current_is_split_at_the_crossing_not_netted() -> None:
    # by hand: -1 mA at 2.6 V to +1 mA at 2.5 V over an hour crosses zero half-way; each half is a triangle
    pieces = policy.interval_charge((0.0, Reading(2.6, -1e-3)), 3600.0, Reading(2.5, 1e-3), None)
    assert pieces == [pytest.approx((-0.25e-3, -0.65e-3)), pytest.approx((0.25e-3, 0.625e-3))]
    # the same sign all along: one trapezoid
    (one,) = policy.interval_charge((0.0, Reading(3.0, -1e-3)), 1800.0, Reading(2.9, -3e-3), None)
    assert one == pytest.approx((-1e-3, -(3.0e-3 + 8.7e-3) / 2 * 0.5))


def test_a_held_voltages_falling_current_is_counted_as_the_decay_it_is() -> None:
    # by hand: 1 mA falling exponentially to 0.5 mA in 100 s has tau = 100 / ln 2 and carries (1 - 0.5) mA x tau
    import math

    exact_ah = 0.5e-3 * 100 / math.log(2) / 3600
    (taper,) = policy.interval_charge((0.0, Reading(4.3, 1e-3)), 100.0, Reading(4.3, 0.5e-3), None, taper=True)
    (trapezoid,) = policy.interval_charge((0.0, Reading(4.3, 1e-3)), 100.0, Reading(4.3, 0.5e-3), None)
    assert taper[0] == pytest.approx(exact_ah, rel=1e-12)
    assert trapezoid[0] == pytest.approx(0.75e-3 * 100 / 3600) and trapezoid[0] > 1.03 * exact_ah  # 4 % high
    # the sampling of a taper: at most a tenth of the current lost per interval (0.1 x 0.5 mA / 5 uA/s = 10 s)
    history = [(0.0, Reading(4.3, 1e-3)), (100.0, Reading(4.3, 0.5e-3))]
    limit = [Limit(kind="current", value=0.05e-3)]
    assert policy.next_interval(120.0, limit, history) == pytest.approx(0.1 * 0.5e-3 / (0.5e-3 / 100))


def test_a_discharge_samples_ever_closer_as_it_empties_the_cycles_charge() -> None:
    assert policy.next_interval(120.0, [], [], emptied=0.5) == 120.0
    assert policy.next_interval(120.0, [], [], emptied=0.9) == pytest.approx(30.0)  # 120 s x (0.1 / 0.2)^2
    assert policy.next_interval(120.0, [], [], emptied=0.99) == policy.MIN_INTERVAL
    assert policy.next_interval(120.0, [], [], emptied=None) == 120.0


def test_c3_discharges_at_60_degc_end_at_the_cut_off_and_coulombic_efficiency_stays_flat(tmp_path: Path) -> None:
    text = """
name: c3 cycles
sample_period: 2 min
record: {every: 15 min, voltage: 20 mV, current: 0.1 mA}
steps:
  - repeat: 6
    steps:
      - cccv: {current: C/3, voltage: 4.3 V, until: [C/20, 5 h]}
      - rest: 10 min
      - discharge: {current: C/3, until: 2.5 V}
      - rest: 10 min
"""
    run = dry_run(text, tmp_path, temperature=60.0, soc=0.0)
    samples, steps = run.samples, run.steps
    assert run.outcome.completed
    for s in steps:
        if s["step_type"] != "CC Discharge":
            continue
        last = [x for x in samples if x.step_count == s["step_count"]][-1]
        after = next(x for x in samples if x.step_count == s["step_count"] + 1)
        assert last.current < 0, last  # never charging at the end of a discharge
        assert last.voltage >= 2.5 - 1e-3 and after.voltage >= 2.5 - 1e-3  # not past the cut-off
    rows = cycle_table(samples)
    ces = [c.discharge_ah / c.charge_ah for c in rows][2:]  # after formation
    assert min(ces) > 0.999 and max(ces) < 1.0005, ces  # the band is 99.9-100.05 %
    # counted another way: the simulated cell's own coulomb counters over the whole run
    state = run.bench.cell.state
    assert sum(c.charge_ah for c in rows) == pytest.approx(state.charged_ah, rel=5e-4)
    assert sum(c.discharge_ah for c in rows) == pytest.approx(state.discharged_ah, rel=5e-4)
