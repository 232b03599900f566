"""The safety supervisor checks every second whatever the sample period, over the real wire, and latches."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cellbench.bench.faces.simbench import SimulatedBench
from cellbench.bench.runner.run import read_for_resume
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.parse import InputError, parse_profile
from tests.conftest import shorted_run

SLOW = """
name: slow sampling
sample_period: 5 min
steps:
  - rest: 100 h
"""
SHORT_AT = 3600 + 7.0  # s of test time, between two of the engine's samples


def short_during_rest(tmp_path: Path, supervise: bool) -> tuple[Any, SimulatedBench]:
    clock = VirtualClock()
    bench = SimulatedBench(initial_soc=0.3)

    async def main() -> Any:
        async with bench:
            task = asyncio.create_task(bench.run(parse_profile(SLOW), SLOW, clock, runs_dir=tmp_path,
                                                 supervise=supervise))
            await asyncio.sleep(SHORT_AT)
            bench.cell.inject_short(5.0)
            return await task

    return clock.run(main()), bench


@pytest.mark.parametrize("supervise", [True, False])
def test_a_short_between_samples_is_caught_within_a_second_by_the_supervisor(tmp_path: Path,
                                                                              supervise: bool) -> None:
    result, bench = short_during_rest(tmp_path, supervise)
    assert result.outcome.reason.startswith("safety stop: cell voltage")
    assert bench.sim is not None and bench.sim.tree.values["output"] is False
    with open_run(result.database) as store:
        (trip,) = [e for e in store.events() if e["kind"] == "safety"]
    late = trip["test_time"] - SHORT_AT
    if supervise:  # within one supervisor period plus the round trip
        assert 0 <= late <= 1.1, late
        assert "supervisor, reading" in trip["message"] and " V, " in trip["message"]  # the reading is kept
    else:  # the engine alone sees it at its next sample, minutes later
        assert late > 5, late


def test_a_safety_stop_is_latched_until_an_operator_clears_it(tmp_path: Path) -> None:
    result, _ = short_during_rest(tmp_path, True)
    with pytest.raises(InputError) as caught:
        read_for_resume(result.database)
    assert "clears the latch (resume --clear-latch)" in caught.value.problems[0]
    _, state, _ = read_for_resume(result.database, clear_latch=True)
    assert state.step_count == 1 and not state.finished  # it stood in the rest
    # once resumed with the latch cleared, the run is not latched any more (killed later, it resumes plainly)
    import sqlite3

    with sqlite3.connect(result.database) as con:
        con.execute("INSERT INTO events VALUES (?, 0, 'resumed', 'resumed at step 1')", (SHORT_AT + 1,))
    con.close()
    assert read_for_resume(result.database)[1].step_count == 1


@pytest.mark.parametrize("trip", ["press", "chamber"])
def test_an_interlock_trips_the_channel_within_a_second(tmp_path: Path, trip: str) -> None:
    """A press that tripped on over-force, or a chamber in alarm, read over Modbus and the ESPEC protocol."""
    clock = VirtualClock()
    bench = SimulatedBench(initial_soc=0.3, chamber=True, press=True)

    async def main() -> Any:
        async with bench:
            task = asyncio.create_task(bench.run(parse_profile(SLOW), SLOW, clock, runs_dir=tmp_path, supervise=True))
            await asyncio.sleep(SHORT_AT)
            if trip == "press":
                assert bench.press is not None
                bench.press.over_force = bench.press.fault = True
            else:
                assert bench.chamber is not None
                bench.chamber.alarms.append(1)
            return await task

    result = clock.run(main())
    expected = "press press1 reports over-force" if trip == "press" else "chamber chamber1 in alarm 1"
    assert result.outcome.reason.startswith(f"safety stop: interlock: {expected}")
    assert bench.sim is not None and bench.sim.tree.values["output"] is False
    with open_run(result.database) as store:
        (event,) = [e for e in store.events() if e["kind"] == "safety"]
    assert 0 <= event["test_time"] - SHORT_AT <= 1.1


@pytest.mark.parametrize("after", [0.001, 0.3, 0.7, 0.999])
def test_a_limit_crossed_just_after_an_engine_sample_is_caught_within_one_period(tmp_path: Path,
                                                                                after: float) -> None:
    """The adversarial case: the short comes just after one of the engine's samples (every 60.5 s, out of phase
    with the supervisor's second). Waking at a fixed cadence, the supervisor took that sample for a fresh reading and
    acted a period late (up to 2 s); its reading is now due one period after the newest one, so the trip comes
    within a period of the crossing, wherever it falls."""
    text = "name: out of phase\nsample_period: 60.5 s\nsteps:\n  - rest: 10 h\n"
    crossing = 3 * 60.5 + after  # just after the engine's fourth sample
    result = shorted_run(text, tmp_path, at=crossing, ohms=5.0, soc=0.3, supervise=True)
    with open_run(result.database) as store:
        (trip,) = [e for e in store.events() if e["kind"] == "safety"]
    assert "(supervisor, reading" in trip["message"]
    assert crossing <= trip["test_time"] <= crossing + 1.0 + 1e-6, trip["test_time"] - crossing
