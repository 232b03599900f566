"""Run orchestration: a profile on every channel of a bench, each channel recorded in its own run file."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.channel import Channel, connect_cycler
from bench.clock import Clock
from bench.config import BenchConfig, CellConfig, ChannelConfig, InstrumentConfig
from bench.store import RunStore
from profiles.checks import cell_problems
from profiles.engine import Engine, Outcome, Progress
from profiles.parse import InputError, locate
from profiles.schema import Profile
from simulators.cell import SolidStateCell
from simulators.keithley2450 import Keithley2450Sim
from simulators.parameters import PELLET, CellParameters
from simulators.server import SimServer

ProgressCallback = Callable[[str, Progress], None]


@dataclass(frozen=True)
class ChannelResult:
    channel: str
    database: Path
    outcome: Outcome


def cellbench_version() -> str:
    try:
        return version("cellbench")
    except PackageNotFoundError:
        return "unknown"


def run_id(profile: Profile) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", profile.name.lower()).strip("-")[:40] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


async def run_bench(
    bench: BenchConfig,
    profile: Profile,
    profile_text: str,
    clock: Clock,
    *,
    runs_dir: Path = Path("runs"),
    on_progress: ProgressCallback | None = None,
    extra_metadata: dict[str, object] | None = None,
    profile_source: str = "<profile>",
    base_dir: Path = Path("."),
) -> list[ChannelResult]:
    """Run the profile on every channel of the bench at once; one database per channel.

    Raises InputError, before any instrument is touched, when the profile asks a cell for
    voltages outside its window.
    """
    problems = []
    for ch in bench.channels.values():
        cell = bench.cells[ch.cell]
        found = cell_problems(profile, cell.voltage_min, cell.voltage_max)
        problems += [(path, f"{message} (cell '{ch.cell}')") for path, message in found]
    if problems:
        raise InputError(locate(profile_text, profile_source, problems))
    rid = run_id(profile)
    jobs = [
        _run_channel(bench, name, ch, profile, profile_text, clock, runs_dir / f"{rid}-{name}.sqlite",
                     on_progress, extra_metadata or {}, base_dir)
        for name, ch in bench.channels.items()
    ]
    return list(await asyncio.gather(*jobs))


async def _run_channel(
    bench: BenchConfig,
    name: str,
    ch: ChannelConfig,
    profile: Profile,
    profile_text: str,
    clock: Clock,
    path: Path,
    on_progress: ProgressCallback | None,
    extra: dict[str, object],
    base_dir: Path,
) -> ChannelResult:
    cell = bench.cells[ch.cell]
    cycler, transport, identity = await connect_cycler(ch.cycler, bench.instruments[ch.cycler])
    try:
        with RunStore(path, durable=not clock.virtual) as store:
            store.set_metadata(
                cellbench_version=cellbench_version(),
                run_id=path.stem,
                channel=name,
                bench=bench.model_dump(mode="json"),
                cell={"name": ch.cell, **cell.model_dump(mode="json"), "volume_cm3": cell.volume_cm3},
                instruments={ch.cycler: identity},
                profile_name=profile.name,
                profile_text=profile_text,
                clock="virtual" if clock.virtual else "real",
                **extra,
            )
            channel = Channel(name, cell, cycler, {ch.cycler: identity})
            progress = (lambda p: on_progress(name, p)) if on_progress else None
            engine = Engine(profile, channel, store, clock, on_progress=progress, base_dir=base_dir)
            outcome = await engine.run()
    finally:
        await transport.close()
    return ChannelResult(name, path, outcome)


def cell_config(params: CellParameters) -> CellConfig:
    """The bench's view of a simulated cell (what a technician would type into bench.yaml)."""
    return CellConfig(
        chemistry=params.chemistry,
        capacity=f"{params.capacity_ah} Ah",
        voltage_min=f"{params.v_min} V",
        voltage_max=f"{params.v_max} V",
        area=f"{params.area_cm2} cm^2",
        dimensions=tuple(f"{d} mm" for d in params.dimensions_mm),
    )


class SimulatedBench:
    """A bench of simulated instruments: a 2450 simulator on loopback TCP with a simulated cell.

    Everything goes through the real wire, so the run is the same code path as on real hardware.
    """

    def __init__(
        self,
        params: CellParameters = PELLET,
        *,
        initial_soc: float = 0.0,
        seed: int = 0,
        noise: bool = True,
        temperature_c: float = 25.0,
    ) -> None:
        self.params = params
        self.initial_soc = initial_soc
        self.seed = seed
        self.cell = SolidStateCell(params, soc=initial_soc, temperature_c=temperature_c)
        self.noise = noise
        self.sim: Keithley2450Sim | None = None
        self.server: SimServer | None = None

    async def __aenter__(self) -> SimulatedBench:
        loop = asyncio.get_running_loop()
        self.sim = Keithley2450Sim(
            self.cell, loop.time, noise_v=20e-6 if self.noise else 0.0, noise_i=2e-9 if self.noise else 0.0,
            seed=self.seed,
        )
        self.server = await SimServer(self.sim).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def config(self) -> BenchConfig:
        assert self.server is not None, "use the bench inside 'async with'"
        return BenchConfig(
            name="simulated",
            instruments={"smu1": InstrumentConfig(driver="keithley2450", resource=self.server.resource)},
            cells={self.params.name: cell_config(self.params)},
            channels={"ch1": ChannelConfig(cycler="smu1", cell=self.params.name)},
        )

    async def run(
        self,
        profile: Profile,
        profile_text: str,
        clock: Clock,
        *,
        runs_dir: Path = Path("runs"),
        on_progress: ProgressCallback | None = None,
        profile_source: str = "<profile>",
        base_dir: Path = Path("."),
    ) -> ChannelResult:
        simulation = {
            "seed": self.seed, "initial_soc": self.initial_soc, "temperature_c": self.cell.temperature_c,
            "cell": self.params.model_dump(),
        }
        results = await run_bench(
            self.config, profile, profile_text, clock, runs_dir=runs_dir, on_progress=on_progress,
            extra_metadata={"simulation": simulation}, profile_source=profile_source, base_dir=base_dir,
        )
        return results[0]


async def run_simulated(
    profile: Profile,
    profile_text: str,
    clock: Clock,
    *,
    params: CellParameters = PELLET,
    initial_soc: float = 0.0,
    seed: int = 0,
    noise: bool = True,
    temperature_c: float = 25.0,
    runs_dir: Path = Path("runs"),
    on_progress: ProgressCallback | None = None,
    profile_source: str = "<profile>",
    base_dir: Path = Path("."),
) -> tuple[ChannelResult, SolidStateCell]:
    """Run a profile on a fresh simulated bench; return the result and the simulated cell."""
    bench = SimulatedBench(params, initial_soc=initial_soc, seed=seed, noise=noise, temperature_c=temperature_c)
    async with bench:
        result = await bench.run(
            profile, profile_text, clock, runs_dir=runs_dir, on_progress=on_progress,
            profile_source=profile_source, base_dir=base_dir,
        )
    return result, bench.cell


class _OutOfTime(Exception):
    pass


def estimate_duration(
    profile: Profile,
    profile_text: str,
    *,
    params: CellParameters = PELLET,
    temperature_c: float = 25.0,
    base_dir: Path = Path("."),
    wall_budget: float = 30.0,
) -> tuple[float, bool]:
    """Test time of a dry run on the simulated cell: (seconds, True), or (seconds so far, False) when
    the dry run needed more than wall_budget seconds of wall time."""
    import tempfile

    from bench.clock import VirtualClock

    began = time.perf_counter()
    reached = [0.0]

    def watch(channel: str, p: Progress) -> None:
        reached[0] = p.test_time
        if time.perf_counter() - began > wall_budget:
            raise _OutOfTime

    clock = VirtualClock()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result, _ = clock.run(
                run_simulated(profile, profile_text, clock, params=params, temperature_c=temperature_c,
                              noise=False, runs_dir=Path(tmp), on_progress=watch, base_dir=base_dir)
            )
        except _OutOfTime:
            return reached[0], False
    return result.outcome.test_time, True
