"""The profile engine: runs one profile on one channel.

It walks the compiled program (steps, loops, jumps). For every step it arms the instrument's
limit with the setpoint before the output goes on, samples at the step's period (exactly at time
limits and pulse edges, every second near a voltage limit), ends the step on the first limit
crossed and goes where that limit says, counts steps and cycles, integrates charge and energy
per step and per cycle, records by the step's record rule, and checks every reading against the
cell's window and the profile's safety limits. The output goes off at the end, on any error,
and on cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cellbench.bench.channel import Channel
from cellbench.bench.clock import Clock
from cellbench.bench.impedance_fit import fit_spectrum
from cellbench.bench.roles import Conditions, InstrumentFault, Reading
from cellbench.bench.store import RunStore, Sample
from cellbench.bench.track import ProfileFailed, Track, out_of_tolerance
from cellbench.profiles.conditions import SetBody, WaitBody
from cellbench.profiles.controls import PULSE_SETTLE, Control, build_control
from cellbench.profiles.program import END, Program, compile_profile
from cellbench.profiles.schema import EisBody, Limit, Profile, RecordRule, body_of
from cellbench.profiles.units import human_duration

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


@dataclass
class _Budget:
    """A loop's (or the profile's) time budget: when it runs out the running step ends."""

    deadline: float
    target: int  # pc to go to
    name: str
    loop_pc: int  # -1 for the profile


@dataclass
class _StepState:
    start: float
    charge_ah: float = 0.0
    discharge_ah: float = 0.0
    charge_wh: float = 0.0
    discharge_wh: float = 0.0
    last_recorded: tuple[float, Reading] | None = None
    history: list[tuple[float, Reading]] = field(default_factory=list)  # the last two samples
    stable_since: float | None = None  # a wait step: since when the conditions have been in tolerance


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
        base_dir: Path = Path("."),
    ) -> None:
        self.profile = profile
        self.channel = channel
        self.store = store
        self.clock = clock
        self.on_progress = on_progress
        self.base_dir = base_dir
        self.program: Program = compile_profile(profile)
        self._total = profile.executed_step_count()
        self._start = 0.0
        self._step_count = 0
        self._cycle = 1
        self._cycle_has_run = False
        self._discharged = False  # whether this cycle has had a discharge yet
        self._acc = [0.0, 0.0, 0.0, 0.0]  # cycle charge Ah, discharge Ah, charge Wh, discharge Wh
        self._last_cc_current: float | None = None
        self._measured_capacity: float | None = None
        self._reference_capacity: float | None = None
        self._last: Reading | None = None
        self._budgets: list[_Budget] = []
        self._cond = Conditions()
        self._track = Track(channel, clock, self._event)
        self._held: float | None = None  # the current a current source holds since the last setpoint

    # --- the run ---------------------------------------------------------------------------
    async def run(self) -> Outcome:
        self._start = self.clock.start()
        self._event("start", f"profile '{self.profile.name}' on channel '{self.channel.name}'")
        if self.profile.time_limit is not None:
            self._budgets.append(_Budget(self._start + self.profile.time_limit, END, "the profile's time limit", -1))
        completed, reason = False, "completed"
        try:
            self._last = await self.channel.cycler.measure()
            await self._run_with_track()
            completed = True
        except ProfileFailed as exc:
            reason = f"failed: {exc}"
            self._event("failed", str(exc))
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

    async def _run_with_track(self) -> None:
        """The electrical steps, with the pressure-temperature track running alongside."""
        if not self.profile.conditions:
            await self._execute()
            return
        steps = asyncio.ensure_future(self._execute())
        track = asyncio.ensure_future(self._track.run(self.profile.conditions))
        try:
            done, _ = await asyncio.wait({steps, track}, return_when=asyncio.FIRST_EXCEPTION)
            if track in done and track.exception() is not None:
                steps.cancel()
                await asyncio.gather(steps, return_exceptions=True)
                raise track.exception()  # type: ignore[misc]
            await steps  # the track may still be holding: the steps decide when the test is over
        finally:
            for task in (steps, track):
                task.cancel()
            await asyncio.gather(steps, track, return_exceptions=True)

    async def _execute(self) -> None:
        prog = self.program.instrs
        counters: dict[int, int] = {}
        pc = 0
        while 0 <= pc < len(prog):
            ins = prog[pc]
            if ins.op == "loop":
                counters[pc] = 0
                if ins.node.time_limit is not None:
                    then = ins.node.then
                    target = self.program.after_loop(pc) if then == "next" else self.program.target(pc, then)
                    name = f"the time limit of the repeat at steps{_dotted(ins.path)}"
                    self._budgets.append(_Budget(self.clock.now() + ins.node.time_limit, target, name, pc))
                pc += 1
            elif ins.op == "endloop":
                counters[ins.loop_start] += 1
                if counters[ins.loop_start] < ins.node.repeat:
                    pc = ins.loop_start + 1
                else:
                    self._budgets = [b for b in self._budgets if b.loop_pc != ins.loop_start]
                    pc += 1
            else:
                pc = await self._run_step(pc)
                # budgets of loops that the jump left are over
                self._budgets = [
                    b for b in self._budgets
                    if b.loop_pc < 0 or (pc != END and b.loop_pc < pc <= prog[b.loop_pc].loop_end)
                ]

    async def _output_off(self) -> None:
        try:
            await self.channel.cycler.output(False)
        except Exception as exc:  # the run is ending anyway: say so loudly, never hide it
            log.error("%s: could not turn the output off: %s", self.channel.name, exc)
            self._event("fault", f"could not turn the output off: {exc}")

    # --- one step --------------------------------------------------------------------------
    def _capacity(self) -> float:
        if self.profile.c_rate_basis == "measured" and self._measured_capacity:
            return self._measured_capacity
        return self.channel.cell.capacity

    async def _run_step(self, pc: int) -> int:
        ins = self.program.instrs[pc]
        body = body_of(ins.node)
        if ins.node.kind == "set":
            return await self._run_set(pc, body)
        if ins.node.kind == "eis":
            return await self._run_eis(pc, body)
        cell = self.channel.cell
        assert self._last is not None
        ctl = build_control(
            ins.node, capacity=self._capacity(), v_min=cell.voltage_min, v_max=cell.voltage_max,
            last_voltage=self._last.voltage, last_cc_current=self._last_cc_current, base_dir=self.base_dir,
        )
        if ctl.step_type.startswith("CC"):
            self._last_cc_current = abs(ctl.setpoint(0.0, self._last.voltage))
        self._advance_cycle(ctl, body.new_cycle)
        self._step_count += 1
        state = _StepState(start=self.clock.now())
        self.store.step_started(
            self._step_count, ins.index, ctl.step_type, _dotted(ins.path), self._cycle, state.start - self._start
        )
        await self._apply(ctl, 0.0, self._last.voltage)
        await self.channel.cycler.output(True)
        period = body.sample_period or self.profile.sample_period
        rule = body.record or self.profile.record
        limits = self._resolve_limits(ctl)
        edges = list(ctl.edges)
        next_sample = state.start
        while True:
            deadline = self._next_deadline(limits, state.start)
            edge_at = state.start + edges[0] if edges else math.inf
            await self.clock.sleep_until(min(next_sample, deadline, edge_at))
            now = self.clock.now()
            reading = await self.channel.cycler.measure()
            if self.channel.chamber or self.channel.press:
                self._cond = await self.channel.conditions()
            t_step = now - state.start
            self._take(state, now, reading)
            ended = (
                self._budget_ended(now)
                or self._ended(ctl, limits, state, reading, t_step)
                or (self._stable(body, state, now) if ins.node.kind == "wait" else None)
            )
            unsafe = self._unsafe(reading)
            planned_end = ended is not None and self._resolve(pc, ended[1]) == END
            if unsafe and not planned_end:  # a limit that ends the test on this reading was planned for it
                raise SafetyStop(unsafe)
            at_edge = bool(edges) and now >= edge_at - 1e-9
            self._maybe_record(state, now, reading, ctl, ins.index, rule, force=bool(ended) or at_edge)
            if ended:
                reason, target = ended
                for check in body.check:
                    value = self._check_value(check.kind, ctl, state)
                    if value is not None and _holds(check.op, value, check.value):
                        reason, target = f"{reason}; then {check.kind} {check.op} {check.value:g}", check.then
                        break
                self.store.step_ended(self._step_count, now - self._start, reason)
                self._after_step(ctl, reason, state)
                return self._resolve(pc, target)
            if at_edge:
                edges.pop(0)
                await self._apply(ctl, t_step, reading.voltage)
                next_sample = now + PULSE_SETTLE
                continue
            interval = self._next_interval(period, limits, ctl, state)
            if ctl.dynamic:
                # hold the value of the middle of the coming interval: a ramp or a linear drive is
                # then followed with its charge exact, as by the midpoint rule
                t_apply = t_step + interval / 2
                if edges:
                    t_apply = min(t_apply, edges[0] - 1e-6)
                await self._apply(ctl, t_apply, reading.voltage)
            next_sample = now + interval

    async def _run_set(self, pc: int, body: SetBody) -> int:
        """New temperature and pressure setpoints, in sequence with the steps; takes no time."""
        ins = self.program.instrs[pc]
        self._step_count += 1
        now = self.clock.now()
        self.store.step_started(self._step_count, ins.index, "Set", _dotted(ins.path), self._cycle, now - self._start)
        if body.temperature is not None:
            await self._track.set_temperature(body.temperature)
        if body.pressure is not None:
            await self._track.set_pressure(body.pressure / 1e6)
        self._event("conditions", f"set {self._track.describe()}")
        self.store.step_ended(self._step_count, now - self._start, f"set {self._track.describe()}")
        return pc + 1

    async def _run_eis(self, pc: int, body: EisBody) -> int:
        """An impedance spectrum on the potentiostat, the cell handed over safely both ways."""
        ins = self.program.instrs[pc]
        pstat = self.channel.potentiostat
        assert pstat is not None, "checked before the run: an EIS step needs a potentiostat"
        self._step_count += 1
        began = self.clock.now()
        self.store.step_started(self._step_count, ins.index, "EIS", _dotted(ins.path), self._cycle, began - self._start)
        # the cycler lets go of the cell first, and says so, before the potentiostat's cell goes on
        await self.channel.cycler.output(False)
        if await self.channel.cycler.output_is_on():
            raise SafetyStop("the cycler's output did not turn off; the potentiostat was not connected")
        self._event("handover", f"{self.channel.cycler.name} output off and confirmed; {pstat.name} takes the cell")
        if isinstance(body.bias, float):
            e_dc = body.bias
        else:
            ocp = await pstat.open_circuit_potential(interval=0.1, duration=1.0)
            e_dc = sum(ocp) / len(ocp)
        points = await pstat.impedance(f_start=body.start, f_end=body.end, n_points=body.n_points(),
                                       amplitude=body.amplitude, e_dc=e_dc)
        # the script ends with cell_off: its end is the potentiostat letting go
        self._event("handover", f"{pstat.name} cell off (its script ended); the cycler may take the cell")
        now = self.clock.now()
        spectrum = [(p.frequency, p.z_real, p.z_imag) for p in points]
        self.store.add_spectrum(self._step_count, now - self._start, spectrum)
        reason = f"spectrum of {len(points)} points"
        try:
            args = ([p[0] for p in spectrum], [p[1] for p in spectrum], [p[2] for p in spectrum])
            fit = fit_spectrum(*args) if self.clock.virtual else await asyncio.to_thread(fit_spectrum, *args)
        except ValueError as exc:
            self._event("fit", f"no circuit fit for the spectrum of step {self._step_count}: {exc}")
        else:
            self.store.add_fit(self._step_count, now - self._start, fit.circuit, fit.r_ohmic, fit.r_interfacial,
                               fit.parameters, fit.rel_rmse)
            reason += f"; R_ohmic {fit.r_ohmic:.4g} ohm, R_interfacial {fit.r_interfacial:.4g} ohm"
        self._last = Reading(voltage=e_dc, current=0.0)
        state = _StepState(start=began)
        ctl = Control("EIS", "current", lambda t, v: 0.0, self.channel.cell.voltage_max, [], 0)
        self._maybe_record(state, now, self._last, ctl, ins.index, None, force=True)
        self.store.step_ended(self._step_count, now - self._start, reason)
        return pc + 1

    async def _apply(self, ctl: Control, t_step: float, voltage: float) -> None:
        value = ctl.setpoint(t_step, voltage)
        if ctl.mode == "current":
            await self.channel.cycler.source_current(value, voltage_limit=ctl.compliance)
            self._held = value
        else:
            await self.channel.cycler.source_voltage(value, current_limit=ctl.compliance)
            self._held = None

    def _advance_cycle(self, ctl: Control, explicit: bool) -> None:
        if self.profile.cycle_counting == "explicit":
            starts = explicit
        else:
            starts = ctl.direction > 0 and self._discharged and not ctl.step_type.startswith("Rest")
        if starts and self._cycle_has_run:
            self._cycle += 1
            self._discharged = False
            self._acc = [0.0, 0.0, 0.0, 0.0]
        self._cycle_has_run = True
        if ctl.direction < 0:
            self._discharged = True

    def _after_step(self, ctl: Control, reason: str, st: _StepState) -> None:
        """A discharge that reached its voltage limit measures the capacity (the first is the reference)."""
        if ctl.step_type == "CC Discharge" and reason.startswith("voltage") and st.discharge_ah > 0:
            self._measured_capacity = st.discharge_ah
            if self._reference_capacity is None:
                self._reference_capacity = st.discharge_ah

    def _resolve(self, pc: int, target: str | int) -> int:
        return self.program.target(pc, target) if isinstance(target, str) else target

    def _check_value(self, kind: str, ctl: Control, st: _StepState) -> float | None:
        if kind == "retention":
            if not self._reference_capacity or ctl.direction >= 0:
                return None
            return st.discharge_ah / self._reference_capacity
        if kind == "step_capacity":
            return max(st.charge_ah, st.discharge_ah)
        return self._acc[0] if ctl.direction > 0 else self._acc[1]

    # --- limits ----------------------------------------------------------------------------
    def _resolve_limits(self, ctl: Control) -> list[Limit]:
        """C-rates in amps, and each voltage limit's direction made explicit."""
        out = []
        assert self._last is not None
        for lim in ctl.limits:
            if lim.kind == "current" and lim.c_rate is not None:
                lim = lim.model_copy(update={"value": lim.c_rate * self._capacity()})
            if lim.op is None:
                if lim.kind == "voltage":
                    rising = ctl.direction > 0 or (ctl.direction == 0 and self._last.voltage < lim.value)
                    op = ">=" if rising else "<="
                else:
                    op = "<=" if lim.kind in ("current", "dvdt", "didt") else ">="
                lim = lim.model_copy(update={"op": op})
            out.append(lim)
        if ctl.duration is not None:
            out.append(Limit(kind="time", op=">=", value=ctl.duration))
        return out

    def _ended(
        self, ctl: Control, limits: list[Limit], st: _StepState, r: Reading, t_step: float
    ) -> tuple[str, str | int] | None:
        for lim in limits:
            value = self._observe(lim.kind, ctl, st, r, t_step)
            if value is None:
                continue
            tol = VOLTAGE_TOLERANCE if lim.kind == "voltage" else 1e-9 if lim.kind == "time" else 0.0
            if (lim.op == ">=" and value >= lim.value - tol) or (lim.op == "<=" and value <= lim.value + tol):
                return lim.describe() if lim.kind != "time" else f"time {lim.value:g} s", lim.then
        return None

    def _observe(self, kind: str, ctl: Control, st: _StepState, r: Reading, t_step: float) -> float | None:
        if kind == "voltage":
            return r.voltage
        if kind == "current":
            return abs(r.current)
        if kind == "time":
            return t_step
        if kind == "step_capacity":
            return max(st.charge_ah, st.discharge_ah)
        if kind == "step_energy":
            return max(st.charge_wh, st.discharge_wh)
        if kind == "cycle_capacity":
            return self._acc[0] if ctl.direction > 0 else self._acc[1]
        if kind == "cycle_energy":
            return self._acc[2] if ctl.direction > 0 else self._acc[3]
        if kind in ("dvdt", "didt") and len(st.history) == 2:
            (t0, a), (t1, b) = st.history
            if t1 <= t0:
                return None
            delta = (b.voltage - a.voltage) if kind == "dvdt" else (b.current - a.current)
            return abs(delta) / (t1 - t0)
        if kind == "temperature":
            return self._temperature()
        if kind == "pressure" and self._cond.pressure_mpa is not None:
            return self._cond.pressure_mpa * 1e6
        return None

    def _temperature(self) -> float | None:
        """The cell's temperature where it has a thermocouple, the chamber air otherwise."""
        return self._cond.cell_c if self._cond.cell_c is not None else self._cond.ambient_c

    def _stable(self, body: WaitBody, st: _StepState, now: float) -> tuple[str, str] | None:
        """A wait step: ended once temperature and pressure have been within tolerance long enough."""
        tol_t, tol_p = body.tolerances()
        off = out_of_tolerance(
            self._cond, temperature=body.temperature, temperature_tol=tol_t,
            pressure_mpa=None if body.pressure is None else body.pressure / 1e6, pressure_tol_mpa=tol_p / 1e6,
        )
        if off:
            st.stable_since = None
            if now - st.start >= body.timeout - 1e-9:
                raise ProfileFailed(f"waited {human_duration(body.timeout)}: " + "; ".join(off))
            return None
        if st.stable_since is None:
            st.stable_since = now
        if now - st.stable_since >= body.duration - 1e-9:
            return f"stable for {human_duration(body.duration)}", "next"
        return None

    def _budget_ended(self, now: float) -> tuple[str, str | int] | None:
        for b in self._budgets:
            if now >= b.deadline - 1e-9:
                return f"{b.name} ran out", b.target
        return None

    def _next_deadline(self, limits: list[Limit], start: float) -> float:
        times = [start + lim.value for lim in limits if lim.kind == "time"]
        return min([*times, *(b.deadline for b in self._budgets)], default=math.inf)

    def _next_interval(self, period: float, limits: list[Limit], ctl: Control, st: _StepState) -> float:
        """The sample period, shortened while the voltage closes in on a voltage limit.

        The interval shrinks to a quarter of the time to the crossing the last two samples predict,
        and to MIN_INTERVAL inside the approach window, so a steep end-of-discharge knee is caught
        within a second, not a period.
        """
        if len(st.history) < 2:
            return period
        (t0, a), (t1, b) = st.history
        if t1 <= t0:
            return period
        slope = (b.voltage - a.voltage) / (t1 - t0)
        interval = period
        for lim in limits:
            if lim.kind != "voltage":
                continue
            gap = lim.value - b.voltage
            if slope == 0 or gap / slope <= 0:
                continue
            if abs(gap) < APPROACH_WINDOW:  # a knee can steepen tenfold between two samples
                interval = min(interval, MIN_INTERVAL)
            else:
                interval = min(interval, max(MIN_INTERVAL, gap / slope / 4))
        return interval

    # --- samples ---------------------------------------------------------------------------
    def _take(self, st: _StepState, now: float, r: Reading) -> None:
        """Integrate charge and energy since the previous sample of this step.

        While a current source holds its setpoint the current was that value all interval long
        (readings are taken under the held source), so the interval counts at the reading's
        current; otherwise (a voltage source, or a current source in compliance) the current
        moved, and the trapezoid rule counts it.
        """
        if st.history:
            t0, r0 = st.history[-1]
            hours = (now - t0) / 3600.0
            held = self._held
            if held is not None and abs(r.current - held) <= max(1e-8, 1e-3 * abs(held)):
                ah = r.current * hours
                wh = r.current * (r0.voltage + r.voltage) / 2 * hours
            else:
                ah = (r0.current + r.current) / 2 * hours
                wh = (r0.current * r0.voltage + r.current * r.voltage) / 2 * hours
            if ah >= 0:
                st.charge_ah += ah
                st.charge_wh += max(wh, 0.0)
                self._acc[0] += ah
                self._acc[2] += max(wh, 0.0)
            else:
                st.discharge_ah -= ah
                st.discharge_wh -= min(wh, 0.0)
                self._acc[1] -= ah
                self._acc[3] -= min(wh, 0.0)
        st.history = [*st.history[-1:], (now, r)]
        self._last = r

    def _unsafe(self, r: Reading) -> str | None:
        """Why a reading is outside what the cell may see, or None."""
        cell = self.channel.cell
        if math.isnan(r.voltage) or math.isnan(r.current):
            return f"the cycler returned an overflow reading ({r.voltage}, {r.current})"
        low, high = cell.voltage_min - SAFE_MARGIN_LOW, cell.voltage_max + SAFE_MARGIN_HIGH
        if not low <= r.voltage <= high:
            return f"cell voltage {r.voltage:.4f} V is outside the safe window {low:g} to {high:g} V"
        safety = self.profile.safety
        if safety and safety.voltage and not safety.voltage[0] <= r.voltage <= safety.voltage[1]:
            lo, hi = safety.voltage
            return f"cell voltage {r.voltage:.4f} V is outside the profile's safety range {lo:g} to {hi:g} V"
        if safety and safety.current:
            lo, hi = (c.resolve(self.channel.cell.capacity) for c in safety.current)
            if not lo <= r.current <= hi:
                return f"current {r.current:.6g} A is outside the profile's safety range {lo:g} to {hi:g} A"
        temperature, pressure = self._temperature(), self._cond.pressure_mpa
        if safety and safety.temperature and temperature is not None:
            lo, hi = safety.temperature
            if not lo <= temperature <= hi:
                return f"temperature {temperature:.2f} degC is outside the profile's safety range {lo:g} to {hi:g} degC"
        if safety and safety.pressure and pressure is not None:
            lo, hi = (x / 1e6 for x in safety.pressure)
            if not lo <= pressure <= hi:
                return f"stack pressure {pressure:.3f} MPa is outside the profile's safety range {lo:g} to {hi:g} MPa"
        return None

    def _maybe_record(
        self, st: _StepState, now: float, r: Reading, ctl: Control, index: int, rule: RecordRule | None, force: bool
    ) -> None:
        last = st.last_recorded
        if not (force or last is None or rule is None or _rule_due(rule, last, now, r)):
            return
        st.last_recorded = (now, r)
        t = now - self._start
        c = self._cond
        sample = Sample(
            t, self.clock.unix(now), r.voltage, r.current, self._cycle, self._step_count, index,
            ctl.step_type, *self._acc, c.ambient_c, c.cell_c,
            None if c.pressure_mpa is None else c.pressure_mpa * 1e6, c.displacement_um,
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


def _holds(op: str, value: float, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def _rule_due(rule: RecordRule, last: tuple[float, Reading], now: float, r: Reading) -> bool:
    t0, r0 = last
    return (
        (rule.every is not None and now - t0 >= rule.every - 1e-9)
        or (rule.voltage is not None and abs(r.voltage - r0.voltage) >= rule.voltage)
        or (rule.current is not None and abs(r.current - r0.current) >= rule.current)
    )


def _dotted(path: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" if k == 0 else f".steps[{i}]" for k, i in enumerate(path))
