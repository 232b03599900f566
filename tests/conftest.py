"""Shared fixtures: a scripted transport for exact wire traffic, and simulators on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.server import SimServer

# The runs registry of every test (and of the subprocesses they start) is the session's own, never the
# user's ~/.local/state; a test that looks at the registry sets its own folder.
os.environ["CELLBENCH_STATE_DIR"] = tempfile.mkdtemp(prefix="cellbench-test-state-")

@pytest.fixture(autouse=True)
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own state folder (runs registry, cell latches): a cell one test's safety stop latches is not
    latched for the next."""
    folder = tmp_path / "cellbench-state"
    monkeypatch.setenv("CELLBENCH_STATE_DIR", str(folder))
    return folder


# The fuzzers draw the same cases on every run, so CI passes or fails on the code alone; to hunt for new
# cases, run with HYPOTHESIS_PROFILE=explore (fresh random draws each run).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class ScriptedTransport:
    """Plays the instrument side of an exact conversation; any unexpected line fails the test."""

    name = "scripted"
    resource = "SCRIPT::0"

    def __init__(self, pairs: list[tuple[str, str | None]]) -> None:
        self.pairs = list(pairs)

    def _expect(self, command: str) -> str | None:
        assert self.pairs, f"unexpected command {command!r}: the script has ended"
        expected, reply = self.pairs.pop(0)
        assert command == expected, f"sent {command!r}, the script expected {expected!r}"
        return reply

    async def write(self, command: str) -> None:
        reply = self._expect(command)
        assert reply is None, f"{command!r} was written, but the script has a reply for it"

    async def query(self, command: str) -> str:
        reply = self._expect(command)
        assert reply is not None, f"{command!r} was queried, but the script has no reply for it"
        return reply

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def scripted(*pairs: tuple[str, str | None]) -> AsyncIterator[ScriptedTransport]:
    io = ScriptedTransport(list(pairs))
    yield io
    assert not io.pairs, f"the script was not used up: {io.pairs}"


@pytest.fixture
async def smu_sim() -> AsyncIterator[SimServer]:
    """A simulated 2450 with a half-charged pellet cell, on a real loopback TCP port, in real time."""
    loop = asyncio.get_running_loop()
    sim = Keithley2450Sim(SolidStateCell(soc=0.5), loop.time)
    async with SimServer(sim) as server:
        yield server


@dataclass
class DryRun:
    """A profile run on the simulated bench (real TCP, virtual clock), read back from its database."""

    outcome: Any
    samples: list[Any]
    steps: list[dict[str, Any]]
    events: list[dict[str, Any]]
    bench: Any
    database: Path | None = None

    def step_samples(self, step_count: int) -> list[Any]:
        return [s for s in self.samples if s.step_count == step_count]

    @property
    def sequence(self) -> list[tuple[str, str]]:
        return [(st["step_type"], st["end_reason"]) for st in self.steps]


def dry_run(
    text: str, tmp_path: Path, *, soc: float = 0.5, temperature: float = 25.0, seed: int = 0,
    params: Any = None, noise: bool = True, capacity_factor: float = 1.0, environment: bool = False,
    pressure: float | None = None, run_steps: bool = False,
) -> DryRun:
    """Run profile text on a simulated bench: the 2450 alone, or with a chamber and a press (environment)."""
    from cellbench.bench.faces.simbench import SimulatedBench, needs_potentiostat
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.parse import parse_profile
    from cellbench.simulators.parameters import PELLET

    text = textwrap.dedent(text)
    profile = parse_profile(text, "test.yaml", tmp_path)
    clock = VirtualClock()
    bench = SimulatedBench(
        params or PELLET, initial_soc=soc, seed=seed, noise=noise, temperature_c=temperature,
        chamber=environment, press=environment, pressure_mpa=pressure, potentiostat=needs_potentiostat(profile),
        run_steps=run_steps,
    )
    bench.cell.state.capacity_ah *= capacity_factor
    runs = tmp_path / f"runs-{len(list(tmp_path.glob('runs-*')))}"

    async def main() -> Any:
        async with bench:
            return await bench.run(profile, text, clock, runs_dir=runs, base_dir=tmp_path, profile_source="test.yaml")

    result = clock.run(main())
    with open_run(result.database) as store:
        return DryRun(result.outcome, store.samples(), store.steps(), store.events(), bench, result.database)


def _half_cell_resistances() -> tuple[float, float]:
    from cellbench.simulators.cell import SolidStateCell

    cell = SolidStateCell(soc=0.5)
    return cell.ohmic_resistance(), cell.dc_resistance()


HALF_CELL_R = _half_cell_resistances()  # (ohmic, DC) of the pellet at 25 degC and 5 MPa


@pytest.fixture
def two_smus() -> Iterator[tuple[str, str]]:
    """Two simulated 2450s served in processes of their own: their resources."""
    from tests.test_cli import serve

    servers = [serve("keithley2450", "--port", "0", "--soc", "0.3") for _ in range(2)]
    yield servers[0][1], servers[1][1]
    for p, _ in servers:
        p.terminate()
        p.wait(timeout=10)


@pytest.fixture
def served() -> Iterator[str]:
    """A simulated 2450 served in a process of its own: its resource."""
    from tests.test_cli import serve

    proc, resource = serve("keithley2450", "--port", "0", "--soc", "0.3")
    yield resource
    proc.terminate()
    proc.wait(timeout=10)


def shorted_run(text: str, tmp_path: Path, *, at: float, ohms: float, soc: float = 0.5, supervise: bool | None = None,
                potentiostat: bool = False) -> Any:
    """A profile on the simulated bench (virtual clock) whose cell shorts (`ohms` across it) at test time `at`:
    the run's result."""
    from cellbench.bench.faces.simbench import SimulatedBench
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.profiles.parse import parse_profile

    clock = VirtualClock()
    bench = SimulatedBench(initial_soc=soc, potentiostat=potentiostat)

    async def main() -> Any:
        async with bench:
            task = asyncio.create_task(bench.run(parse_profile(text), text, clock, runs_dir=tmp_path,
                                                 supervise=supervise))
            await asyncio.sleep(at)
            bench.cell.inject_short(ohms)
            return await task

    return clock.run(main())
