"""Run orchestration: a profile on every channel of a bench, each channel recorded in its own run file."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cellbench.bench.channel import Channel
from cellbench.bench.clock import Clock
from cellbench.bench.config import BenchConfig
from cellbench.bench.engine import Engine, Outcome, Progress, RecordingFailed
from cellbench.bench.events import EventBus
from cellbench.bench.instruments import Instruments
from cellbench.bench.store import RunStore
from cellbench.profiles.checks import cell_problems, instrument_problems
from cellbench.profiles.parse import InputError, locate
from cellbench.profiles.schema import Profile

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
    for name, ch in bench.channels.items():
        cell = bench.cells[ch.cell]
        found = cell_problems(profile, cell.voltage_min, cell.voltage_max)
        problems += [(path, f"{message} (cell '{ch.cell}')") for path, message in found]
        found = instrument_problems(profile, has_chamber=ch.chamber is not None, has_press=ch.press is not None,
                                    has_potentiostat=ch.potentiostat is not None)
        problems += [(path, f"{message} (channel '{name}')") for path, message in found]
    if problems:
        raise InputError(locate(profile_text, profile_source, problems))
    rid = run_id(profile)
    async with Instruments(bench) as instruments:
        jobs = [
            _run_channel(instruments.channel(name), profile, profile_text, clock, runs_dir / f"{rid}-{name}.sqlite",
                         on_progress, {"bench": bench.model_dump(mode="json"), **(extra_metadata or {})}, base_dir)
            for name in bench.channels
        ]
        return list(await asyncio.gather(*jobs))


async def _run_channel(
    channel: Channel,
    profile: Profile,
    profile_text: str,
    clock: Clock,
    path: Path,
    on_progress: ProgressCallback | None,
    extra: dict[str, object],
    base_dir: Path,
) -> ChannelResult:
    cell = channel.cell
    loop = asyncio.get_running_loop()
    events = EventBus()
    engine: Engine | None = None

    def failed(exc: BaseException) -> None:  # on the writer thread
        if engine is not None:
            loop.call_soon_threadsafe(engine.interrupt, RecordingFailed(f"{path.name}: {exc}"))

    store = RunStore(path, durable=not clock.virtual, on_failure=failed)
    try:
        store.set_metadata(
            cellbench_version=cellbench_version(),
            run_id=path.stem,
            channel=channel.name,
            cell={**cell.model_dump(mode="json"), "volume_cm3": cell.volume_cm3},
            instruments=channel.identity,
            profile_name=profile.name,
            profile_text=profile_text,
            clock="virtual" if clock.virtual else "real",
            **extra,
        )
        events.subscribe(store.record)
        progress = (lambda p: on_progress(channel.name, p)) if on_progress else None
        engine = Engine(profile, channel, events, clock, on_progress=progress, base_dir=base_dir)
        outcome = await engine.run()
    finally:
        # the last batch is committed off the control loop on the real clock (other channels keep sampling)
        if clock.virtual:
            store.close()
        else:
            await asyncio.to_thread(store.close)
    return ChannelResult(channel.name, path, outcome)
