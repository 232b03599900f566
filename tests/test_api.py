"""The Python API as a lab uses it: from a script, from a running event loop (a notebook, an async test),
against a real bench over the wire, and reading a run back as DataFrames."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import cellbench
from cellbench.bench.faces.simbench import cell_config
from cellbench.bench.runner.config import BenchConfig, ChannelConfig, instrument
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.parameters import PELLET
from cellbench.simulators.server import SimServer

ONE_HOUR = """
name: one hour at C/20 (below the pellet's critical current density)
sample_period: 5 min
steps:
  - charge: {current: C/20, until: [1 h, 4.3 V]}
"""


def test_run_from_a_script_and_read_the_samples_back(tmp_path: Path) -> None:
    result = cellbench.run(ONE_HOUR, runs_dir=tmp_path)
    assert result.completed and result.outcome.reason == "completed"
    assert result.database.parent == tmp_path and result.database.suffix == ".sqlite"
    samples = cellbench.read_samples(result.database)
    assert list(samples.columns[:4]) == ["Test Time / s", "Unix Time / s", "Voltage / V", "Current / A"]
    assert len(samples) == 13  # every 5 min over the hour, both ends included
    # C/20 of the 3.5 mAh pellet for one hour is 0.175 mAh in
    assert samples["Charging Capacity / Ah"].iloc[-1] == pytest.approx(0.175e-3, rel=1e-4)
    steps = cellbench.read_steps(result.database)
    assert list(steps["end_reason"]) == ["time 3600 s"]
    events = cellbench.read_events(result.database)
    assert list(events["kind"]) == ["start", "end"]
    state = cellbench.read_state(result.database)
    assert state is not None and state.finished and state.step_count == 1


async def test_arun_inside_a_running_event_loop(tmp_path: Path) -> None:
    result = await cellbench.arun(ONE_HOUR, runs_dir=tmp_path, seed=2)
    assert result.completed
    assert cellbench.read_samples(result.database)["Test Time / s"].iloc[-1] == pytest.approx(3600.0)


async def test_run_inside_a_running_event_loop_as_in_a_notebook(tmp_path: Path) -> None:
    result = cellbench.run("name: rest\nsample_period: 1 min\nsteps:\n  - rest: 10 min\n", runs_dir=tmp_path)
    assert result.completed and len(cellbench.read_samples(result.database)) == 11


async def test_arun_on_a_real_bench_in_real_time(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    sim = Keithley2450Sim(SolidStateCell(soc=0.5), loop.time)
    async with SimServer(sim) as server:
        bench = BenchConfig(
            instruments={"smu": instrument(driver="keithley2450", resource=server.resource)},
            cells={"pellet": cell_config(PELLET)},
            channels={"ch1": ChannelConfig(cycler="smu", cell="pellet")},
        )
        result = await cellbench.arun("name: short\nsample_period: 1 s\nsteps:\n  - rest: 2 s\n", bench=bench,
                                      runs_dir=tmp_path)
    assert result.completed
    samples = cellbench.read_samples(result.database)
    assert len(samples) == 3 and samples["Voltage / V"].between(3.0, 4.3).all()


def test_bad_input_and_missing_runs_say_what_is_wrong(tmp_path: Path) -> None:
    from cellbench.profiles.parse import InputError

    with pytest.raises(InputError) as caught:
        cellbench.run("name: x\nsteps:\n  - charge: {current: C/20, until: {volt: 4.2 V}}\n", runs_dir=tmp_path)
    assert any("unknown limit 'volt'" in p for p in caught.value.problems)
    with pytest.raises(FileNotFoundError, match="no run database"):
        cellbench.read_samples(tmp_path / "nothing.sqlite")
    with pytest.raises(ValueError, match="unknown cell 'coin'"):
        cellbench.run(ONE_HOUR, runs_dir=tmp_path, cell="coin")


def test_importing_cellbench_loads_no_run_time() -> None:
    code = "import sys, cellbench; print(sorted(m for m in sys.modules if m.startswith('cellbench.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_last_progress_of_a_run_says_how_it_ended(tmp_path: Path) -> None:
    """Through the runner: every sample's progress, then the same once more with how the run stopped."""
    from cellbench.bench.faces.api import run

    seen: list[tuple[str, object]] = []
    result = run("name: short\nsample_period: 1 s\nsteps:\n  - rest: 5 s\n", runs_dir=tmp_path,
                 on_progress=lambda channel, p: seen.append((channel, p)))
    assert result.completed
    *during, (channel, last) = seen
    assert channel == during[0][0]
    assert during and all(p.ended is None for _, p in during)  # type: ignore[attr-defined]
    assert last.ended == "completed" and last.test_time == during[-1][1].test_time  # type: ignore[attr-defined]
