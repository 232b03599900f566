"""The profile engine: runs one profile on one channel.

The walker (`bench.walker`) moves through the compiled program; for every leaf step the engine arms
the instrument's limit with the setpoint before the output goes on, then runs the sampling loop:
sample at the step's period (exactly at time limits and pulse edges, faster near a voltage limit),
integrate charge and energy, ask the policy (`bench.policy`) whether a limit was crossed or a
reading is unsafe, and publish what happened on the run's event stream (`bench.events`). All that
must outlive a sample lives in a `RunState`, saved at every step boundary and at an interval. The
output goes off at the end, on any error, and on cancellation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbench.bench.runtime import blocks, policy
from cellbench.bench.runtime.channel import Channel
from cellbench.bench.runtime.clock import Clock, utc
from cellbench.bench.runtime.cycles import CycleBook
from cellbench.bench.runtime.events import (
    CycleCompleted,
    EventBus,
    Note,
    NoteKind,
    RunEvent,
    SafetyTripped,
    Sample,
    SampleTaken,
    SpectrumFitted,
    SpectrumMeasured,
    StateSaved,
    StepEnded,
    StepStarted,
)
from cellbench.bench.runtime.impedance_fit import fit_spectrum
from cellbench.bench.runtime.latest import Latest
from cellbench.bench.runtime.link import RECOVERABLE, CyclerLink
from cellbench.bench.runtime.runstate import Ending, EndKind, RunState, RunStatus, StepProgress, Totals
from cellbench.bench.runtime.shorts import ShortWatch
from cellbench.bench.runtime.track import ProfileFailed, Track, out_of_tolerance, settled
from cellbench.bench.runtime.walker import Walker, dotted
from cellbench.profiles.conditions import SetBody, WaitBody
from cellbench.profiles.controls import PULSE_SETTLE, Control, SourceMode, StepType, build_control
from cellbench.profiles.program import END, Program, compile_profile
from cellbench.profiles.schema import (
    EisBody,
    EisStep,
    LeafStep,
    Limit,
    Profile,
    RecordRule,
    ScheduleBody,
    SetStep,
    StepBody,
)
from cellbench.profiles.units import human_duration
from cellbench.roles import (
    BlockReading,
    Buffered,
    Conditions,
    InstrumentFault,
    OnBoard,
    Reading,
)

log = logging.getLogger(__name__)
EDGE_FLOOR = 1e-7  # A: a change of current smaller than this is no edge

CHECKPOINT_EVERY = 60.0  # s of test time between saved run states within a step


FROZEN_AFTER = 20  # identical measured values in a row, with current flowing, that mean a frozen reading


class SafetyStop(Exception):
    """A reading outside what the cell may see: the run ends in the safe state."""


class RecordingFailed(Exception):
    """The run can no longer be recorded (a full disk): the run ends in the safe state."""


class Interrupted(Exception):
    """Stopped from outside (a signal, an operator): the run ends in the safe state, recorded `interrupted`."""


class Paused(Interrupted):
    """An operator paused the channel: the output goes off and the state is saved, and the run's own controller
    may carry it on from there (`Engine.run(resume=...)`); the pause is not test time."""


@dataclass(frozen=True)
class Progress:
    test_time: float
    step_count: int
    total_steps: int
    cycle: int
    step_type: str
    voltage: float
    current: float
    ended: str | None = None  # on a run's last progress: how it ended or stopped (completed, paused, latched, ...)

    @classmethod
    def of(cls, sample: Sample, total_steps: int) -> Progress:
        return cls(sample.test_time, sample.step_count, total_steps, sample.cycle, sample.step_type, sample.voltage,
                   sample.current)


@dataclass(frozen=True)
class Outcome:
    completed: bool
    reason: str
    test_time: float
    steps: int
    cycles: int
    status: RunStatus = RunStatus.COMPLETED


@dataclass
class _Samples:
    """The running step's recent samples (test time, reading): working memory, not state."""

    history: list[tuple[float, Reading]] = field(default_factory=list)  # the last two
    same: int = 0  # how many readings in a row have measured exactly the same value
    last_ah: float = 0.0  # charge of the last sampling interval (how far a limit may have been overshot)
    last_recorded: tuple[float, Reading] | None = None
    counted_from: float | None = None  # the step's edge, when its first reading comes 10 ms after it


@dataclass
class _StepRun:
    """A leaf step as it runs: what it is, its control and progress, its limits and sampling plan."""

    body: StepBody | WaitBody  # the step's body, as the language gives it: its class is its kind
    ctl: Control
    step: StepProgress
    limits: list[Limit]
    approach: list[Limit]  # the limits closed in on (a CCCV's held voltage among them)
    edges: list[float]  # the control's current edges still to come, s into the step
    period: float
    rule: RecordRule | None
    watch: ShortWatch
    next_sample: float = 0.0
    scheduled: float = 0.0  # when the sample being taken was due
    work: _Samples = field(default_factory=lambda: _Samples())


@dataclass
class _Verdict:
    """What one reading means for the step."""

    short: str | None
    ended: Ending | None
    unsafe: str | None

    @property
    def alarm(self) -> bool:
        return self.short is not None or self.unsafe is not None


class Engine:
    """Executes a profile on a channel, publishing what happens to an event bus, on a clock."""

    def __init__(
        self,
        profile: Profile,
        channel: Channel,
        events: EventBus,
        clock: Clock,
        *,
        base_dir: Path = Path("."),
        checkpoint_every: float = CHECKPOINT_EVERY,
        on_progress: Callable[[Progress], None] | None = None,
        notices: list[str] | None = None,
    ) -> None:
        self.profile = profile
        self.channel = channel
        self.events = events
        self.clock = clock
        self.base_dir = base_dir
        self.checkpoint_every = checkpoint_every
        self.program: Program = compile_profile(profile)
        self.state = RunState()
        self.walker = Walker(self.program, self.state)
        self._collaborators()
        self._origin = 0.0
        self._saved_at = 0.0
        self._last: Reading | None = None
        self._cond = Conditions()
        self._track = Track(channel, clock, lambda kind, message: self._note(NoteKind(kind), message))
        self._interrupt: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._notices = list(notices or [])
        self.latest = Latest()  # the channel as it stands: shared with the supervisor
        self._watch: ShortWatch | None = None  # the running step's short watch
        self._short_seen: str | None = None  # a short the supervisor found, for the engine to deal with
        if on_progress is not None:
            total = profile.executed_step_count()

            def progress(event: RunEvent) -> None:
                if isinstance(event, SampleTaken):
                    on_progress(Progress.of(event.sample, total))

            events.subscribe(progress)

    def _collaborators(self) -> None:
        """The walker's, the cycle book's and the cycler link's run state is the engine's (a new one on a resume)."""
        self.walker = Walker(self.program, self.state)
        self.book = CycleBook(self.profile, self.program, self.channel.cell, self.state)
        self.link = CyclerLink(self.channel, self.state, now=self._t, sleep_until=self._sleep_until, note=self._note,
                               look_before_on=self._look_before_on)

    # --- the run ---------------------------------------------------------------------------
    async def run(self, resume: RunState | None = None, outage: tuple[float, float] | None = None) -> Outcome:
        """Run the profile from its start, or from a saved state (`resume`) after an outage (Unix times)."""
        self._task = asyncio.current_task()
        if resume is None:
            self._origin = self.clock.start()
            self._note(NoteKind.START, f"profile '{self.profile.name}' on channel '{self.channel.name}'")
            self.walker.start(self.profile.time_limit)
        else:
            self._restore(resume, outage)
        for notice in self._notices:
            self._note(NoteKind.NOTICE, notice)
        # `completed` only once the program's end is reached: any other way out (an error nobody expected among
        # them) is recorded as what it was
        status, reason = RunStatus.FAILED, "failed: the run ended before the end of its profile"
        try:
            self._last = await self.channel.cycler.measure()
            if resume is not None:
                self._look_before_on(self._last, "resumed")
            await self._run_with_track()
            self.state.finished = True
            status, reason = RunStatus.COMPLETED, "completed"
        except ProfileFailed as exc:
            status, reason = RunStatus.FAILED, f"failed: {exc}"
            self._note(NoteKind.FAILED, str(exc))
        except asyncio.CancelledError:
            if not isinstance(self._interrupt, Interrupted | RecordingFailed | SafetyStop):
                status, reason = RunStatus.CANCELLED, "cancelled"
                self._note(NoteKind.CANCELLED, "the run was cancelled")
                raise
            if self._task is not None:
                self._task.uncancel()  # our own stop(): the run ends here, with an outcome
            status, reason = self._stopped(self._interrupt)
        except (Interrupted, RecordingFailed, SafetyStop) as exc:
            status, reason = self._stopped(exc)
        except InstrumentFault as exc:
            status, reason = RunStatus.FAULT, f"instrument fault: {exc}"
            self._note(NoteKind.FAULT, str(exc))
        except Exception as exc:  # recorded as it is, then raised on: never an `end: completed` for it
            status, reason = RunStatus.FAILED, f"failed: {type(exc).__name__}: {exc}"
            self._note(NoteKind.FAILED, reason)
            raise
        finally:
            await self.link.output_off()
            self._checkpoint()
            if status is not RunStatus.PAUSED:  # a paused run has not ended
                self._note(NoteKind.END, reason)
        return Outcome(status is RunStatus.COMPLETED, reason, self._t(), self.state.step_count, self.state.cycle,
                       status)

    def _restore(self, saved: RunState, outage: tuple[float, float] | None) -> None:
        """Carry on from a saved state: test time goes on from where it stood, the outage is not test time."""
        self.state = saved.model_copy(deep=True)
        self._collaborators()
        self.latest.step_type = saved.step.step_type if saved.step is not None else None
        # test time goes on from the last sample counted: what came after it was not measured
        self._origin = self.clock.start() - saved.accounted_until
        self._saved_at = saved.accounted_until
        self._track.temperature, self._track.pressure = saved.temperature, saved.pressure_pa
        where = f"step {saved.step_count}, cycle {saved.cycle}, test time {human_duration(saved.accounted_until)}"
        if outage is not None:
            began, ended = outage
            self._note(NoteKind.OUTAGE, f"no control from {utc(began)} to {utc(ended)} "
                                        f"({human_duration(ended - began)})")
        self._note(NoteKind.RESUMED, f"resumed at {where}")

    def stop(self, exc: Interrupted | RecordingFailed | SafetyStop) -> None:
        """End the run now, in the safe state, for this reason; call it on the run's loop.

        A run waiting for its next sample wakes at once; one busy with an instrument (an EIS sweep, a
        stabilisation) is cancelled. Either way the output goes off and the reason is recorded.
        """
        if self._interrupt is not None:
            return
        self._interrupt = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif self._task is not None and not self._task.done():
            self._task.cancel()

    async def set_variable(self, number: int, value: float, reason: str) -> tuple[bool, str]:
        """The operator changes a variable of the schedule the cycler runs now; call it on the run's loop. Returns
        whether it was done and what to tell them; the change is recorded as a note. Refused when the step is the
        bench's own (it has no cycler variables) or the run is ending."""
        step = self.state.step
        cycler = self.channel.cycler
        if self._interrupt is not None or step is None:
            return False, "the run is not in a step"
        if step.step_type is not StepType.SCHEDULE or not isinstance(cycler, OnBoard):
            return False, (f"step {step.step_count} ({step.step_type.value}) is run by the bench, not by a schedule "
                           "on the cycler: it has no variables to set")
        try:
            await cycler.set_variable(number, value)
        except InstrumentFault as exc:  # the schedule has just ended, or the cycler refused: the run goes on
            return False, f"{cycler.name} did not set variable {number}: {exc}"
        said = f"variable {number} set to {value:g} in step {step.step_count}"
        self._note(NoteKind.SCHEDULE, f"{said} by the operator" + (f" ({reason})" if reason else ""))
        return True, said

    def _stopped(self, exc: BaseException) -> tuple[RunStatus, str]:
        if isinstance(exc, SafetyStop):
            self.events.publish(SafetyTripped(str(exc), self._t()))
            self._note(NoteKind.SAFETY, str(exc))
            return RunStatus.SAFETY_STOP, f"safety stop: {exc}"
        if isinstance(exc, Paused):
            self._note(NoteKind.PAUSED, str(exc))
            return RunStatus.PAUSED, f"paused: {exc}"
        if isinstance(exc, RecordingFailed):
            self._note(NoteKind.RECORDING, str(exc))
            return RunStatus.RECORDING_FAILED, f"recording failed: {exc}"
        self._note(NoteKind.INTERRUPTED, str(exc))
        return RunStatus.INTERRUPTED, f"interrupted: {exc}"

    async def _run_with_track(self) -> None:
        """The electrical steps, with the pressure-temperature track running alongside."""
        if not self.profile.conditions:
            await self._execute()
            return
        steps = asyncio.ensure_future(self._execute())
        track = asyncio.ensure_future(self._track.run(self.profile.conditions))
        try:
            done, _ = await asyncio.wait({steps, track}, return_when=asyncio.FIRST_EXCEPTION)
            if track in done and (error := track.exception()) is not None:
                steps.cancel()
                await asyncio.gather(steps, return_exceptions=True)
                raise error
            await steps  # the track may still be holding: the steps decide when the test is over
        finally:
            for task in (steps, track):
                task.cancel()
            await asyncio.gather(steps, track, return_exceptions=True)

    async def _execute(self) -> None:
        while (pc := self.walker.next_step(self._t())) is not None:
            self.walker.jump(await self._run_step(pc))
            self._checkpoint()

    # --- one step --------------------------------------------------------------------------
    def _begin_step(self, pc: int, step_type: StepType) -> StepProgress:
        st, ins = self.state, self.program.instrs[pc]
        st.step_count += 1
        st.step = StepProgress(step_count=st.step_count, pc=pc, step_type=step_type, start=self._t())
        st.accounted_until = st.step.start
        self.latest.step_type = step_type
        started = StepStarted(st.step_count, ins.index, step_type, dotted(ins.path), st.cycle, st.step.start)
        self.events.publish(started)
        return st.step

    def _end_step(self, ending: Ending, t: float) -> None:
        self.events.publish(StepEnded(self.state.step_count, t, ending.reason, ending.kind))
        self.state.step = None
        self.latest.discharging = self.latest.step_type = None
        self._watch = None

    def _look_before_on(self, open_circuit: Reading, what: str) -> None:
        """Before the output goes on into a cell the run has not watched (a resume, a reconnection that found it
        off): refused, a safety stop with the reading, when the cell is outside its safe window."""
        why = policy.unsafe(open_circuit, self.channel.cell, self.profile.safety, Conditions())
        if why:
            raise SafetyStop(f"not {what}: the cell reads {open_circuit.voltage:.4f} V at open circuit: {why}")

    def watch_short(self, t: float, reading: Reading) -> str | None:
        """A reading the supervisor took between the engine's samples, through the step's own short signatures
        (the same window, each kind found once per step): a short is seen within the supervisor's period, whatever
        the sample period. Returns the short found, or None; call it on the run's loop."""
        return None if self._watch is None else self._watch.look(t, reading)

    def short_seen(self, short: str) -> None:
        """The supervisor found a short the profile flags or looks at with a spectrum: the engine wakes and deals
        with it as with one of its own samples (a stop, the supervisor makes itself)."""
        self._short_seen = short
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _run_step(self, pc: int) -> int:
        """One step of the program; returns where the program goes next. A leaf step's loop reads as
        wait -> measure -> account -> decide -> record -> act -> reapply."""
        ins = self.program.instrs[pc]
        resumed = self.state.step if self.state.step is not None and self.state.step.pc == pc else None
        if resumed is not None and isinstance(ins.node, SetStep | EisStep):
            self.state.step_count -= 1  # run again from its start, under the same step number
            self.state.step = resumed = None
        match ins.node:
            case SetStep(set=body):
                return await self._run_set(pc, body)
            case EisStep(eis=body):
                return await self._run_eis(pc, body)
        run = await self._enter(pc, resumed)
        if (target := await self._run_on_instrument(pc, run)) is not None:
            return target
        while True:
            t, reading = await self._wait_and_measure(run)
            if reading is None:
                continue
            self._take(run.work, run.step.totals, t, reading)
            verdict = await self._decide(run, t, reading)
            at_edge = bool(run.edges) and t >= run.step.start + run.edges[0] - 1e-9
            # the reading that trips a stop is always recorded
            self._maybe_record(run.work, t, reading, run.ctl.step_type, ins.index, run.rule,
                               force=bool(verdict.ended) or at_edge or verdict.alarm)
            if (target := await self._act(pc, run, t, verdict)) is not None:
                return target
            if t - self._saved_at >= self.checkpoint_every:
                self._checkpoint()
            await self._reapply(run, t, reading, at_edge)

    async def _run_on_instrument(self, pc: int, run: _StepRun) -> int | None:
        """A step the instrument runs itself (blocks.py; a Buffered cycler on a channel that allows it), read in
        blocks: each reading accounted, judged and recorded in order as the per-reading loop does, stamped with
        the instrument's own time. Returns where the program goes next, or None for a step it cannot run."""
        found = self.channel.cycler
        if not (self.channel.steps_on_instrument and isinstance(found, Buffered)) or isinstance(
                run.body, WaitBody | ScheduleBody) or run.approach is not run.limits or self._last is None:
            return None
        cycler: Buffered = found
        planned = blocks.plan_for(run.ctl, run.limits, period=run.period, voltage=self._last.voltage,
                                  cell=self.channel.cell, safety=self.profile.safety)
        if planned is None:
            return None
        every, fine = blocks.read_interval(run.period), planned.plan.period
        # readings on the profile's period while the end is far; every `fine` once the readings near it
        period = run.period if planned.edge is not None else fine
        due, soon = self._t(), math.inf  # soon: when the readings before a re-arm said to read next
        while True:  # one block, or one after another (the count ran out, or the end drew near)
            deadline = policy.next_deadline(run.limits, run.step.start, self.state.budgets)
            count = blocks.count_for(period, deadline - self._t())
            plan = dataclasses.replace(planned.plan, period=period, count=count)
            try:
                await cycler.start_block(plan)
            except RECOVERABLE as exc:  # reconnected within the grace time: a new block from here
                cycler = await self._recovered_buffered(exc)
                continue
            t0, ended, wake, read = self._t(), False, min(self._t() + every, soon), 0
            got: list[BlockReading] = []
            while not ended:
                await self._sleep_until(min(wake, deadline + period))
                try:
                    got, ended = await cycler.block_readings()
                except RECOVERABLE as exc:  # reconnected: the block is taken up where it was read to
                    cycler = await self._recovered_buffered(exc)
                    await cycler.resume_block(plan, read)
                    got, ended = await cycler.block_readings()
                read += len(got)
                if self.channel.chamber or self.channel.press:
                    self._cond = await self.channel.conditions()
                target, due = await self._block_taken(pc, run, planned, t0, got, ended, due)
                if target is not None:
                    await cycler.end_block()
                    return target
                if self._t() - self._saved_at >= self.checkpoint_every:
                    self._checkpoint()
                if not ended and period > fine and blocks.near_end(planned, got[-3:], blocks.NEAR * run.period):
                    rest = await cycler.end_block()  # re-armed at the fine period from here
                    target, due = await self._block_taken(pc, run, planned, t0, rest, True, due)
                    if target is not None:
                        return target
                    if rest and blocks.at_edge(planned, rest[-1]):  # the instrument ended it just before
                        got, ended = rest, True
                        break
                    period, every = fine, min(every, blocks.NEAR_READS * fine)  # near the end: read often
                    soon = blocks.next_read(planned, self._t(), every, got[-3:], t0)
                    break
                wake = blocks.next_read(planned, self._t(), every, got[-3:], t0)
            if ended and got and (target := await self._stopped_by_instrument(pc, run, planned, got[-1],
                                                                              t0)) is not None:
                return target

    async def _recovered_buffered(self, exc: InstrumentFault) -> Buffered:
        """The cycler reconnected within the grace time (or InstrumentFault past it), as a Buffered one."""
        await self.link.recover(exc)
        found = self.channel.cycler
        if not isinstance(found, Buffered):
            raise InstrumentFault(found.name, "reconnected, it no longer runs steps itself")
        return found

    async def _block_taken(self, pc: int, run: _StepRun, planned: blocks.Planned, t0: float,
                           got: list[BlockReading], ended: bool, due: float) -> tuple[int | None, float]:
        """A block's new readings taken in order: those on the profile's period, the last of an ended block, and
        any at the step's end or outside the window (every one was judged by the instrument). Where the program
        goes next if one ended the step, and when the next reading is due."""
        for k, b in enumerate(got):
            if t0 + b.t < due - 1e-9 and not (ended and k == len(got) - 1) and not blocks.at_edge(planned, b):
                continue
            due = t0 + b.t + run.period
            if (target := await self._block_reading(pc, run, t0, b)) is not None:
                return target, due
        return None, due

    async def _block_reading(self, pc: int, run: _StepRun, t0: float, b: BlockReading) -> int | None:
        t, reading = t0 + b.t, Reading(b.voltage, b.current)
        if not run.work.history:  # the step's first reading comes a period in: counted from where it began
            run.work.history = [(max(run.step.start, min(self.state.accounted_until, t)), reading)]
        self.latest.reading = (t, reading, self._cond)
        self._take(run.work, run.step.totals, t, reading)
        verdict = await self._decide(run, t, reading)
        self._maybe_record(run.work, t, reading, run.ctl.step_type, self.program.instrs[pc].index, run.rule,
                           force=bool(verdict.ended) or verdict.alarm)
        return await self._act(pc, run, t, verdict)

    async def _stopped_by_instrument(self, pc: int, run: _StepRun, planned: blocks.Planned, last: BlockReading,
                                     t0: float) -> int | None:
        """A block that ended on a limit of the instrument's (its output off) where the host's judgement of the
        same reading did not end the step: ended as the instrument ended it (its safety window: a safety stop),
        never carried on with the output switched on again."""
        plan, value = planned.plan, last.voltage if planned.plan.source == "current" else last.current
        if plan.window is not None and not plan.window[0] <= value <= plan.window[1]:
            raise SafetyStop(f"the instrument's safety window {plan.window[0]:g} to {plan.window[1]:g} stopped the "
                             f"step at {value:.6g}")
        if plan.stop is not None and plan.stop.met(value) and planned.stop_from is not None:
            lim = planned.stop_from
            verdict = _Verdict(None, Ending(EndKind(lim.kind), lim.describe(), lim.then), None)
            return await self._act(pc, run, t0 + last.t, verdict)
        return None

    async def _enter(self, pc: int, resumed: StepProgress | None) -> _StepRun:
        """Begin a leaf step (or take up the one a saved state was in): its control, the cycle it starts, its
        setpoint armed before the output goes on, and the step's limits and sampling plan."""
        ins = self.program.instrs[pc]
        assert isinstance(ins.node, LeafStep)
        body = ins.node.body
        assert isinstance(body, StepBody | WaitBody), "set and eis steps are run by their own methods"
        cell, st, last = self.channel.cell, self.state, self._last
        assert last is not None
        ctl = build_control(
            ins.node, capacity=self.book.capacity(), v_min=cell.voltage_min, v_max=cell.voltage_max,
            last_voltage=last.voltage, last_cc_current=st.last_cc_current, base_dir=self.base_dir,
        )
        if resumed is None:
            if ctl.step_type.is_constant_current:
                st.last_cc_current = abs(ctl.setpoint(0.0, last.voltage))
            finished = self.book.advance(ctl, body.new_cycle)
            if finished is not None:
                number, totals = finished
                ref = st.reference_capacity
                self.events.publish(CycleCompleted(number, self._t(), *totals.as_tuple(),
                                                   totals.discharge_ah / ref if ref else None,
                                                   self.book.finished_whole))
            if finished is not None and (short := self.book.efficiency_signature(*finished)):
                await self._short_found(short, planned_end=False)
            step = self._begin_step(pc, ctl.step_type)
        else:  # a step in progress when the state was saved: its limits count the time already done
            step = resumed
            step.stable_since = None
        self._checkpoint()
        if isinstance(body, WaitBody) and body.set == "if owner":
            await self._set_if_owner(body)
        onboard = isinstance(body, ScheduleBody)
        if isinstance(body, ScheduleBody):
            await self._start_schedule(body, again=resumed is not None)
        else:
            await self.link.apply(ctl, self._t() - step.start, last.voltage)
            await self.channel.cycler.output(True)
        # a discharge's current of the other sign is a fault: judged only once its setpoint is in effect (a reading
        # the supervisor took as the previous charge still flowed once tripped the step's start)
        self.latest.discharging = (
            (ctl.compliance if ctl.mode is SourceMode.VOLTAGE else abs(ctl.setpoint(0.0, last.voltage)))
            if ctl.step_type in policy.DISCHARGING else None)
        limits = policy.resolve_limits(ctl, capacity=self.book.capacity(), last_voltage=last.voltage)
        # a CCCV's current phase ends where its voltage reaches the held value: closed in on like a cut-off, so that
        # the current's first fall is sampled and counted exactly
        approach = limits
        if ctl.step_type in (StepType.CCCV_CHARGE, StepType.CCCV_DISCHARGE):
            approach = [*limits, Limit(kind="voltage", value=ctl.setpoint(0.0, last.voltage))]
        run = _StepRun(body, ctl, step, limits, approach, [e for e in ctl.edges if step.start + e >
                       self._t()], body.sample_period or self.profile.sample_period, body.record or self.profile.record,
                       ShortWatch(self.profile.short_detection, ctl), next_sample=max(step.start, self._t()))
        if resumed is None and not onboard and ctl.mode is SourceMode.CURRENT and abs(
                ctl.setpoint(0.0, last.voltage) - last.current) > max(EDGE_FLOOR, 0.01 * abs(last.current)):
            run.next_sample += PULSE_SETTLE  # a current edge: the first reading 10 ms after it (a true 10 ms DCIR)
            run.work.counted_from = step.start  # ... and the held current counted from the edge, not from then
        self._watch = run.watch
        return run

    async def _wait_and_measure(self, run: _StepRun) -> tuple[float, Reading | None]:
        """Sleep to the next sample, deadline or edge, then read the cycler (and the conditions). None: nothing to
        account this time (a short the supervisor found was dealt with, or the connection was recovered)."""
        deadline = policy.next_deadline(run.limits, run.step.start, self.state.budgets)
        edge_at = run.step.start + run.edges[0] if run.edges else math.inf
        run.scheduled = run.next_sample
        await self._sleep_until(min(run.next_sample, deadline, edge_at))
        if self._short_seen is not None:  # by the supervisor, between two samples: flag it, or rest for a spectrum
            short, self._short_seen = self._short_seen, None
            await self._short_found(short, planned_end=False)
            return self._t(), None
        t = self._t()
        try:
            reading = await self.channel.cycler.measure()
        except RECOVERABLE as exc:
            if not await self.link.recover(exc):
                run.work.history.clear()  # the output was off: nothing flowed across the gap
            run.next_sample = self._t()
            return t, None
        if self.channel.chamber or self.channel.press:
            self._cond = await self.channel.conditions()
        self.latest.reading = (t, reading, self._cond)
        self._check_not_frozen(run.work, run.ctl, reading)
        return t, reading

    async def _decide(self, run: _StepRun, t: float, reading: Reading) -> _Verdict:
        """What this reading means: a short, the step's end (a limit, a budget, stability, the cycler's schedule),
        an unsafe reading."""
        short = run.watch.look(t, reading)
        ended = (
            policy.budget_ended(self.state.budgets, t)
            or self._limit_reached(run.ctl, run.limits, run.work, run.step.totals, reading, t - run.step.start)
            or (self._stable(run.body, run.step, t) if isinstance(run.body, WaitBody) else None)
            or (await self._schedule_ended(run.body) if isinstance(run.body, ScheduleBody) else None)
        )
        unsafe = (policy.unsafe(reading, self.channel.cell, self.profile.safety, self._cond)
                  or policy.wrong_sign(reading, self.latest.discharging))
        return _Verdict(short, ended, unsafe)

    async def _act(self, pc: int, run: _StepRun, t: float, verdict: _Verdict) -> int | None:
        """Stop on a short or an unsafe reading (unless a limit planned to end the test on this very reading), or
        end the step: returns where the program goes next, or None while the step goes on."""
        ended = verdict.ended
        planned_end = ended is not None and self.walker.resolve(pc, ended.target) == END
        if verdict.short is not None:
            await self._short_found(verdict.short, planned_end)
        if verdict.unsafe and not planned_end:
            raise SafetyStop(verdict.unsafe)
        if ended is None:
            return None
        if isinstance(run.body, ScheduleBody) and ended.kind is not EndKind.SCHEDULE:  # ours ends the cycler's schedule
            await self.channel.cycler.output(False)
        self.state.cycle_totals.resolution_ah += run.work.last_ah
        ended = self.book.checked(run.body.check, ended, run.ctl, run.step.totals)
        self._end_step(ended, t)
        self.book.after_step(run.ctl, ended, run.step.totals, getattr(run.body, "reference", False))
        return self.walker.resolve(pc, ended.target)

    async def _reapply(self, run: _StepRun, t: float, reading: Reading, at_edge: bool) -> None:
        """The step goes on: the next edge's setpoint, or a dynamic control's value for the coming interval, and
        when to sample next (faster near a limit)."""
        t_step = t - run.step.start
        if at_edge:
            run.edges.pop(0)
            await self.link.apply_surely(run.ctl, t_step, reading.voltage)
            run.next_sample = t + PULSE_SETTLE
            return
        history = run.work.history
        interval = policy.next_interval(run.period, run.approach, history, self.book.emptied(run.ctl))
        if run.approach is not run.limits and _reached_hold(history, run.approach[-1].value):
            interval = policy.MIN_INTERVAL  # a CCCV's current has just begun to fall: fastest at first
        if run.ctl.dynamic:
            # hold the value of the middle of the coming interval: a ramp or a linear drive is
            # then followed with its charge exact, as by the midpoint rule
            t_apply = t_step + interval / 2
            if run.edges:
                t_apply = min(t_apply, run.edges[0] - 1e-6)
            await self.link.apply_surely(run.ctl, t_apply, reading.voltage)
        run.next_sample = policy.next_sample_at(run.scheduled, t, interval)

    async def _start_schedule(self, body: ScheduleBody, *, again: bool) -> None:
        """Assign and start the cycler's own schedule, and set its variables; on a resume, watch it again if it
        still runs (a schedule is never started twice for one step)."""
        cycler = self.channel.cycler
        if not isinstance(cycler, OnBoard):
            raise ProfileFailed(f"{cycler.name} runs no schedules of its own")
        self.state.setpoint = None  # nothing to apply again after a reconnect: the cycler runs the step
        if again:
            running = await cycler.schedule_running()
            self._note(NoteKind.SCHEDULE, f"schedule '{body.name}' on {cycler.name} "
                                          f"{'still runs: watched again' if running else 'ended while unwatched'}")
            return
        name = f"{self.profile.name} step {self.state.step_count}"[:72]
        await cycler.start_schedule(body.name, test_name=name, variables=dict(body.variables))
        said = ", ".join(f"{k} = {v:g}" for k, v in sorted(body.variables.items()))
        self._note(NoteKind.SCHEDULE, f"schedule '{body.name}' started on {cycler.name}"
                                      + (f" with variables {said}" if said else ""))

    async def _schedule_ended(self, body: ScheduleBody) -> Ending | None:
        if await self.channel.cycler.schedule_running():  # type: ignore[attr-defined]
            return None
        return Ending(EndKind.SCHEDULE, f"the cycler's schedule '{body.name}' ended", "next")

    async def _set_if_owner(self, body: WaitBody) -> None:
        """A wait with `set: if owner`: its setpoints given where this channel controls the instrument (its own,
        or a shared one it owns), only waited for where another channel sets them."""
        done, waited = [], []
        for value, role, text in ((body.temperature, "chamber", f"temperature {body.temperature:g} degC"),
                                  (body.pressure, "press", f"pressure {(body.pressure or 0) / 1e6:g} MPa")):
            if value is None:
                continue
            if role in self.channel.controls and getattr(self.channel, role) is not None:
                if role == "chamber":
                    await self._track.set_temperature(value)
                else:
                    await self._track.set_pressure(value)
                done.append(text)
            else:
                waited.append(text)
        said = [f"set {', '.join(done)}"] * bool(done) + [f"waits for {', '.join(waited)} set by the instrument's "
                                                          "owner"] * bool(waited)
        self._note(NoteKind.CONDITIONS, "; ".join(said))

    async def _run_set(self, pc: int, body: SetBody) -> int:
        """New temperature and pressure setpoints, in sequence with the steps; takes no time."""
        self._begin_step(pc, StepType.SET)
        if body.temperature is not None:
            await self._track.set_temperature(body.temperature)
        if body.pressure is not None:
            await self._track.set_pressure(body.pressure)
        said = f"set {self._track.describe()}"
        self._note(NoteKind.CONDITIONS, said)
        self._end_step(Ending(EndKind.SET, said, "next"), self._t())
        return pc + 1

    async def _run_eis(self, pc: int, body: EisBody) -> int:
        """An impedance spectrum on the potentiostat, the cell handed over safely both ways."""
        ins = self.program.instrs[pc]
        step = self._begin_step(pc, StepType.EIS)
        reason, e_dc = await self._spectrum(step.step_count, body)
        t = self._t()
        self._last = Reading(voltage=e_dc, current=0.0)
        self._maybe_record(_Samples(), t, self._last, StepType.EIS, ins.index, None, force=True)
        self._end_step(Ending(EndKind.SPECTRUM, reason, "next"), t)
        return pc + 1

    async def _spectrum(self, step_count: int, body: EisBody) -> tuple[str, float]:
        """A spectrum on the potentiostat, the cell handed over safely both ways: (what was found, the bias)."""
        pstat = self.channel.potentiostat
        assert pstat is not None, "checked before the run: an EIS step needs a potentiostat"
        # the cycler lets go of the cell first, and says so, before the potentiostat's cell goes on
        await self.channel.cycler.output(False)
        if await self.channel.cycler.output_is_on():
            raise SafetyStop("the cycler's output did not turn off; the potentiostat was not connected")
        self._note(NoteKind.HANDOVER,
                   f"{self.channel.cycler.name} output off and confirmed; {pstat.name} takes the cell")
        if isinstance(body.bias, float):
            e_dc = body.bias
        else:
            ocp = await pstat.open_circuit_potential(interval=0.1, duration=1.0)
            e_dc = sum(ocp) / len(ocp)
        # the potentiostat's current range for this cell: its 1C current, between 1 mA and 100 mA
        current_range = min(max(self.book.capacity() * 1.0, 1e-3), 0.1)  # Ah × 1/h is A
        points = await pstat.impedance(f_start=body.start, f_end=body.end, n_points=body.n_points(),
                                       amplitude=body.amplitude, e_dc=e_dc, current_range=current_range)
        # the script ends with cell_off: its end is the potentiostat letting go
        self._note(NoteKind.HANDOVER, f"{pstat.name} cell off (its script ended); the cycler may take the cell")
        t = self._t()
        spectrum = [(p.frequency, p.z_real, p.z_imag) for p in points]
        self.events.publish(SpectrumMeasured(step_count, t, spectrum))
        reason = f"spectrum of {len(points)} points"
        try:
            args = ([p[0] for p in spectrum], [p[1] for p in spectrum], [p[2] for p in spectrum])
            fit = fit_spectrum(*args) if self.clock.virtual else await asyncio.to_thread(fit_spectrum, *args)
        except (ValueError, ImportError) as exc:  # MissingExtra: the spectrum is recorded, the fit left to the desk
            self._note(NoteKind.FIT, f"no circuit fit for the spectrum of step {step_count}: {exc}")
        else:
            self.events.publish(SpectrumFitted(step_count, t, fit.circuit, fit.r_ohmic, fit.r_interfacial,
                                               fit.parameters, fit.rel_rmse))
            reason += f"; R_ohmic {fit.r_ohmic:.4g} ohm, R_interfacial {fit.r_interfacial:.4g} ohm"
        return reason, e_dc

    # --- limits ----------------------------------------------------------------------------
    def _limit_reached(
        self, ctl: Control, limits: list[Limit], work: _Samples, totals: Totals, r: Reading, t_step: float
    ) -> Ending | None:
        values: dict[str, float | None] = {
            lim.kind: policy.observe(lim.kind, direction=ctl.direction, step=totals, cycle=self.state.cycle_totals,
                                     history=work.history, reading=r, t_step=t_step, conditions=self._cond)
            for lim in limits
        }
        return policy.limit_reached(limits, values)

    def _stable(self, body: WaitBody, step: StepProgress, t: float) -> Ending | None:
        """A wait step: ended once temperature and pressure have been within tolerance long enough."""
        tol_t, tol_p = body.tolerances()
        off = out_of_tolerance(
            self._cond, temperature=body.temperature, temperature_tol=tol_t,
            pressure=body.pressure, pressure_tol=tol_p,
            sensor=body.sensor,
        )
        stable, step.stable_since = settled(off, t, began=step.start, since=step.stable_since,
                                            duration=body.duration, timeout=body.timeout, failing="waited")
        return Ending(EndKind.STABLE, f"stable for {human_duration(body.duration)}", "next") if stable else None

    def _check_not_frozen(self, work: _Samples, ctl: Control, r: Reading) -> None:
        """A measured value (voltage under a current source, current under a voltage source) that repeats to
        the last digit while current flows is a frozen instrument, not a cell."""
        if self.clock.virtual:  # a noiseless simulated plateau may repeat to the last digit
            return
        if not work.history or r.current == 0.0:
            work.same = 0
            return
        _, prev = work.history[-1]
        # a voltage source at its current limit (a discharge to a cut-off) holds the current: its voltage moves
        in_compliance = ctl.mode is SourceMode.VOLTAGE and abs(abs(r.current) - ctl.compliance) <= 1e-9 * ctl.compliance
        by_voltage = ctl.mode is SourceMode.CURRENT or in_compliance
        measured = (r.voltage, prev.voltage) if by_voltage else (r.current, prev.current)
        work.same = work.same + 1 if measured[0] == measured[1] else 0
        if work.same >= FROZEN_AFTER:
            raise InstrumentFault(self.channel.cycler.name, f"its reading has not changed in {FROZEN_AFTER + 1} "
                                  f"samples while current flowed ({r.voltage} V, {r.current} A): a frozen reading")

    async def _short_found(self, short: str, planned_end: bool) -> None:
        """Stop (unless the profile ends the test on this very reading, as a CCD test does), rest and take a
        spectrum then stop, or flag it."""
        action = self.profile.short_detection.action
        if action == "eis" and not planned_end:
            if self.channel.potentiostat is None:
                raise SafetyStop(f"{short}; no potentiostat on the channel for a spectrum")
            found, _ = await self._spectrum(self.state.step_count, EisBody())
            raise SafetyStop(f"{short}; at rest, {found}")
        if action == "stop" and not planned_end:
            raise SafetyStop(short)
        then = "the profile ends the test here" if planned_end else "flagged; the test goes on"
        self._note(NoteKind.SHORT, f"{short} ({then})")

    # --- samples ---------------------------------------------------------------------------
    def _take(self, work: _Samples, totals: Totals, t: float, r: Reading) -> None:
        """Count charge and energy since the previous sample of this step, into the step and the cycle."""
        sp = self.state.setpoint
        held = sp.value if sp is not None and sp.mode is SourceMode.CURRENT else None
        if not work.history and work.counted_from is not None and held is not None and t > work.counted_from:
            work.history = [(work.counted_from, r)]  # from the edge to the first reading, at the held current
        if work.history:
            pieces = policy.interval_charge(work.history[-1], t, r, held,
                                            taper=sp is not None and sp.mode is SourceMode.VOLTAGE)
            work.last_ah = sum(abs(ah) for ah, _ in pieces)
            for ah, wh in pieces:
                totals.add(ah, wh)
                self.state.cycle_totals.add(ah, wh)
        work.history = [*work.history[-1:], (t, r)]
        self.state.accounted_until = t
        self._last = r

    def _maybe_record(
        self, work: _Samples, t: float, r: Reading, step_type: StepType, index: int, rule: RecordRule | None,
        force: bool,
    ) -> None:
        if not (force or policy.record_due(rule, work.last_recorded, t, r)):
            return
        work.last_recorded = (t, r)
        c, st = self._cond, self.state
        sample = Sample(
            t, self.clock.unix(self._origin + t), r.voltage, r.current, st.cycle, st.step_count, index,
            step_type, *st.cycle_totals.as_tuple(), c.ambient_c, c.cell_c,
            c.pressure_pa, c.displacement_um,
        )
        # a real run can be resumed: the state that goes to disk with a sample accounts for it
        self.events.publish(SampleTaken(sample, None if self.clock.virtual else self._snapshot()))
    def live_sample(self) -> Sample | None:
        """The latest reading (the engine's or the supervisor's) as a sample, recorded or not: what telemetry
        publishes on its own cadence. None before the first reading of a step."""
        if self.latest.reading is None or self.state.step is None:
            return None
        t, r, c = self.latest.reading
        st, step = self.state, self.state.step
        return Sample(
            t, self.clock.unix(self._origin + t), r.voltage, r.current, st.cycle, st.step_count,
            self.program.instrs[step.pc].index, step.step_type, *st.cycle_totals.as_tuple(), c.ambient_c,
            c.cell_c, c.pressure_pa, c.displacement_um,
        )

    # --- time, state and notes -------------------------------------------------------------
    @property
    def test_time(self) -> float:
        return self._t()

    def _t(self) -> float:
        """Test time: seconds since the run started."""
        return self.clock.now() - self._origin

    async def _sleep_until(self, t: float) -> None:
        """Wait until test time t, or until the run is interrupted."""
        if self._interrupt is None:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            handle = loop.call_at(self._origin + t, _wake, self._waiter)
            try:
                await self._waiter
            finally:
                handle.cancel()
                self._waiter = None
        if self._interrupt is not None:
            raise self._interrupt

    def _snapshot(self) -> str:
        """The run state as of now, as JSON (what a resume starts from)."""
        st = self.state
        st.test_time = self._saved_at = self._t()
        st.temperature, st.pressure_pa = self._track.temperature, self._track.pressure
        return st.model_dump_json()

    def _checkpoint(self) -> None:
        state = self._snapshot()
        self.events.publish(StateSaved(self.state.test_time, state))

    def _note(self, kind: NoteKind, message: str) -> None:
        now = self.clock.now()
        self.events.publish(Note(kind, message, now - self._origin, self.clock.unix(now)))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _reached_hold(history: policy.History, volts: float) -> bool:
    """Whether the last reading is the first at a CCCV's held voltage (within a millivolt)."""
    if len(history) < 2:
        return False
    (_, a), (_, b) = history
    return abs(a.voltage - volts) > 1e-3 >= abs(b.voltage - volts)
