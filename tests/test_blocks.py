"""Steps run on the instrument (runtime/blocks.py through the engine): the 2450's trigger model judges the cut-off
and the window, the host reads it in blocks. Checked against the same profile run reading by reading on the same
simulated cell: every cycle's capacities agree, steps end on the same limits, and the block path asks the
instrument far less often."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellbench.bench.runtime import blocks
from cellbench.bench.runtime.cells import CellConfig
from cellbench.profiles.controls import Control, SourceMode, StepType
from cellbench.profiles.schema import Limit
from cellbench.roles import BlockReading
from tests.conftest import dry_run

CYCLES = """
name: C/3 cycles
sample_period: 10 s
steps:
  - repeat: 3
    steps:
      - charge: {current: C/3, until: 4.3 V}
      - rest: 10 min
      - discharge: {current: C/3, until: 2.5 V}
      - rest: 10 min
"""


def _cycle_capacities(run: object) -> list[tuple[int, float, float]]:
    last: dict[int, tuple[float, float]] = {}
    for s in run.samples:  # type: ignore[attr-defined]
        last[s.cycle] = (s.charge_ah, s.discharge_ah)
    return [(cycle, ch, dis) for cycle, (ch, dis) in sorted(last.items())]


def test_a_cycling_run_on_the_instrument_agrees_with_the_run_reading_by_reading(tmp_path: Path) -> None:
    by_reading = dry_run(CYCLES, tmp_path, soc=0.5, noise=False, temperature=60.0)
    on_instrument = dry_run(CYCLES, tmp_path, soc=0.5, noise=False, temperature=60.0, run_steps=True)
    assert by_reading.outcome.completed and on_instrument.outcome.completed, on_instrument.outcome.reason
    assert on_instrument.sequence == by_reading.sequence  # the same steps, ended by the same limits
    ours, theirs = _cycle_capacities(on_instrument), _cycle_capacities(by_reading)
    assert [c for c, *_ in ours] == [c for c, *_ in theirs] == [1, 2, 3]
    for (_, ch, dis), (_, ch_ref, dis_ref) in zip(ours, theirs, strict=True):
        assert ch == pytest.approx(ch_ref, rel=1e-4) and dis == pytest.approx(dis_ref, rel=1e-4)  # 0.01 %
    for a, b in zip(on_instrument.steps, by_reading.steps, strict=True):  # each step ends within 3 s
        assert a["end_time"] == pytest.approx(b["end_time"], abs=3.0)
    # the cut-off is the instrument's reading: a whole second of its 1 s readings
    charge_end = on_instrument.steps[0]["end_time"]
    assert charge_end == pytest.approx(round(charge_end), abs=1e-6)
    # recorded at the profile's period between the ends, as the reading-by-reading run records it
    assert len(on_instrument.samples) < len(by_reading.samples)


def _ctl(mode: SourceMode, value: float, step_type: StepType, direction: int) -> Control:
    return Control(step_type, mode, lambda t, v: value, 4.3 if mode is SourceMode.CURRENT else 0.01, [], direction)


CELL = CellConfig(capacity="3.5 mAh", voltage_min="2.5 V", voltage_max="4.3 V")


def test_the_plan_is_the_hosts_own_judgement() -> None:
    """By hand: a charge to 4.3 V stops above 4.299 V (the host's 1 mV tolerance), a taper to 0.35 mA inside
    +-0.35 mA, a discharge run as a voltage source at its cut-off is judged by the host on the voltage; the window
    is the cell's 2.3 to 4.4 V; a step with a capacity limit or a ramp is not run on the instrument."""
    charge = blocks.plan_for(_ctl(SourceMode.CURRENT, 1e-3, StepType.CC_CHARGE, 1),
                             [Limit(kind="voltage", op=">=", value=4.3)], period=10, voltage=3.8, cell=CELL,
                             safety=None)
    assert charge is not None and charge.plan.stop is not None and charge.plan.stop.kind == "above"
    assert charge.plan.stop.high == pytest.approx(4.299) and charge.plan.window == pytest.approx((2.3, 4.4))
    assert charge.plan.period == 1.0 and charge.stop_from is not None
    hold = blocks.plan_for(_ctl(SourceMode.VOLTAGE, 4.3, StepType.CV, 1),
                           [Limit(kind="current", op="<=", value=0.35e-3)], period=60, voltage=4.3, cell=CELL,
                           safety=None)
    assert hold is not None and hold.plan.stop is not None and hold.plan.period == 6.0
    assert (hold.plan.stop.kind, hold.plan.stop.low, hold.plan.stop.high) == ("inside", -0.35e-3, 0.35e-3)
    discharge = blocks.plan_for(_ctl(SourceMode.VOLTAGE, 2.5, StepType.CC_DISCHARGE, -1),
                                [Limit(kind="voltage", op="<=", value=2.5)], period=10, voltage=3.6, cell=CELL,
                                safety=None)
    assert discharge is not None and discharge.plan.stop is None and discharge.edge is not None
    assert discharge.edge.met(2.5009, -1e-3) and not discharge.edge.met(2.5011, -1e-3)
    capacity = [Limit(kind="step_capacity", op=">=", value=1e-3)]
    assert blocks.plan_for(_ctl(SourceMode.CURRENT, 1e-3, StepType.CC_CHARGE, 1), capacity, period=10,
                           voltage=3.8, cell=CELL, safety=None) is None
    # the host reads halfway to a predicted crossing, then just past it: 1 mV/s toward 4.299 V from 4.289 V
    readings = [BlockReading(9.0, 4.288, 1e-3), BlockReading(10.0, 4.289, 1e-3)]
    assert blocks.next_read(charge, 100.0, 60.0, readings, 90.0) == pytest.approx(90 + 10 + 5)
    near = [BlockReading(9.0, 4.2965, 1e-3), BlockReading(10.0, 4.2975, 1e-3)]
    assert blocks.next_read(charge, 100.0, 60.0, near, 90.0) == pytest.approx(90 + 10 + 1.5 + 1)
