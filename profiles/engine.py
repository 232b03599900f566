"""The profile engine: runs one profile on one channel.

For every step it arms the instrument's limits before the output goes on, samples at the
profile's period (and exactly at a step's time limit), ends the step when one of its limits is
crossed, counts steps and cycles, integrates charge and energy per cycle, and records it all.
The output goes off at the end, on any error, and on cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.channel import Channel
from bench.clock import Clock
from bench.store import RunStore, Sample
from drivers.errors import InstrumentFault
from drivers.smu import Reading
from profiles.schema import (
    CCStep,
    ChargeStep,
    CVStep,
    DischargeStep,
    HoldStep,
    Profile,
    RepeatStep,
    RestStep,
)

log = logging.getLogger(__name__)

VOLTAGE_TOLERANCE = 1e-3  # V: a reading this close to a voltage limit counts as reaching it
MIN_INTERVAL = 1.0  # s: the shortest sample interval when closing in on a voltage limit
APPROACH_WINDOW = 0.05  # V: closer than this to a voltage limit, sample at MIN_INTERVAL
SAFE_MARGIN_LOW, SAFE_MARGIN_HIGH = 0.2, 0.1  # V outside the cell's window that stop the run


class SafetyStop(Exception):
    """A reading outside what the cell may see: the run ends in the safe state."""


@dataclass(frozen=True)
class Progress:
    test_time: float
    step_count: int
    total_steps: int
    cycle: int
    step_type: str
    voltage: float
    current: float


@dataclass(frozen=True)
class Outcome:
    completed: bool
    reason: str
    test_time: float
    steps: int
    cycles: int


@dataclass(frozen=True)
class _Control:
    """What the instrument does during a step and what ends it."""

    step_type: str
    mode: str  # "current" | "voltage"
    setpoint: float
    limit: float  # the instrument's compliance: V for a current source, A for a voltage source
    until_voltage: float | None = None
    until_current: float | None = None
    until_time: float | None = None


def leaf_indices(steps: list[Any], path: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
    """Number every non-loop step of a profile 1, 2, ... in reading order (the Step Index)."""
    out: dict[tuple[int, ...], int] = {}

    def walk(items: list[Any], prefix: tuple[int, ...]) -> None:
        for i, step in enumerate(items):
            if isinstance(step, RepeatStep):
                walk(step.steps, (*prefix, i))
            else:
                out[(*prefix, i)] = len(out) + 1

    walk(steps, path)
    return out


class Engine:
    """Executes a profile on a channel, recording into a store on a clock."""

    def __init__(
        self,
        profile: Profile,
        channel: Channel,
        store: RunStore,
        clock: Clock,
        *,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.profile = profile
        self.channel = channel
        self.store = store
        self.clock = clock
        self.on_progress = on_progress
        self._index = leaf_indices(profile.steps)
        self._total = profile.executed_step_count()
        self._start = 0.0
        self._step_count = 0
        self._cycle = 1
        self._discharged = False  # whether this cycle has had a discharge yet
        self._acc = [0.0, 0.0, 0.0, 0.0]  # charge Ah, discharge Ah, charge Wh, discharge Wh
        self._last_cc_current: float | None = None
        self._last: Reading | None = None

    # --- the run ---------------------------------------------------------------------------
    async def run(self) -> Outcome:
        self._start = self.clock.start()
        self._event("start", f"profile '{self.profile.name}' on channel '{self.channel.name}'")
        completed, reason = False, "completed"
        try:
            await self._run_steps(self.profile.steps, ())
            completed = True
        except asyncio.CancelledError:
            reason = "cancelled"
            self._event("cancelled", "the run was cancelled")
            raise
        except SafetyStop as exc:
            reason = f"safety stop: {exc}"
            self._event("safety", str(exc))
        except InstrumentFault as exc:
            reason = f"instrument fault: {exc}"
            self._event("fault", str(exc))
        finally:
            await self._output_off()
            self._event("end", reason)
            self.store.flush()
        return Outcome(completed, reason, self._elapsed(), self._step_count, self._cycle)

    async def _output_off(self) -> None:
        try:
            await self.channel.cycler.output(False)
        except Exception as exc:  # the run is ending anyway: say so loudly, never hide it
            log.error("%s: could not turn the output off: %s", self.channel.name, exc)
            self._event("fault", f"could not turn the output off: {exc}")

    async def _run_steps(self, steps: list[Any], path: tuple[int, ...]) -> None:
        for i, step in enumerate(steps):
            here = (*path, i)
            if isinstance(step, RepeatStep):
                for _ in range(step.repeat):
                    await self._run_steps(step.steps, here)
            else:
                await self._run_control(self._control(step), here)

    # --- one step --------------------------------------------------------------------------
    def _control(self, step: Any) -> _Control:
        cell = self.channel.cell
        if isinstance(step, (CCStep, ChargeStep, DischargeStep)):
            cc = step.cc
            amps = step.current().resolve(cell.capacity)
            self._last_cc_current = abs(amps)
            v_limit = cc.voltage_limit
            if v_limit is None:
                charging_to = cc.until.voltage if amps > 0 else None
                v_limit = charging_to if charging_to is not None else cell.voltage_max
            kind = "CC Charge" if amps > 0 else "CC Discharge" if amps < 0 else "Rest"
            return _Control(kind, "current", amps, v_limit, cc.until.voltage, None, cc.until.time)
        if isinstance(step, (CVStep, HoldStep)):
            cv = step.cv
            if cv.current_limit is not None:
                i_limit = abs(cv.current_limit.resolve(cell.capacity))
            else:
                i_limit = self._last_cc_current or cell.capacity  # the CC before it, else 1C
            end_current = abs(cv.until.current.resolve(cell.capacity)) if cv.until.current else None
            return _Control("CV", "voltage", cv.voltage, i_limit, None, end_current, cv.until.time)
        if isinstance(step, RestStep):
            return _Control("Rest", "current", 0.0, cell.voltage_max, until_time=step.rest)
        raise TypeError(f"no control for step {step!r}")

    async def _run_control(self, ctl: _Control, path: tuple[int, ...]) -> None:
        cycler = self.channel.cycler
        charging = ctl.setpoint > 0 if ctl.mode == "current" else self._cv_charges(ctl.setpoint)
        if charging and self._discharged:
            self._cycle += 1
            self._discharged = False
            self._acc = [0.0, 0.0, 0.0, 0.0]
        if ctl.mode == "current" and ctl.setpoint < 0:
            self._discharged = True
        self._step_count += 1
        index = self._index[path]
        step_start = self.clock.now()
        self.store.step_started(
            self._step_count, index, ctl.step_type, ".".join(map(str, path)), self._cycle, step_start - self._start
        )
        # Arm the limit with the setpoint, then turn the output on.
        if ctl.mode == "current":
            await cycler.source_current(ctl.setpoint, voltage_limit=ctl.limit)
        else:
            await cycler.source_voltage(ctl.setpoint, current_limit=ctl.limit)
        await cycler.output(True)

        previous: tuple[float, Reading] | None = None
        previous_for_slope: tuple[float, Reading] | None = None
        next_sample = step_start
        deadline = step_start + ctl.until_time if ctl.until_time is not None else math.inf
        while True:
            await self.clock.sleep_until(min(next_sample, deadline))
            now = self.clock.now()
            reading = await cycler.measure()
            self._check_safe(reading)
            if previous is not None:
                self._integrate(previous, (now, reading))
            previous = (now, reading)
            self._record(now, reading, ctl, index)
            reason = self._ended(ctl, reading, now - step_start)
            if reason:
                self.store.step_ended(self._step_count, now - self._start, reason)
                return
            next_sample = now + self._next_interval(ctl, reading, previous_for_slope, now)
            previous_for_slope = (now, reading)

    def _next_interval(
        self, ctl: _Control, r: Reading, before: tuple[float, Reading] | None, now: float
    ) -> float:
        """The sample period, shortened while the voltage closes in on a voltage limit.

        The interval shrinks to a quarter of the time to the crossing the last two samples predict,
        and to MIN_INTERVAL inside the approach window, so a steep end-of-discharge knee is caught
        within a second, not a period.
        """
        period = self.profile.sample_period
        if ctl.until_voltage is None or before is None or now <= before[0]:
            return period
        slope = (r.voltage - before[1].voltage) / (now - before[0])
        gap = ctl.until_voltage - r.voltage
        if slope == 0 or gap / slope <= 0:
            return period
        if abs(gap) < APPROACH_WINDOW:  # a knee can steepen tenfold between two samples
            return min(period, MIN_INTERVAL)
        return min(period, max(MIN_INTERVAL, gap / slope / 4))

    def _cv_charges(self, volts: float) -> bool:
        return self._last is not None and volts > self._last.voltage

    def _ended(self, ctl: _Control, r: Reading, elapsed: float) -> str | None:
        if ctl.until_time is not None and elapsed >= ctl.until_time - 1e-9:
            return f"time {ctl.until_time:g} s"
        if ctl.until_voltage is not None:
            rising = ctl.setpoint > 0 if ctl.mode == "current" else True
            if rising and r.voltage >= ctl.until_voltage - VOLTAGE_TOLERANCE:
                return f"voltage >= {ctl.until_voltage:g} V"
            if not rising and r.voltage <= ctl.until_voltage + VOLTAGE_TOLERANCE:
                return f"voltage <= {ctl.until_voltage:g} V"
        if ctl.until_current is not None and abs(r.current) <= ctl.until_current:
            return f"|current| <= {ctl.until_current:g} A"
        return None

    def _check_safe(self, r: Reading) -> None:
        cell = self.channel.cell
        if math.isnan(r.voltage) or math.isnan(r.current):
            raise SafetyStop(f"the cycler returned an overflow reading ({r.voltage}, {r.current})")
        low, high = cell.voltage_min - SAFE_MARGIN_LOW, cell.voltage_max + SAFE_MARGIN_HIGH
        if not low <= r.voltage <= high:
            raise SafetyStop(f"cell voltage {r.voltage:.4f} V is outside the safe window {low:g} to {high:g} V")

    def _integrate(self, a: tuple[float, Reading], b: tuple[float, Reading]) -> None:
        (t0, r0), (t1, r1) = a, b
        hours = (t1 - t0) / 3600.0
        ah = (r0.current + r1.current) / 2 * hours
        wh = (r0.current * r0.voltage + r1.current * r1.voltage) / 2 * hours
        if ah >= 0:
            self._acc[0] += ah
            self._acc[2] += max(wh, 0.0)
        else:
            self._acc[1] -= ah
            self._acc[3] -= min(wh, 0.0)

    def _record(self, now: float, r: Reading, ctl: _Control, index: int) -> None:
        self._last = r
        t = now - self._start
        sample = Sample(
            t, self.clock.unix(now), r.voltage, r.current, self._cycle, self._step_count, index,
            ctl.step_type, *self._acc,
        )
        self.store.add(sample, now)
        if self.on_progress:
            self.on_progress(
                Progress(t, self._step_count, self._total, self._cycle, ctl.step_type, r.voltage, r.current)
            )

    def _elapsed(self) -> float:
        return self.clock.now() - self._start

    def _event(self, kind: str, message: str) -> None:
        now = self.clock.now()
        self.store.event(kind, message, now - self._start, self.clock.unix(now))
