"""The Python API: run a profile from a script, a notebook or an async test, and read a run back as DataFrames.

    import cellbench
    result = cellbench.run("formation", dry_run=True)          # a script: blocks until the run ends
    result = await cellbench.arun("cycle.yaml", bench="bench.yaml")   # a notebook or an async test
    samples = cellbench.read_samples(result.database)           # pandas, Battery Data Format columns

A dry run (no bench) runs on a simulated bench on the virtual clock, in its own thread with its own
event loop, so it works the same inside a running loop; a real bench runs on the caller's loop in real time.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing as contextlib_closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cellbench.bench.runner.config import BenchConfig, load_bench
from cellbench.bench.runner.run import ChannelResult, ProgressCallback, run_bench
from cellbench.bench.runtime.clock import RealClock, VirtualClock
from cellbench.bench.runtime.engine import Outcome
from cellbench.bench.runtime.runstate import RunState
from cellbench.profiles.library import library_path
from cellbench.profiles.parse import load_profile, parse_profile
from cellbench.profiles.schema import Profile

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    """A finished run: each channel's database and outcome; `database` and `outcome` of a one-channel run."""

    channels: list[ChannelResult]

    @property
    def database(self) -> Path:
        return self._only().database

    @property
    def outcome(self) -> Outcome:
        return self._only().outcome

    @property
    def completed(self) -> bool:
        return all(c.outcome.completed for c in self.channels)

    def _only(self) -> ChannelResult:
        if len(self.channels) != 1:
            raise ValueError(f"the run had {len(self.channels)} channels: look at .channels")
        return self.channels[0]


def _profile(profile: str | Path | Profile) -> tuple[Profile, str, str, Path]:
    """(profile, its text, its source name, the folder its files are relative to)."""
    if isinstance(profile, Profile):
        return profile, "", "<profile>", Path(".")
    if isinstance(profile, str) and "\n" in profile:  # YAML text given directly
        return parse_profile(profile, "<profile>"), profile, "<profile>", Path(".")
    path = Path(profile)
    if not path.exists() and not path.suffix:
        path = library_path(str(profile))
    loaded, text = load_profile(path)
    return loaded, text, path.name, path.parent


async def arun(
    profile: str | Path | Profile,
    *,
    bench: str | Path | BenchConfig | None = None,
    dry_run: bool | None = None,
    runs_dir: str | Path = "runs",
    cell: str = "pellet",
    soc: float = 0.0,
    seed: int = 0,
    temperature: float = 25.0,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Run a profile; await it from a running event loop.

    `profile` is a file, the name of a library profile, YAML text or a `Profile`. With `bench` (a file
    or a `BenchConfig`) it runs on that bench's instruments in real time; without one (or with
    `dry_run=True`) on a simulated `cell` on the virtual clock. Bad input raises `InputError` whose
    `problems` are `file:line: field: message` lines; nothing is touched before the checks pass.
    """
    prof, text, source, base = _profile(profile)
    if dry_run is None:
        dry_run = bench is None
    if dry_run:
        return await asyncio.to_thread(
            _dry_run, prof, text, source, base, Path(runs_dir), cell, soc, seed, temperature, on_progress
        )
    if bench is None:
        raise ValueError("a run on real instruments needs a bench (a bench file or a BenchConfig)")
    cfg = bench if isinstance(bench, BenchConfig) else load_bench(bench)
    results = await run_bench(cfg, prof, text, RealClock(), runs_dir=Path(runs_dir), on_progress=on_progress,
                              profile_source=source, base_dir=base)
    return RunResult(results)


def run(
    profile: str | Path | Profile,
    *,
    bench: str | Path | BenchConfig | None = None,
    dry_run: bool | None = None,
    runs_dir: str | Path = "runs",
    cell: str = "pellet",
    soc: float = 0.0,
    seed: int = 0,
    temperature: float = 25.0,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Run a profile and wait for it (see `arun`); works in a script and inside a running event loop alike."""
    main = arun(profile, bench=bench, dry_run=dry_run, runs_dir=runs_dir, cell=cell, soc=soc, seed=seed,
                temperature=temperature, on_progress=on_progress)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return RealClock().run(main)
    return _in_thread(lambda: asyncio.run(main))  # a loop is running here (Jupyter): run on a loop of our own


def _dry_run(prof: Profile, text: str, source: str, base: Path, runs_dir: Path, cell: str, soc: float, seed: int,
             temperature: float, on_progress: ProgressCallback | None) -> RunResult:
    from cellbench.bench.faces.simbench import run_simulated
    from cellbench.simulators.parameters import PRESETS

    if cell not in PRESETS:
        raise ValueError(f"unknown cell '{cell}' (expected one of: {', '.join(PRESETS)})")
    clock = VirtualClock()
    result, _ = clock.run(run_simulated(prof, text, clock, params=PRESETS[cell], initial_soc=soc, seed=seed,
                                        temperature_c=temperature, runs_dir=runs_dir, on_progress=on_progress,
                                        profile_source=source, base_dir=base))
    return RunResult([result])


def _in_thread(work: Callable[[], T]) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="cellbench-run")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


# --- reading a run back ----------------------------------------------------------------------


def _connect(database: str | Path) -> sqlite3.Connection:
    path = Path(database)
    if not path.is_file():
        raise FileNotFoundError(f"no run database at {path}")
    return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)


def _frame(database: str | Path, query: str) -> pd.DataFrame:
    from cellbench.bench.runtime.extras import need

    pandas = need("pandas", "reading a run as a table")

    with contextlib_closing(_connect(database)) as db:
        frame: pd.DataFrame = pandas.read_sql_query(query, db)
    return frame


def read_samples(database: str | Path) -> pd.DataFrame:
    """A run's samples, one row each, with Battery Data Format column labels (`Test Time / s`, ...)."""
    return _frame(database, 'SELECT * FROM samples ORDER BY "Test Time / s"')


def read_steps(database: str | Path) -> pd.DataFrame:
    """A run's steps: count, index in the profile, type, path, cycle, start and end, and why each ended."""
    return _frame(database, "SELECT * FROM steps ORDER BY step_count")


def read_events(database: str | Path) -> pd.DataFrame:
    """A run's events: start, end, faults, safety trips, hand-overs."""
    return _frame(database, "SELECT * FROM events ORDER BY rowid")


def read_state(database: str | Path) -> RunState | None:
    """The run's last saved state (where it stood), or None if it saved none."""
    with contextlib_closing(_connect(database)) as db:
        row = db.execute("SELECT state FROM run_state WHERE id = 1").fetchone()
    return None if row is None else RunState.model_validate_json(row[0])

