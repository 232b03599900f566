"""What the instrument does during each kind of step: a setpoint over step time, its compliance, and its edges.

A source-measure unit only sources a current or a voltage. Constant power and constant load
resistance are closed here in software (the current is reset from the last voltage at each
sample); ramps, drive cycles and pulse trains are setpoints that change with step time.
"""

from __future__ import annotations

import bisect
import csv
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cellbench.profiles.schema import CurrentBody, Limit, body_of


class StepType(StrEnum):
    """What a step does, as the Battery Data Format's `Step Type` column shows it."""

    CC_CHARGE = "CC Charge"
    CC_DISCHARGE = "CC Discharge"
    CV = "CV"
    CCCV_CHARGE = "CCCV Charge"
    CCCV_DISCHARGE = "CCCV Discharge"
    CP_CHARGE = "CP Charge"
    CP_DISCHARGE = "CP Discharge"
    CR_DISCHARGE = "CR Discharge"
    REST = "Rest"
    CURRENT_RAMP = "Current Ramp"
    VOLTAGE_RAMP = "Voltage Ramp"
    DRIVE_CYCLE = "Drive Cycle"
    PULSE = "Pulse"
    EIS = "EIS"
    SET = "Set"
    SCHEDULE = "Schedule"  # the cycler's own schedule or procedure (on-board)

    @property
    def is_constant_current(self) -> bool:
        return self in (StepType.CC_CHARGE, StepType.CC_DISCHARGE)


class SourceMode(StrEnum):
    CURRENT = "current"
    VOLTAGE = "voltage"


PULSE_SETTLE = 0.01  # s after an edge: the "just after" sample (a 10 ms DCIR)


@dataclass
class Control:
    """One step as the engine runs it."""

    step_type: StepType
    mode: SourceMode
    setpoint: Callable[[float, float], float]  # (step time, last voltage) -> A or V
    compliance: float  # V for a current source, A for a voltage source
    limits: list[Limit]
    direction: int  # +1 charging, -1 discharging, 0 unknown (a rest): which way voltage limits point
    dynamic: bool = False  # the setpoint must be recomputed at every sample
    edges: list[float] = field(default_factory=list)  # step times where the setpoint jumps
    duration: float | None = None  # an end the step has by its nature (rest length, ramp length, ...)


def _sign(kind: str, value: float) -> float:
    return abs(value) if kind == "charge" else -abs(value) if kind == "discharge" else value


MAX_DRIVE_BYTES = 50_000_000  # a day at 10 Hz is about 20 MB of CSV


def load_series(path: Path) -> tuple[list[float], list[float]]:
    """A drive cycle: CSV with a header row; first column time in s, second the value (A or W).
    At most MAX_DRIVE_BYTES of a regular file (a device or a pipe never ends)."""
    if not path.is_file():
        raise ValueError(f"{path.name}: not a regular file")
    if path.stat().st_size > MAX_DRIVE_BYTES:
        raise ValueError(f"{path.name}: larger than {MAX_DRIVE_BYTES // 1_000_000} MB")
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    times, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            times.append(float(row[0]))
            values.append(float(row[1]))
        except (ValueError, IndexError):
            raise ValueError(f"{path.name}:{line}: expected two numbers (time in s, value), got {row}") from None
    if len(times) < 2 or any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"{path.name}: needs at least two rows with strictly rising times")
    return times, values


def _interpolate(times: list[float], values: list[float], t: float, linear: bool) -> float:
    if t <= times[0]:
        return values[0]
    if t >= times[-1]:
        return values[-1]
    k = bisect.bisect_right(times, t)
    if not linear:
        return values[k - 1]
    t0, t1, v0, v1 = times[k - 1], times[k], values[k - 1], values[k]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def build_control(
    step: Any,
    *,
    capacity: float,
    v_min: float,
    v_max: float,
    last_voltage: float,
    last_cc_current: float | None,
    base_dir: Path,
) -> Control:
    """The Control of a leaf step; current limits and C-rates resolved against `capacity` (Ah)."""
    kind, body = step.kind, body_of(step)
    limits = list(body.until)
    if kind in ("charge", "discharge", "cc"):
        return _current_control(kind, body, limits, capacity, v_max, last_voltage)
    if kind in ("hold", "cv"):
        i_limit = abs(body.current_limit.resolve(capacity)) if body.current_limit else (last_cc_current or capacity)
        direction = 1 if body.voltage > last_voltage else -1
        return Control(StepType.CV, SourceMode.VOLTAGE, lambda t, v: body.voltage, i_limit, limits, direction)
    if kind == "cccv":
        amps = abs(body.current.resolve(capacity))
        direction = 1 if body.voltage > last_voltage else -1
        name = StepType.CCCV_CHARGE if direction > 0 else StepType.CCCV_DISCHARGE
        return Control(name, SourceMode.VOLTAGE, lambda t, v: body.voltage, amps, limits, direction)
    if kind == "rest":
        return Control(StepType.REST, SourceMode.CURRENT, lambda t, v: 0.0, v_max, limits, 0, duration=body.duration)
    if kind == "wait":  # at rest while the conditions settle; the engine ends it on stability
        return Control(StepType.REST, SourceMode.CURRENT, lambda t, v: 0.0, v_max, limits, 0)
    if kind == "schedule":  # run by the cycler: nothing is applied from here, the engine only watches
        return Control(StepType.SCHEDULE, SourceMode.CURRENT, lambda t, v: 0.0, v_max, limits, 0)
    if kind == "ramp":
        return _ramp(body, limits, capacity, v_max)
    if kind == "drive":
        return _drive(body, limits, v_max, base_dir)
    if kind == "pulse":
        return _pulse(body, limits, capacity, v_max)
    raise TypeError(f"no control for a {kind} step")


def _current_control(
    kind: str, body: CurrentBody, limits: list[Limit], capacity: float, v_max: float, last_voltage: float
) -> Control:
    if body.current is not None:
        amps = _sign(kind, body.current.resolve(capacity))
        name = StepType.CC_CHARGE if amps > 0 else StepType.CC_DISCHARGE if amps < 0 else StepType.REST
        floor = max((lim.value for lim in limits if lim.kind == "voltage" and lim.op != ">="), default=None)
        if amps < 0 and floor is not None and body.voltage_limit is None and last_voltage > floor + 1e-3:
            # Discharging to a cut-off: a voltage source at the cut-off, its current limit the discharge
            # current. The instrument sinks that current and can never take the cell below the cut-off,
            # however steep the end-of-discharge knee and however slow the sampling.
            return Control(name, SourceMode.VOLTAGE, lambda t, v: floor, abs(amps), limits, -1)
        # Charging to a voltage: the instrument's own limit is that voltage (CC turns into CV there).
        to_voltage = next(
            (lim.value for lim in limits if lim.kind == "voltage" and lim.op != "<=" and amps > 0), None
        )
        compliance = body.voltage_limit or (min(to_voltage, v_max) if to_voltage else v_max)
        direction = 1 if amps > 0 else -1 if amps else 0
        return Control(name, SourceMode.CURRENT, lambda t, v: amps, compliance, limits, direction)
    if body.power is not None:
        watts = _sign(kind, body.power)
        name = StepType.CP_CHARGE if watts > 0 else StepType.CP_DISCHARGE
        return Control(
            name, SourceMode.CURRENT, lambda t, v: watts / max(v, 0.1), body.voltage_limit or v_max, limits,
            1 if watts > 0 else -1, dynamic=True,
        )
    assert body.resistance is not None
    ohms = body.resistance
    return Control(StepType.CR_DISCHARGE, SourceMode.CURRENT, lambda t, v: -v / ohms, body.voltage_limit or v_max,
                   limits, -1, dynamic=True)


def _ramp(body: Any, limits: list[Limit], capacity: float, v_max: float) -> Control:
    over = body.over
    if body.current is not None:
        a, b = (x.resolve(capacity) for x in body.current)
        direction = 1 if b > 0 or a > 0 else -1
        return Control(StepType.CURRENT_RAMP, SourceMode.CURRENT, lambda t, v: a + (b - a) * min(t / over, 1.0),
                       body.voltage_limit or v_max, limits, direction, dynamic=True, duration=over)
    va, vb = body.voltage
    i_limit = abs(body.current_limit.resolve(capacity)) if body.current_limit else capacity
    return Control(StepType.VOLTAGE_RAMP, SourceMode.VOLTAGE, lambda t, v: va + (vb - va) * min(t / over, 1.0),
                   i_limit, limits, 1 if vb > va else -1, dynamic=True, duration=over)


def _drive(body: Any, limits: list[Limit], v_max: float, base_dir: Path) -> Control:
    times, values = load_series((base_dir / body.file).resolve())
    linear = body.interpolation == "linear"
    period = times[-1]

    def value_at(t: float) -> float:
        return _interpolate(times, values, t % period if body.repeat else t, linear)

    if body.quantity == "current":
        setpoint: Callable[[float, float], float] = lambda t, v: value_at(t)  # noqa: E731
    else:
        setpoint = lambda t, v: value_at(t) / max(v, 0.1)  # noqa: E731
    edges = [] if linear else [t for t in times[1:] if t > times[0]]
    direction = 1 if sum(values) > 0 else -1
    return Control(StepType.DRIVE_CYCLE, SourceMode.CURRENT, setpoint, body.voltage_limit or v_max, limits, direction,
                   dynamic=True, edges=edges, duration=None if body.repeat else period)


def _pulse(body: Any, limits: list[Limit], capacity: float, v_max: float) -> Control:
    starts, ends, kinds = [], [], []
    t = 0.0
    for seg in body.segments:
        starts.append(t)
        t += seg.duration
        ends.append(t)
        kinds.append(("current", seg.current.resolve(capacity)) if seg.current is not None else ("power", seg.power))

    def setpoint(tt: float, v: float) -> float:
        k = min(bisect.bisect_right(starts, tt) - 1, len(kinds) - 1)
        what, value = kinds[max(k, 0)]
        return float(value) if what == "current" else float(value) / max(v, 0.1)

    return Control(StepType.PULSE, SourceMode.CURRENT, setpoint, body.voltage_limit or v_max, limits, 0, dynamic=True,
                   edges=ends[:-1], duration=t)
