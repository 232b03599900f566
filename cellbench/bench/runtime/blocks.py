"""Steps the instrument runs itself (a cycler with the `Buffered` capability, where the bench allows it): which
steps can, the plan the instrument is given, and how often the host reads it.

A constant current (a rest is one, at 0 A) or a constant voltage with no edges, no value computed as it goes and
no limit but its voltage, current and time can: the instrument sources it, takes a reading every sample period
while the end is far and every tenth of it (at least a second apart) once the readings near it (the block
re-armed there), and judges at each reading the step's voltage limit (a current source) or current limit (a
voltage source) and the safety window, turning its output off at the reading that meets one. Its thresholds
are the host's own (a voltage limit counts as reached within `policy.VOLTAGE_TOLERANCE`, as the host counts
it), so that whatever reading the instrument stops on, the host ends the step on too. The host reads the block
every READINGS_PER_READ sample periods, sooner when the readings head for the end (`time_to_end`), and takes the
readings on the profile's period, the crossing one and the last. A step with a limit the instrument cannot
judge (capacity, energy, dV/dt, temperature) runs reading by reading as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cellbench.bench.runtime import policy
from cellbench.bench.runtime.cells import CellConfig
from cellbench.profiles.controls import Control, SourceMode
from cellbench.profiles.schema import Limit, Range
from cellbench.roles import BlockLimit, BlockPlan, BlockReading

INSTRUMENT_JUDGED = frozenset({"voltage", "current", "time"})
MAX_READ_INTERVAL = 60.0  # s: the longest the host leaves a block unread
READINGS_PER_READ = 20  # a block read every this many readings, when the host judges nothing itself
MAX_BLOCK_READINGS = 50_000  # readings in one block (the 2450's default buffer holds 100,000)
FINE_PER_PERIOD, FINE_FLOOR = 10, 1.0  # near the end the instrument reads this many times a sample period (<= 1 Hz)
NEAR = 10  # sample periods from the end (at the readings' slope) from which the instrument reads finely
NEAR_VOLTS, NEAR_CURRENT = 0.1, 2.0  # ... or this close to a voltage end, or this many times a taper's current
NEAR_READS = 5  # near the end, the host reads the block at least every this many of its readings


@dataclass(frozen=True)
class Edge:
    """Where the step ends on a reading: its voltage (or |current|) rising to, or falling to, a threshold."""

    quantity: str  # "voltage" or "current" (its magnitude)
    rising: bool
    threshold: float

    def value(self, voltage: float, current: float) -> float:
        return voltage if self.quantity == "voltage" else abs(current)

    def met(self, voltage: float, current: float) -> bool:
        v = self.value(voltage, current)
        return v >= self.threshold if self.rising else v <= self.threshold


@dataclass(frozen=True)
class Planned:
    """A step's plan; the limit its `stop` came from (the step ends by it where the instrument stopped); and the
    step's end on a reading, judged by the instrument or, on the quantity a source sets (a discharge run as a
    voltage source at its cut-off), by the host."""

    plan: BlockPlan
    stop_from: Limit | None
    edge: Edge | None


def plan_for(ctl: Control, limits: Sequence[Limit], *, period: float, voltage: float, cell: CellConfig,
             safety: Range | None) -> Planned | None:
    """The plan for a step the instrument can run, or None (edges, a computed setpoint, a limit the instrument
    cannot judge, two limits on one quantity)."""
    if ctl.dynamic or ctl.edges or any(lim.kind not in INSTRUMENT_JUDGED for lim in limits):
        return None
    current = ctl.mode is SourceMode.CURRENT
    measured = "voltage" if current else "current"
    ends = [lim for lim in limits if lim.kind in ("voltage", "current")]
    if len(ends) > 1:
        return None
    stop, stop_from, edge = None, None, None
    if ends:
        lim = ends[0]
        rising = lim.op == ">="
        tol = policy.VOLTAGE_TOLERANCE if lim.kind == "voltage" else 0.0
        threshold = lim.value - tol if rising else lim.value + tol  # where the host counts it reached
        edge = Edge(lim.kind, rising, threshold)
        if lim.kind == measured and current:
            stop, stop_from = (BlockLimit("above", high=threshold) if rising else BlockLimit("below", low=threshold),
                               lim)
        elif lim.kind == measured and not rising:  # a taper: |I| at most the value
            stop, stop_from = BlockLimit("inside", -threshold, threshold), lim
    window = _window(current, cell, safety)
    level = ctl.setpoint(0.0, voltage)
    fine = min(period, max(FINE_FLOOR, period / FINE_PER_PERIOD))
    return Planned(BlockPlan("current" if current else "voltage", level, ctl.compliance, fine, 1, stop, window),
                   stop_from, edge)


def _window(current: bool, cell: CellConfig, safety: Range | None) -> tuple[float, float] | None:
    """The readings the cell may see, on the measured quantity: the host's own safe window (policy.unsafe)."""
    if current:
        low, high = cell.voltage_min - policy.SAFE_MARGIN_LOW, cell.voltage_max + policy.SAFE_MARGIN_HIGH
        if safety is not None and safety.voltage:
            low, high = max(low, safety.voltage[0]), min(high, safety.voltage[1])
        return low, high
    if safety is not None and safety.current:
        lo, hi = (c.resolve(cell.capacity) for c in safety.current)
        return lo, hi
    return None


def read_interval(period: float) -> float:
    """How long the host leaves a block unread when nothing nears the step's end."""
    return max(period, min(MAX_READ_INTERVAL, READINGS_PER_READ * period))


def at_edge(planned: Planned, b: BlockReading) -> bool:
    """A reading at the step's end, or outside the instrument's window."""
    plan = planned.plan
    value = b.voltage if plan.source == "current" else b.current
    outside = plan.window is not None and not plan.window[0] <= value <= plan.window[1]
    return outside or (planned.edge is not None and planned.edge.met(b.voltage, b.current))


def count_for(period: float, remaining: float) -> int:
    """Readings in the next block: to the step's time limit (or budget), at most MAX_BLOCK_READINGS."""
    if math.isinf(remaining):
        return MAX_BLOCK_READINGS
    return max(1, min(MAX_BLOCK_READINGS, math.ceil(remaining / period - 1e-9)))


def time_to_end(edge: Edge, recent: Sequence[BlockReading]) -> float | None:
    """Seconds from the last reading to the step's end, foreseen from the last readings: at their slope, or,
    where the slope grows from one interval to the next (a knee), with it growing at that rate; None when they
    do not head for it."""
    if len(recent) < 2:
        return None
    *_, first, last = recent
    a, b = edge.value(first.voltage, first.current), edge.value(last.voltage, last.current)
    dt, left = last.t - first.t, edge.threshold - b
    if dt <= 0 or a == b or left * (b - a) <= 0:
        return None
    steps = left / (b - a)  # intervals to the end at the present slope
    if len(recent) >= 3:
        before = edge.value(recent[-3].voltage, recent[-3].current)
        growth = (b - a) / (a - before) if a != before else 1.0
        if 1.0 < growth <= 100.0:  # accelerating: the sum of growing steps reaches the end sooner
            steps = math.log(1 + steps * (growth - 1) / growth) / math.log(growth)
    return steps * dt


def next_read(planned: Planned, now: float, every: float, recent: Sequence[BlockReading], t0: float) -> float:
    """When the host next reads the block: `every` from now, or sooner when the readings head for the step's
    end (time_to_end): halfway to it while it is far, a reading past it once near, so that the next step starts
    within about a reading of the end."""
    later, fine = now + every, planned.plan.period
    ahead = None if planned.edge is None else time_to_end(planned.edge, recent)
    if ahead is None:
        return later
    at = t0 + recent[-1].t + (ahead / 2 if ahead > 4 * fine else ahead + fine)
    return max(now + fine, min(later, at))


def near_end(planned: Planned, recent: Sequence[BlockReading], within: float) -> bool:
    """Whether the step's end is within `within` s of the last reading (time_to_end), or close in value (a knee:
    a discharge's last tenths of a volt steepen faster than a slope foresees), or met."""
    edge = planned.edge
    if edge is None or not recent:
        return False
    last = recent[-1]
    b = edge.value(last.voltage, last.current)
    if edge.met(last.voltage, last.current):
        return True
    if abs(b - edge.threshold) <= NEAR_VOLTS if edge.quantity == "voltage" else b <= NEAR_CURRENT * edge.threshold:
        return True
    ahead = time_to_end(edge, recent)
    return ahead is not None and ahead <= within
