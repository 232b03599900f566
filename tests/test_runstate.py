"""The engine on in-process fakes: its saved state, its event stream, and how it ends, each worked out by hand.

These run in milliseconds on the virtual clock; the same engine over real wires is tested in test_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cellbench.bench.runner import channel_run as run_module
from cellbench.bench.runner.channel_run import ChannelRun, ProfileFile
from cellbench.bench.runner.coordinator import Coordinator
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.engine import Engine, Outcome
from cellbench.bench.runtime.events import (
    EventBus,
    Note,
    RunEvent,
    SafetyTripped,
    SampleTaken,
    StateSaved,
    StepEnded,
    StepStarted,
)
from cellbench.bench.runtime.runstate import EndKind, RunState, RunStatus
from cellbench.bench.runtime.store import RunStore, open_run
from cellbench.profiles.parse import parse_profile
from cellbench.roles import Reading
from tests.fakes import FakeCycler, fake_channel

CYCLES = """
name: three cycles by time
sample_period: 60 s
steps:
  - repeat: 3
    steps:
      - charge: {current: 1 mA, until: 1 h}
      - rest: 10 min
      - discharge: {current: 1 mA, until: 1 h}
"""


def run_engine(
    text: str, *, cycler: FakeCycler | None = None, cancel_at: float | None = None, checkpoint_every: float = 60.0,
    subscribe: Callable[[RunEvent], None] | None = None,
) -> tuple[Engine, list[RunEvent], Outcome | None]:
    profile = parse_profile(text, "t.yaml")
    clock = VirtualClock()
    bus = EventBus()
    events: list[RunEvent] = []
    bus.subscribe(events.append)
    if subscribe:
        bus.subscribe(subscribe)
    engine = Engine(profile, fake_channel(cycler), bus, clock, checkpoint_every=checkpoint_every)

    async def main() -> Outcome | None:
        task = asyncio.ensure_future(engine.run())
        if cancel_at is None:
            return await task
        await asyncio.sleep(cancel_at)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    return engine, events, clock.run(main())


def test_the_saved_state_says_where_the_run_stood_when_it_was_cancelled(tmp_path: Path) -> None:
    # cycle 1: charge 0-3600 s, rest to 4200 s, discharge to 7800 s; cycle 2's charge from 7800 s;
    # cancelled at 9030 s, 30 s after the sample at 9000.01 s (a step's samples run from 10 ms after its
    # current edge; the held current counts from the edge): 1200.01 s into that charge
    store = RunStore(tmp_path / "run.sqlite", durable=False)
    cycler = FakeCycler()
    engine, _, _ = run_engine(CYCLES, cycler=cycler, cancel_at=9030.0, subscribe=store.record)
    store.close()
    with open_run(tmp_path / "run.sqlite") as back:
        saved = back.state()
    assert saved is not None
    assert saved == engine.state  # what the database holds is the engine's own state
    assert saved.pc == 1  # the charge (pc 0 is the loop head)
    assert saved.counters == {0: 1}  # one pass of the loop done
    assert saved.step_count == 4 and saved.cycle == 2
    assert saved.step is not None and saved.step.start == pytest.approx(7800.0)
    assert saved.step.totals.charge_ah == pytest.approx(1e-3 * 1200.01 / 3600, rel=1e-9)
    assert saved.cycle_totals.charge_ah == pytest.approx(1e-3 * 1200.01 / 3600, rel=1e-9)
    assert saved.cycle_totals.discharge_ah == 0.0  # the cycle's totals started again with cycle 2
    assert saved.setpoint is not None and saved.setpoint.value == pytest.approx(1e-3)
    assert saved.reference_capacity is None  # no discharge ended on a voltage limit
    assert not saved.finished
    assert cycler.commands[-1] == "OFF"
    # and it survives its own JSON unchanged
    assert RunState.model_validate_json(saved.model_dump_json()) == saved


def test_state_is_saved_at_every_step_boundary_and_at_the_interval() -> None:
    _, events, outcome = run_engine(CYCLES, checkpoint_every=600.0)
    assert outcome is not None and outcome.completed
    saved = [e for e in events if isinstance(e, StateSaved)]
    started = [e for e in events if isinstance(e, StepStarted)]
    # one state as each step starts (before the output goes on), one after it ends, one at the end of the run
    at_start = {step.step_count for s in saved if (step := s.state().step) is not None and step.start == s.test_time}
    assert at_start == {s.step_count for s in started} == set(range(1, 10))
    times = [s.test_time for s in saved]
    assert all(b - a <= 600.0 + 60.0 + 1e-6 for a, b in itertools.pairwise(times))
    final = saved[-1].state()
    assert final.finished and final.step is None and final.counters == {0: 3} and final.cycle == 3


def test_events_come_in_the_order_things_happened() -> None:
    _, events, outcome = run_engine("name: one\nsample_period: 10 min\nsteps:\n  - rest: 30 min\n")
    assert outcome is not None and outcome.completed
    kinds = [type(e).__name__ for e in events if not isinstance(e, StateSaved)]
    assert kinds == ["Note", "StepStarted", "SampleTaken", "SampleTaken", "SampleTaken", "SampleTaken",
                     "StepEnded", "Note"]
    samples = [e.sample for e in events if isinstance(e, SampleTaken)]
    assert [s.test_time for s in samples] == [0.0, 600.0, 1200.0, 1800.0]
    (ended,) = [e for e in events if isinstance(e, StepEnded)]
    assert ended.kind is EndKind.TIME and ended.reason == "time 1800 s"
    notes = [e for e in events if isinstance(e, Note)]
    assert [n.kind for n in notes] == ["start", "end"] and notes[-1].message == "completed"


def test_charge_is_counted_as_worked_out_by_hand() -> None:
    # 2 mA for 30 min into a 3.5 mAh cell with 10 ohm: 1 mAh in, at V = 3.0 + 1.2 * SOC + 0.02
    _, events, _ = run_engine("name: c\nsample_period: 1 min\nsteps:\n  - charge: {current: 2 mA, until: 30 min}\n")
    last = [e.sample for e in events if isinstance(e, SampleTaken)][-1]
    assert last.charge_ah == pytest.approx(1e-3, rel=1e-9)
    # energy: the trapezoid of a linear voltage rise: mean voltage 3.0 + 1.2 * (1/3.5) / 2 + 0.02
    assert last.charge_wh == pytest.approx(2e-3 * 0.5 * (3.02 + 1.2 * (1 / 3.5) / 2), rel=1e-6)




def test_an_unsafe_reading_trips_publishes_and_turns_the_output_off() -> None:
    cycler = FakeCycler()
    real_measure = cycler.measure
    count = {"n": 0}

    async def measure() -> Reading:
        count["n"] += 1
        reading = await real_measure()
        return Reading(math.nan, reading.current) if count["n"] > 3 else reading

    cycler.measure = measure  # type: ignore[method-assign]
    _, events, outcome = run_engine("name: s\nsample_period: 1 min\nsteps:\n  - charge: {current: 1 mA, until: 1 h}\n",
                                    cycler=cycler)
    assert outcome is not None and outcome.status is RunStatus.SAFETY_STOP and "overflow" in outcome.reason
    assert any(isinstance(e, SafetyTripped) for e in events)
    assert cycler.commands[-1] == "OFF" and not cycler.on


def test_a_lost_connection_is_a_fault_that_ends_with_the_output_off() -> None:
    cycler = FakeCycler(fail_after=5)
    _, _, outcome = run_engine(CYCLES, cycler=cycler)
    assert outcome is not None and outcome.status is RunStatus.FAULT and "connection was cut" in outcome.reason
    assert cycler.commands[-1] == "OFF"


def test_a_full_disk_ends_the_run_in_the_safe_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real wiring of a channel's run: the store's writer fails, the engine hears of it and stops."""
    monkeypatch.setattr(run_module, "RunStore", functools.partial(RunStore, pragmas=("max_page_count=12",)))
    profile = parse_profile("name: long\nsample_period: 1 s\nsteps:\n  - rest: 30 d\n", "t.yaml")
    cycler = FakeCycler()
    clock = VirtualClock()
    path = tmp_path / "run.sqlite"
    result: Any = clock.run(ChannelRun(fake_channel(cycler), ProfileFile(profile, "name: long"), clock, path).run())
    outcome = result.outcome
    assert outcome.status is RunStatus.RECORDING_FAILED and "full" in outcome.reason
    assert outcome.test_time < 30 * 86400  # it stopped long before the profile's end
    assert cycler.commands[-1] == "OFF"


def test_a_full_disk_on_one_channel_stops_every_channel_of_the_bench(tmp_path: Path) -> None:
    """The channels share the disk: one channel's failed write puts both in the safe state."""
    profile = parse_profile("name: long\nsample_period: 1 s\nsteps:\n  - rest: 30 d\n", "t.yaml")
    cyclers = [FakeCycler(name="a"), FakeCycler(name="b")]
    clock = VirtualClock()
    coordinator = Coordinator()
    def store(path: Path, **kw: Any) -> RunStore:  # only channel a's database is small enough to fill
        small: dict[str, Any] = {"pragmas": ("max_page_count=12",)} if path.stem == "a" else {}
        return RunStore(path, **kw, **small)

    async def both() -> list[Any]:
        setattr(run_module, "RunStore", store)  # noqa: B010  (the runner's own name for the store, patched)
        try:
            return await asyncio.gather(*(
                ChannelRun(fake_channel(c), ProfileFile(profile, "name: long"), clock, tmp_path / f"{c.name}.sqlite",
                           coordinator).run() for c in cyclers))
        finally:
            setattr(run_module, "RunStore", RunStore)  # noqa: B010

    a, b = clock.run(both())
    assert a.outcome.status is b.outcome.status is RunStatus.RECORDING_FAILED
    assert "a.sqlite" in b.outcome.reason  # b stopped for a's disk
    assert all(c.commands[-1] == "OFF" and not c.on for c in cyclers)


def test_a_resumed_run_ends_as_an_uninterrupted_one_would() -> None:
    """Cancelled 1200 s into cycle 2's charge, resumed from the saved state: the same cycles, the same charge."""
    whole, whole_events, _ = run_engine(CYCLES)
    cycler = FakeCycler()
    _, cut_events, _ = run_engine(CYCLES, cycler=cycler, cancel_at=9030.0)
    saved = [e for e in cut_events if isinstance(e, StateSaved)][-1].state()

    clock = VirtualClock()
    bus = EventBus()
    after: list[RunEvent] = []
    bus.subscribe(after.append)
    engine = Engine(parse_profile(CYCLES, "t.yaml"), fake_channel(cycler), bus, clock)
    outcome = clock.run(engine.run(resume=saved, outage=(1.0e9, 1.0e9 + 3600)))
    assert outcome.completed and outcome.steps == 9 and outcome.cycles == 3

    def per_cycle(events: list[RunEvent]) -> dict[int, tuple[float, float]]:
        last = {e.sample.cycle: e.sample for e in events if isinstance(e, SampleTaken)}
        return {c: (s.charge_ah, s.discharge_ah) for c, s in last.items()}

    resumed = per_cycle(cut_events) | per_cycle(after)
    for cycle, (charge, discharge) in per_cycle(whole_events).items():
        assert resumed[cycle][0] == pytest.approx(charge, rel=1e-9)
        assert resumed[cycle][1] == pytest.approx(discharge, rel=1e-9)
    # energy differs a little: the cell took 30 s more charge than was counted (cancelled 30 s after a sample)
    assert engine.state.cycle_totals.charge_wh == pytest.approx(whole.state.cycle_totals.charge_wh, rel=2e-3)
    # the interrupted step was finished, not started again: steps 4..9 end after the resume
    assert [e.step_count for e in after if isinstance(e, StepEnded)] == [4, 5, 6, 7, 8, 9]
    assert not [e for e in after if isinstance(e, StepStarted) and e.step_count == 4]
    notes = [(e.kind, e.message) for e in after if isinstance(e, Note)]
    assert notes[0][0] == "outage" and "1 h" in notes[0][1]
    assert notes[1] == ("resumed", "resumed at step 4, cycle 2, test time 150 min")  # the sample at 9000 s
    times = [e.sample.test_time for e in cut_events + after if isinstance(e, SampleTaken)]
    assert times == sorted(times)  # test time goes on; the outage is not test time


def test_a_stack_that_swells_past_its_displacement_range_stops_the_run() -> None:
    from tests.fakes import FakePress

    text = ("name: swell\nsample_period: 1 min\nsafety: {displacement: [0 um, 50 um]}\n"
            "steps:\n  - charge: {current: 1 mA, until: 2 h}\n")
    press = FakePress()
    cycler = FakeCycler()
    bus = EventBus()
    events: list[RunEvent] = []
    bus.subscribe(events.append)
    engine = Engine(parse_profile(text, "t.yaml"), fake_channel(cycler, press=press), bus, VirtualClock())

    async def main() -> Outcome:
        task = asyncio.ensure_future(engine.run())
        await asyncio.sleep(1800 + 30)
        press.displacement_um = 80.0  # lithium plating swells the stack
        return await task

    outcome = engine.clock.run(main())
    assert outcome.status is RunStatus.SAFETY_STOP
    assert "displacement 80.0 um is outside the profile's safety range 0 to 50 um" in outcome.reason
    # the next sample after the swelling (the step's samples run from 10 ms after its current edge)
    assert outcome.test_time == pytest.approx(1860.01)
    last = [e.sample for e in events if isinstance(e, SampleTaken)][-1]
    assert last.displacement_um == 80.0 and last.test_time == pytest.approx(1860.01)  # the tripping reading is kept
    assert cycler.commands[-1] == "OFF"


def test_a_cycle_that_gives_back_more_than_it_took_is_a_short_signature() -> None:
    text = """
name: ce
sample_period: 1 min
steps:
  - repeat: 4
    steps:
      - charge: {current: 1 mA, until: 2 h}
      - discharge: {current: 1 mA, until: 3.02 V}
"""
    cycler = FakeCycler()
    bus = EventBus()
    events: list[RunEvent] = []
    bus.subscribe(events.append)
    engine = Engine(parse_profile(text, "t.yaml"), fake_channel(cycler), bus, VirtualClock())

    async def main() -> Outcome:
        task = asyncio.ensure_future(engine.run())
        # the first cycle ends near 4 h 10 min; in the middle of cycle 2's charge and again in cycle 3's,
        # charge appears from nowhere, as a cell that a soft short had been emptying would give it back
        await asyncio.sleep(5.5 * 3600)
        cycler.cell.soc += 0.1
        await asyncio.sleep(4.5 * 3600)
        cycler.cell.soc += 0.1
        return await task

    outcome = engine.clock.run(main())
    assert outcome.status is RunStatus.SAFETY_STOP and outcome.cycles == 4, outcome
    assert outcome.reason.startswith("safety stop: soft short suspected: cycles 2 and 3 gave back 11")
    # cycle 1, healthy, raised nothing: charge 2 mAh, discharge back to the same voltage
    assert not [e for e in events if isinstance(e, Note) and e.kind == "short"]


def test_one_cycle_above_100_percent_alone_is_not_a_short() -> None:
    # a reference cycle after faster ones gives back what the faster discharge left: one cycle, not a trend
    text = """
name: ce
sample_period: 1 min
steps:
  - repeat: 4
    steps:
      - charge: {current: 1 mA, until: 2 h}
      - discharge: {current: 1 mA, until: 3.02 V}
"""
    cycler = FakeCycler()
    engine = Engine(parse_profile(text, "t.yaml"), fake_channel(cycler), EventBus(), VirtualClock())

    async def main() -> Outcome:
        task = asyncio.ensure_future(engine.run())
        await asyncio.sleep(5.5 * 3600)
        cycler.cell.soc += 0.1
        return await task

    outcome = engine.clock.run(main())
    assert outcome.completed and outcome.cycles == 4, outcome


def test_samples_stay_on_their_schedule_when_a_wake_up_is_late() -> None:
    from cellbench.bench.runtime.policy import next_sample_at

    assert next_sample_at(10.0, 10.3, 1.0) == 11.0  # late by 0.3 s: the next one is still at 11, no drift
    assert next_sample_at(10.0, 10.0, 1.0) == 11.0  # on time (the virtual clock): as before
    assert next_sample_at(10.0, 9.5, 1.0) == 10.5  # woken early for a deadline: an interval from then
    assert next_sample_at(10.0, 12.2, 1.0) == 13.2  # more than an interval late: no burst to catch up


def test_a_state_saved_when_pressures_were_kept_in_mpa_resumes_in_pascal() -> None:
    """Run states saved before the run-time spoke Pa carry the track's pressure as `pressure_mpa`."""
    old = RunState().model_dump() | {"pressure_mpa": 5.0}
    del old["pressure_pa"]
    assert RunState.model_validate(old).pressure_pa == 5e6
    assert RunState.model_validate(RunState(pressure_pa=2e6).model_dump()).pressure_pa == 2e6
