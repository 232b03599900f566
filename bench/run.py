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
from profiles.engine import Engine, Outcome, Progress
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
) -> list[ChannelResult]:
    """Run the profile on every channel of the bench at once; one database per channel."""
    rid = run_id(profile)
    jobs = [
        _run_channel(bench, name, ch, profile, profile_text, clock, runs_dir / f"{rid}-{name}.sqlite",
                     on_progress, extra_metadata or {})
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
            outcome = await Engine(profile, channel, store, clock, on_progress=progress).run()
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


async def run_simulated(
    profile: Profile,
    profile_text: str,
    clock: Clock,
    *,
    params: CellParameters = PELLET,
    initial_soc: float = 0.0,
    seed: int = 0,
    noise: bool = True,
    runs_dir: Path = Path("runs"),
    on_progress: ProgressCallback | None = None,
) -> tuple[ChannelResult, SolidStateCell]:
    """Run a profile on a simulated bench: a 2450 simulator over loopback TCP with a simulated cell."""
    cell = SolidStateCell(params, soc=initial_soc)
    loop = asyncio.get_running_loop()
    sim = Keithley2450Sim(
        cell, loop.time, noise_v=20e-6 if noise else 0.0, noise_i=2e-9 if noise else 0.0, seed=seed
    )
    async with SimServer(sim) as server:
        bench = BenchConfig(
            name="simulated",
            instruments={"smu1": InstrumentConfig(driver="keithley2450", resource=server.resource)},
            cells={params.name: cell_config(params)},
            channels={"ch1": ChannelConfig(cycler="smu1", cell=params.name)},
        )
        results = await run_bench(
            bench, profile, profile_text, clock, runs_dir=runs_dir, on_progress=on_progress,
            extra_metadata={"simulation": {"seed": seed, "initial_soc": initial_soc, "cell": params.model_dump()}},
        )
    return results[0], cell
