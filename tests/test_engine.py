"""The engine end to end: profile, driver, TCP, simulated 2450 and cell, store; on the virtual clock."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from cellbench.bench.faces.simbench import SimulatedBench
from cellbench.bench.results.analysis import cycle_table
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.library import library_path
from cellbench.profiles.parse import load_profile, parse_profile


def run_demo(tmp_path: Path, seed: int = 0) -> tuple[SimulatedBench, Path]:
    profile, text = load_profile(library_path("formation-and-cycling"))
    clock = VirtualClock()
    bench = SimulatedBench(seed=seed)

    async def main() -> Path:
        async with bench:
            result = await bench.run(profile, text, clock, runs_dir=tmp_path)
        assert result.outcome.completed, result.outcome.reason
        return result.database

    return bench, clock.run(main())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulatedBench, Path]:
    return run_demo(tmp_path_factory.mktemp("demo"))


def test_steps_end_at_their_voltage_limits(demo_run: tuple[SimulatedBench, Path]) -> None:
    _, db = demo_run
    with open_run(db) as store:
        samples, steps = store.samples(), store.steps()
    last_of_step = {s.step_count: s for s in samples}
    charge_ends = [st for st in steps if st["step_type"] == "CC Charge"]
    discharge_ends = [st for st in steps if st["step_type"] == "CC Discharge"]
    assert len(charge_ends) == len(discharge_ends) == 4
    for st in charge_ends:
        assert st["end_reason"] == "voltage >= 4.3 V"
        assert last_of_step[st["step_count"]].voltage == pytest.approx(4.3, abs=1.5e-3)
    for st in discharge_ends:
        assert st["end_reason"] == "voltage <= 2.5 V"
        assert 2.49 <= last_of_step[st["step_count"]].voltage <= 2.501
    # the step after a charge is the CV hold, which starts at the charge's end voltage
    first_cv = next(s for s in samples if s.step_type == "CV")
    assert first_cv.voltage == pytest.approx(4.3, abs=1.5e-3)


def test_recorded_capacity_matches_the_models_coulomb_count(demo_run: tuple[SimulatedBench, Path]) -> None:
    bench, db = demo_run
    with open_run(db) as store:
        rows = cycle_table(store.iter_samples())
    recorded_discharge = sum(r.discharge_ah for r in rows)
    recorded_charge = sum(r.charge_ah for r in rows)
    assert recorded_discharge == pytest.approx(bench.cell.state.discharged_ah, rel=0.02)
    assert recorded_charge == pytest.approx(bench.cell.state.charged_ah, rel=0.02)
    assert [r.cycle for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r.discharge_ah == pytest.approx(3.5e-3, rel=0.03)  # a fresh 3.5 mAh pellet
    # cycle 2 charges what the C/20 formation discharge took out but discharges at C/10, which leaves more lithium
    # in the cathode's bulk: by hand (C/10 - C/20) / 3600 s * R^2 / (15 D) of the capacity, 0.63 %, stays in
    lead_1c = (5.22e-4) ** 2 / 4e-11 / 15 / 3600
    assert rows[1].coulombic_efficiency == pytest.approx(1.0 - 0.05 * lead_1c * 3.5e-3 / rows[1].charge_ah, abs=1e-3)
    for r in rows[2:]:  # then the same depth every cycle: a coulombic efficiency of 100 %
        assert r.coulombic_efficiency == pytest.approx(1.0, abs=5e-4)


def test_the_run_ends_with_the_output_off_and_its_record_complete(demo_run: tuple[SimulatedBench, Path]) -> None:
    bench, db = demo_run
    assert bench.sim is not None and bench.sim.tree.values["output"] is False
    with open_run(db) as store:
        meta, events, samples = store.metadata(), store.events(), store.samples()
    assert meta["profile_name"] == "formation and cycling"
    assert "repeat: 3" in meta["profile_text"]
    assert meta["instruments"]["smu1"].startswith("KEITHLEY INSTRUMENTS,MODEL 2450")
    assert meta["cell"]["capacity"] == pytest.approx(3.5e-3)
    assert [e["kind"] for e in events] == ["start", "end"]
    times = [s.test_time for s in samples]
    assert times == sorted(times) and times[0] == 0.0
    assert samples[-1].unix_time - samples[0].unix_time == pytest.approx(times[-1])


def test_the_same_seed_gives_the_same_data(tmp_path: Path, demo_run: tuple[SimulatedBench, Path]) -> None:
    _, db = demo_run
    _, again = run_demo(tmp_path / "again")
    with open_run(db) as a, open_run(again) as b:
        assert a.samples() == b.samples()
    _, other = run_demo(tmp_path / "other", seed=1)
    with open_run(db) as a, open_run(other) as b:
        assert a.samples() != b.samples()


SHORT_PROFILE = textwrap.dedent(
    """\
    name: long rest
    sample_period: 60 s
    steps:
      - charge: {current: C/20, until: 3.8 V}
      - rest: 100 h
    """
)


def run_with(tmp_path: Path, action: object, after: float) -> tuple[SimulatedBench, Path, object]:
    """Run SHORT_PROFILE and do `action(bench, task)` after `after` seconds of virtual time."""
    profile = parse_profile(SHORT_PROFILE)
    clock = VirtualClock()
    bench = SimulatedBench(initial_soc=0.3)
    outcome: dict[str, object] = {}

    async def main() -> None:
        async with bench:
            task = asyncio.create_task(bench.run(profile, SHORT_PROFILE, clock, runs_dir=tmp_path))
            await asyncio.sleep(after)
            action(bench, task)  # type: ignore[operator]
            try:
                outcome["result"] = await task
            except asyncio.CancelledError:
                outcome["result"] = "cancelled"

    clock.run(main())
    db = next(tmp_path.glob("*.sqlite"))
    return bench, db, outcome["result"]


def test_cancelling_a_run_turns_the_output_off(tmp_path: Path) -> None:
    bench, db, result = run_with(tmp_path, lambda b, task: task.cancel(), after=5 * 3600)
    assert result == "cancelled"
    assert bench.sim is not None and bench.sim.tree.values["output"] is False
    with open_run(db) as store:
        kinds = [e["kind"] for e in store.events()]
        last = store.samples()[-1]
    assert kinds == ["start", "cancelled", "end"]
    assert 4 * 3600 < last.test_time <= 5 * 3600


def test_a_short_stops_the_run_in_the_safe_state(tmp_path: Path) -> None:
    bench, db, result = run_with(tmp_path, lambda b, task: b.cell.inject_short(5.0), after=10 * 3600)
    assert not result.outcome.completed  # type: ignore[attr-defined]
    assert result.outcome.reason.startswith("safety stop: cell voltage")  # type: ignore[attr-defined]
    assert bench.sim is not None and bench.sim.tree.values["output"] is False
    with open_run(db) as store:
        events = store.events()
    assert [e["kind"] for e in events] == ["start", "safety", "end"]


def test_an_instrument_that_goes_silent_ends_the_run_with_a_fault_event(tmp_path: Path) -> None:
    def silence(b: SimulatedBench, task: object) -> None:
        assert b.server is not None
        b.server.faults.silent = True

    bench, db, result = run_with(tmp_path, silence, after=3600)
    # reconnected with backoff for the grace time (60 s by default), then given up
    assert result.outcome.reason.startswith("instrument fault: smu1: not recovered within 1 min: ")  # type: ignore[attr-defined]
    with open_run(db) as store:
        events = store.events()
    # the output-off went out on a fresh connection, unconfirmed: that is said loudly, not swallowed
    assert [e["kind"] for e in events] == ["start", "fault", "fault", "fault", "end"]
    assert "no reply to" in events[1]["message"] and "reconnecting for up to 1 min" in events[1]["message"]
    assert "the output-off command was sent on a new connection but the instrument did not confirm" in \
        events[3]["message"]
    assert bench.sim is not None and bench.sim.tree.values["output"] is False  # a silent 2450 still obeys


def test_a_dry_run_past_194_days_of_test_time_finishes(tmp_path: Path) -> None:
    """Past 2^24 s a float cannot add asyncio's 1 ns clock resolution to the loop's time: a timer due exactly
    then was never run and the loop spun forever. A 250-day storage test ends, sampled on schedule."""
    from tests.conftest import dry_run

    run = dry_run("name: storage\nsample_period: 1 d\nsteps:\n  - rest: 250 d\n", tmp_path, soc=0.5)
    assert run.outcome.completed and run.outcome.test_time == pytest.approx(250 * 86400)
    assert [round(s.test_time / 86400) for s in run.samples][-3:] == [248, 249, 250]
