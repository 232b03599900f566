"""The engine's collaborators alone, on fakes: the cycle book (cycles, capacities, references, checks, the soft
short's efficiency signature), the cycler link (recovery within the grace time, output off on a new connection)
and the short watch. Numbers by hand."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from cellbench.bench.runtime.cycles import CycleBook
from cellbench.bench.runtime.events import NoteKind
from cellbench.bench.runtime.link import CyclerLink
from cellbench.bench.runtime.runstate import Ending, EndKind, RunState, Totals
from cellbench.bench.runtime.shorts import ShortWatch
from cellbench.profiles.controls import Control, build_control
from cellbench.profiles.parse import parse_profile
from cellbench.profiles.program import compile_profile
from cellbench.profiles.schema import ShortDetection, body_of
from cellbench.roles import ConnectionLost, InstrumentFault, Reading
from tests.fakes import FakeCycler, fake_channel

CYCLES = """
name: book
steps:
  - charge: {current: C/10, until: 4.2 V}
  - discharge: {current: C/10, until: 3.0 V, reference: true}
  - discharge: {current: C/10, until: 2.5 V, check: {retention: "<= 0.8", then: end}}
"""


def book_and_controls(text: str = CYCLES) -> tuple[CycleBook, list[Control]]:
    profile = parse_profile(text, "t.yaml")
    program = compile_profile(profile)
    channel = fake_channel()
    book = CycleBook(profile, program, channel.cell, RunState())
    controls = [build_control(ins.node, capacity=book.capacity(), v_min=2.5, v_max=4.3, last_voltage=3.5,
                              last_cc_current=None, base_dir=Path("."))
                for ins in program.instrs if ins.op == "step"]
    return book, controls


def test_cycles_are_counted_at_a_charge_after_a_discharge_and_the_whole_halves_are_said() -> None:
    book, (charge, discharge, _) = book_and_controls()
    voltage = Ending(EndKind.VOLTAGE, "4.2 V reached", "next")
    assert book.advance(charge, explicit=False) is None
    book.state.cycle_totals.add(3.0e-3, 12e-3)
    book.after_step(charge, voltage, Totals(charge_ah=3.0e-3))
    assert book.advance(discharge, explicit=False) is None and book.state.discharged
    book.state.cycle_totals.add(-2.7e-3, -10e-3)
    book.after_step(discharge, voltage, Totals(discharge_ah=2.7e-3), reference=True)
    finished = book.advance(charge, explicit=False)
    assert finished is not None and book.finished_whole
    number, totals = finished
    assert number == 1 and book.state.cycle == 2
    assert totals.discharge_ah / totals.charge_ah == pytest.approx(0.9)  # 2.7 of 3.0, by hand
    assert book.state.cycle_totals.charge_ah == 0.0  # the new cycle starts empty
    # a discharge ended on time is no whole half: the next cycle to finish says so
    book.advance(discharge, explicit=False)
    book.after_step(discharge, Ending(EndKind.TIME, "1 h", "next"), Totals(discharge_ah=1e-3))
    book.advance(charge, explicit=False)
    assert not book.finished_whole


def test_the_capacity_a_discharge_measures_and_the_reference_it_sets_and_the_check_it_answers() -> None:
    book, (_, discharge, last) = book_and_controls()
    voltage = Ending(EndKind.VOLTAGE, "3.0 V reached", "next")
    book.after_step(discharge, voltage, Totals(discharge_ah=3.2e-3), reference=True)
    assert book.state.measured_capacity == book.state.reference_capacity == 3.2e-3
    book.after_step(discharge, voltage, Totals(discharge_ah=2.4e-3), reference=True)
    assert book.state.measured_capacity == 2.4e-3 and book.state.reference_capacity == 3.2e-3  # the first stays
    check = body_of(compile_profile(book.profile).instrs[2].node).check
    # 2.4 of 3.2 mAh is 75 % <= 80 %: the check sends the program to its end
    ended = book.checked(check, Ending(EndKind.VOLTAGE, "2.5 V reached", "next"), last, Totals(discharge_ah=2.4e-3))
    assert ended.target == "end" and "retention <= 0.8" in ended.reason
    held = book.checked(check, Ending(EndKind.VOLTAGE, "2.5 V reached", "next"), last, Totals(discharge_ah=2.9e-3))
    assert held.target == "next"  # 90.6 %


def test_two_cycles_giving_back_more_than_they_took_are_a_soft_shorts_signature() -> None:
    book, _ = book_and_controls()
    capacity = book.capacity()
    big = Totals(charge_ah=0.6 * capacity, discharge_ah=0.6 * capacity * 1.05)  # 105 %
    assert book.efficiency_signature(2, big) is None  # one alone is not
    said = book.efficiency_signature(3, big)
    assert said is not None and "cycles 2 and 3 gave back 105.00 % and 105.00 %" in said
    # a cycle within its resolution says nothing and forgets what came before
    book.efficiency_signature(4, big)
    within = Totals(charge_ah=0.6 * capacity, discharge_ah=0.6 * capacity * 1.05, resolution_ah=capacity)
    assert book.efficiency_signature(5, within) is None and book.efficiency_signature(6, big) is None
    small = Totals(charge_ah=0.4 * capacity, discharge_ah=0.5 * capacity)  # under half the capacity charged
    assert book.efficiency_signature(7, small) is None


class Steps:
    """Test time that a sleep moves on: the link's clock."""

    def __init__(self) -> None:
        self.t = 0.0
        self.notes: list[tuple[NoteKind, str]] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


def link_on(channel: object, state: RunState, clock: Steps) -> CyclerLink:
    return CyclerLink(channel, state, now=clock.now, sleep_until=clock.sleep_until,  # type: ignore[arg-type]
                      note=lambda kind, message: clock.notes.append((kind, message)),
                      look_before_on=lambda reading, what: None)


def test_the_link_reconnects_within_its_grace_and_applies_the_setpoint_again() -> None:
    book, (charge, _, _) = book_and_controls()
    first, second = FakeCycler(), FakeCycler()
    tries: list[float] = []
    clock = Steps()

    async def reconnect() -> FakeCycler:
        tries.append(clock.t)
        if len(tries) < 3:
            raise ConnectionLost("fake-cycler", "still away")
        return second

    channel = fake_channel(first)
    channel.reconnect, channel.reconnect_grace = reconnect, 10.0
    link = link_on(channel, book.state, clock)

    async def main() -> bool:
        await link.apply(charge, 0.0, 3.5)
        return await link.recover(ConnectionLost("fake-cycler", "cable pulled"))

    assert asyncio.run(main()) is False  # the new connection found the output off
    assert tries == [0.25, 0.75, 1.75]  # backoff 0.25 s, doubling
    current = book.capacity() / 10
    assert second.commands == [f"I {current:g} (V<=4.2)", "ON"] and channel.cycler is second
    assert [k for k, _ in clock.notes] == [NoteKind.FAULT, NoteKind.RECOVERED]


def test_the_link_gives_up_at_the_end_of_its_grace_and_turns_the_output_off_on_a_new_connection() -> None:
    clock = Steps()

    async def never() -> FakeCycler:
        raise ConnectionLost("fake-cycler", "still away")

    channel = fake_channel(FakeCycler())
    channel.reconnect, channel.reconnect_grace = never, 5.0
    link = link_on(channel, RunState(), clock)
    with pytest.raises(InstrumentFault, match="not recovered within 5 s"):
        asyncio.run(link.recover(ConnectionLost("fake-cycler", "cable pulled")))
    assert clock.t == pytest.approx(5.0)  # the last try at the grace's end

    class Broken(FakeCycler):
        async def output(self, on: bool) -> None:
            raise ConnectionLost(self.name, "gone")

    fresh = FakeCycler(on=True)

    async def again() -> FakeCycler:
        return fresh

    channel = fake_channel(Broken(on=True))
    channel.reconnect = again
    link = link_on(channel, RunState(), clock)
    asyncio.run(link.output_off())
    assert not fresh.on and fresh.commands == ["OFF"]
    assert "the output was turned off on a new connection" in clock.notes[-1][1]


def test_the_short_watch_sees_a_collapse_once_a_step_and_only_while_charging_at_constant_current() -> None:
    _, (charge, discharge, _) = book_and_controls()
    watch = ShortWatch(ShortDetection(), charge)
    assert watch.look(0.0, Reading(3.80, 3.5e-4)) is None
    said = watch.look(60.0, Reading(3.65, 3.5e-4))  # 150 mV down in a minute: over the 100 mV collapse
    assert said is not None and said.startswith("hard short: the voltage fell 150 mV in 60 s")
    watch.look(120.0, Reading(3.80, 3.5e-4))
    assert watch.look(180.0, Reading(3.60, 3.5e-4)) is None  # the same kind again in the step: not news
    soft = ShortWatch(ShortDetection(), charge)
    soft.look(0.0, Reading(3.900, 3.5e-4))
    assert (soft.look(300.0, Reading(3.894, 3.5e-4)) or "").startswith("soft short: the voltage fell 6.0 mV")
    resting = ShortWatch(ShortDetection(), discharge)
    resting.look(0.0, Reading(3.80, -3.5e-4))
    assert resting.look(60.0, Reading(3.50, -3.5e-4)) is None  # a discharge's fall is no short


def test_one_judge_of_stability_for_wait_steps_and_the_track() -> None:
    """Within tolerance for the duration after the last time something was off; past the timeout with something
    still off, the profile fails, naming what."""
    from cellbench.bench.runtime.track import ProfileFailed, settled

    judge = functools.partial(settled, began=0.0, duration=600.0, timeout=3600.0, failing="waited")
    assert judge(["pressure off"], 100.0, since=None) == (False, None)
    assert judge([], 200.0, since=None) == (False, 200.0)
    assert judge([], 799.0, since=200.0) == (False, 200.0)
    assert judge([], 800.0, since=200.0) == (True, 200.0)
    assert judge(["cell temperature 55 degC"], 900.0, since=200.0) == (False, None)  # the clock starts again
    with pytest.raises(ProfileFailed, match="waited 1 h: cell temperature 55 degC"):
        judge(["cell temperature 55 degC"], 3600.0, since=None)
