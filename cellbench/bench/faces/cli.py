"""The cellbench command line: demo, run, validate, sim serve."""

from __future__ import annotations

import calendar
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table
    from rich.tree import Tree

    from cellbench.bench.ops import control, runs
    from cellbench.bench.runner.config import BenchConfig
    from cellbench.bench.runner.run import ChannelResult, ProfileFile
    from cellbench.bench.runtime.clock import RealClock
    from cellbench.drivers.registry import DriverSpec
    from cellbench.profiles.schema import Profile
    from cellbench.simulators.parameters import CellParameters

app = typer.Typer(help="Hardware-in-the-loop test bench for solid-state battery cells.", no_args_is_help=True,
                  rich_markup_mode=None)
sim_app = typer.Typer(help="Simulated instruments that speak the real protocols.", no_args_is_help=True,
                  rich_markup_mode=None)
app.add_typer(sim_app, name="sim")
class _Output:
    """Standard output that a closed pipe (`| head`) or a full disk cannot turn into an error: the first write
    that fails silences the output (display.silence_output) and the command goes on, a run to its end."""

    def __init__(self, stream: str) -> None:
        self.stream = stream

    def _target(self) -> Any:
        import sys

        return getattr(sys, self.stream)

    def write(self, text: str) -> int:
        try:
            return int(self._target().write(text))
        except OSError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._target().flush()
        except OSError:
            self._silence()

    def _silence(self) -> None:
        from cellbench.bench.faces.display import silence_output

        silence_output()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the stream's own
        return getattr(self._target(), name)


console = Console(file=_Output("stdout"))  # type: ignore[arg-type]
err = Console(file=_Output("stderr"))  # type: ignore[arg-type]

def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            said = version("cellbench")
        except PackageNotFoundError:
            said = "unknown (not installed as a distribution)"
        console.print(f"cellbench {said}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Hardware-in-the-loop test bench for solid-state battery cells."""


DEMO_PROFILE = "formation-and-cycling"
PARENT_CHECK = 0.5  # s between two looks at whether `sim serve --exit-with-parent`'s parent still lives


def _fail(problems: list[str] | str, code: int = 2) -> typer.Exit:
    for line in [problems] if isinstance(problems, str) else problems:
        err.print(f"[red]{escape(line)}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(path: Path) -> tuple[Profile, str]:
    from cellbench.profiles.parse import InputError, load_profile

    try:
        return load_profile(path)
    except InputError as exc:
        raise _fail(exc.problems) from None


def _progress_bar() -> Progress:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(), console=console, transient=True,
    )


def _announce(channel: str, database: Path) -> None:
    console.print(f"{channel}: recording to {database}", highlight=False, soft_wrap=True)


def _reporter(progress: Progress, label: str = "") -> Any:
    """Progress for every channel: a bar each while they are few, one summary line when many; plain lines when
    the output is not a terminal (`label`: e.g. "resumed")."""
    from cellbench.bench.faces.display import Display

    return Display(progress, label)


def _show_results(results: list[ChannelResult]) -> None:
    from rich.table import Table

    from cellbench.bench.results.analysis import store_table
    from cellbench.bench.runtime.store import open_run

    for res in results:
        with open_run(res.database) as store:
            meta = store.metadata()
            rows = store_table(store)
        cell_id = meta.get("cell_id")
        table = Table(title=f"{res.channel}{f' (cell {cell_id})' if cell_id else ''}: per-cycle summary")
        per_gram = any(r.specific_capacity_mah_g is not None for r in rows)
        per_area = any(r.area_cm2 not in (None, 1.0) for r in rows)  # on 1 cm² it would repeat the mAh
        columns = ["cycle", "charge / mAh", "discharge / mAh", "CE / %", "charge / mWh", "discharge / mWh"]
        for col in columns + ["mAh/g"] * per_gram + ["mAh/cm²"] * per_area:
            table.add_column(col, justify="right")
        for r in rows:
            ce = f"{r.coulombic_efficiency * 100:.2f}" if r.coulombic_efficiency is not None else "-"
            table.add_row(
                str(r.cycle), f"{r.charge_ah * 1e3:.4f}", f"{r.discharge_ah * 1e3:.4f}", ce,
                f"{r.charge_wh * 1e3:.3f}", f"{r.discharge_wh * 1e3:.3f}",
                *[f"{r.specific_capacity_mah_g or 0:.1f}"] * per_gram,
                *[f"{r.areal_capacity_mah_cm2 or 0:.3f}"] * per_area,
            )
        console.print(table)
        state = "[green]completed[/green]" if res.outcome.completed else f"[red]{escape(res.outcome.reason)}[/red]"
        console.print(
            f"{res.channel}: {state} after {res.outcome.test_time / 3600:.2f} h of test time, "
            f"{res.outcome.steps} steps"
        )
        console.print(f"run database: [bold]{res.database}[/bold]")


def _summary(channels: list[str], results: list[ChannelResult]) -> None:
    """How every channel of a controller ended, idle ones too: a line each, its runs in the order they ended."""
    console.print("how every channel ended:", highlight=False)
    for name in channels:
        mine = [r for r in results if r.channel == name]
        said = "; ".join(f"run {r.database.stem}: {r.outcome.reason}" for r in mine) or "idle: no run"
        console.print(f"  {name}: {escape(said)}", highlight=False, soft_wrap=True)


def _preset(cell: str) -> CellParameters:
    """A simulated cell preset by name (the simulators are imported only for simulated work)."""
    from cellbench.simulators.parameters import PRESETS

    if cell not in PRESETS:
        raise _fail(f"unknown cell '{cell}' (expected one of: {', '.join(PRESETS)})")
    return PRESETS[cell]


def _simulate(
    path: Path, *, seed: int, runs_dir: Path, cell: str, soc: float, temperature: float, environment: bool = False,
    identity: dict[str, object] | None = None,
) -> ChannelResult:
    from cellbench.bench.faces.simbench import run_simulated
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.profiles.parse import InputError

    prof, text = _load(path)
    _warn(prof, text, path)
    params = _preset(cell)
    console.print(
        f"[bold]{prof.name}[/bold] on a simulated Keithley 2450 with a simulated {cell} cell "
        f"({params.chemistry}) at {temperature:g} degC, on the virtual clock"
    )
    clock = VirtualClock()
    try:
        with _progress_bar() as progress:
            result, _ = clock.run(
                run_simulated(
                    prof, text, clock, params=params, initial_soc=soc, seed=seed, temperature_c=temperature,
                    runs_dir=runs_dir, on_progress=_reporter(progress), profile_source=path.name,
                    base_dir=path.parent, environment=environment, extra_metadata=identity, on_start=_announce,
                )
            )
    except InputError as exc:
        raise _fail(exc.problems) from None
    _show_results([result])
    return result


def _rehearse(
    path: Path | None, bench: Path, *, seed: int, runs_dir: Path, cell: str, soc: float, temperature: float,
    identity: dict[str, object],
) -> None:
    """`run --dry-run --bench`: the bench file's channels and cells, each on its own simulated instruments."""
    from cellbench.bench.faces.simbench import rehearse
    from cellbench.bench.runner.run import exit_code
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.profiles.parse import InputError

    cfg = _bench(bench)
    shared, own = _profiles(path, cfg)
    base = _preset(cell)
    what = f"[bold]{shared.profile.name}[/bold]" if shared and not own else "each channel's profile"
    console.print(f"{what} rehearsed on bench '{cfg.name}': {len(cfg.channels)} channel(s), "
                  f"each cell simulated from the {cell} preset at {temperature:g} degC, on the virtual clock")
    clock = VirtualClock()
    try:
        with _progress_bar() as progress:
            results = clock.run(rehearse(
                cfg, shared.profile if shared else None, shared.text if shared else "", clock, base=base,
                initial_soc=soc, seed=seed, temperature_c=temperature, runs_dir=runs_dir,
                on_progress=_reporter(progress), profile_source=shared.source if shared else "<profile>",
                base_dir=shared.base_dir if shared else Path("."), extra_metadata=identity, on_start=_announce,
                channel_profiles=own))
    except InputError as exc:
        raise _fail(exc.problems) from None
    _show_results(results)
    if code := exit_code(results):
        raise typer.Exit(code)


SeedOption = Annotated[int, typer.Option(help="seed of the simulated measurement noise")]
RunsOption = Annotated[Path, typer.Option(help="where run databases go")]
CELLS_HELP = ("simulated cell preset: pellet (3.5 mAh, NMC811 | Li6PS5Cl | Li), pellet-protected (its lithium "
              "under a Li3N/Li2O film), pouch (5 Ah) or polymer (1.5 mAh, LFP | PEO-oxide | Li, for 60-80 degC)")
CellOption = Annotated[str, typer.Option(help=CELLS_HELP)]
SocOption = Annotated[float, typer.Option(help="initial state of charge of the simulated cell, 0 to 1")]
TempOption = Annotated[float, typer.Option(help="temperature of the simulated cell, degC")]


@app.command()
def demo(
    seed: SeedOption = 0,
    runs_dir: RunsOption = Path("runs"),
    profile: Annotated[Path | None, typer.Option(help="a profile file instead of the bundled demo")] = None,
) -> None:
    """Run the bundled formation-and-cycling profile on a simulated bench, faster than real time."""
    from cellbench.bench.runner.run import exit_code
    from cellbench.profiles.library import library_path

    result = _simulate(
        profile or library_path(DEMO_PROFILE), seed=seed, runs_dir=runs_dir, cell="pellet", soc=0.0, temperature=25.0
    )
    if code := exit_code([result]):
        raise typer.Exit(code)


@app.command()
def run(
    profile: Annotated[Path | None, typer.Argument(help="the profile YAML file, or the name of a library profile "
                                                        "(for the channels of the bench that name none)")] = None,
    bench: Annotated[Path | None, typer.Option("--bench", help="the bench YAML file naming instruments")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="run on the simulated cell on the virtual clock, recorded as a real run")
    ] = False,
    runs_dir: RunsOption = Path("runs"),
    seed: SeedOption = 0,
    cell: CellOption = "pellet",
    soc: SocOption = 0.0,
    temperature: TempOption = 25.0,
    environment: Annotated[
        bool, typer.Option(help="simulate a chamber and a press even if the profile does not need them")
    ] = False,
    operator: Annotated[str | None, typer.Option(help="who runs the test (recorded; overrides the bench file's)")]
    = None,
    comment: Annotated[str | None, typer.Option(help="a comment recorded with the run")] = None,
    stay: Annotated[bool, typer.Option("--stay", help="keep the controller running when its channels end, "
                                                      "taking new runs (`cellbench start`) until stopped; channels "
                                                      "with no profile start idle")] = False,
    allow_current_density: AllowDensityOption = False,
) -> None:
    """Run a profile (or each channel's own, named in the bench file) on every channel of a bench in real
    time, or with --dry-run on a simulated bench."""
    from cellbench.bench.runner.run import exit_code, run_bench

    if profile is None and bench is None:
        raise _fail("name a profile, or a bench file whose channels name theirs (--bench)")
    if stay and (dry_run or bench is None):
        raise _fail("--stay keeps a real bench's controller running: give --bench, without --dry-run")
    path = _profile_path(profile) if profile is not None else None
    identity: dict[str, object] = {k: v for k, v in (("operator", operator), ("comment", comment)) if v is not None}
    if dry_run and bench is not None:
        _rehearse(path, bench, seed=seed, runs_dir=runs_dir, cell=cell, soc=soc, temperature=temperature,
                  identity=identity)
        return
    if dry_run:
        if path is None:
            raise _fail("a dry run without --bench needs a profile")
        result = _simulate(path, seed=seed, runs_dir=runs_dir, cell=cell, soc=soc, temperature=temperature,
                           environment=environment, identity=identity)
        if code := exit_code([result]):
            raise typer.Exit(code)
        return
    if bench is None:
        raise _fail("say which bench to run on with --bench BENCH.yaml, or use --dry-run")
    cfg = _bench(bench)
    shared, own = _profiles(path, cfg, idle_ok=stay)
    _on_real_bench(lambda clock, progress: run_bench(
        cfg, shared.profile if shared else None, shared.text if shared else "", clock, runs_dir=runs_dir,
        on_progress=_reporter(progress), profile_source=shared.source if shared else "<profile>",
        base_dir=shared.base_dir if shared else Path("."), extra_metadata=identity, on_start=_announce,
        channel_profiles=own, keep_open=stay, allow_density=allow_current_density),
        list(cfg.channels) if stay else None)


def _profiles(path: Path | None, cfg: BenchConfig, *, idle_ok: bool = False
              ) -> tuple[ProfileFile | None, dict[str, ProfileFile]]:
    """The profile given on the command line (for channels naming none) and each channel's own, loaded and
    warned about; one line and exit 2 when a channel has none."""
    from cellbench.bench.runner.run import ProfileFile

    def load(where: Path) -> ProfileFile:
        prof, text = _load(where)
        _warn(prof, text, where)
        return ProfileFile(prof, text, where.name, where.parent)

    shared = load(path) if path is not None else None
    own = {name: load(_profile_path(Path(ch.profile))) for name, ch in cfg.channels.items() if ch.profile}
    if shared is None and not idle_ok and (missing := [n for n in cfg.channels if n not in own]):
        raise _fail(f"channel(s) {', '.join(missing)} name no profile in the bench file: give one on the command "
                    "line for them")
    return shared, own


def _on_real_bench(work: Callable[[RealClock, Progress], Coroutine[Any, Any, list[ChannelResult]]],
                   channels: list[str] | None = None) -> None:
    """Run on the real clock with a progress display; show the results (and, given the bench's `channels`, how
    every one of them ended) and exit as they say."""
    import asyncio

    from cellbench.bench.ops.latches import CellLatched
    from cellbench.bench.runner.run import exit_code
    from cellbench.bench.runtime.clock import RealClock
    from cellbench.drivers.errors import InstrumentFault
    from cellbench.profiles.parse import InputError

    clock = RealClock()
    try:
        with _progress_bar() as progress:
            results = clock.run(work(clock, progress))
    except CellLatched as exc:  # refused, as an instrument in use is: not a typo
        raise _fail(exc.problems, 1) from None
    except InputError as exc:
        raise _fail(exc.problems) from None
    except InstrumentFault as exc:
        raise _fail(str(exc), 1) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise _fail("interrupted while opening the instruments: no output had been turned on", 130) from None
    _show_results(results)
    if channels is not None:
        _summary(channels, results)
    if code := exit_code(results):
        raise typer.Exit(code)


@app.command()
def resume(
    target: Annotated[str, typer.Argument(help="a paused channel of a running controller (its run ID or channel "
                                               "name), or the run database of a run to continue (runs/....sqlite)")],
    bench: Annotated[Path | None, typer.Option("--bench", help="a bench file, if the instruments have moved")] = None,
    clear_latch: Annotated[
        bool, typer.Option("--clear-latch", help="resume a run that a safety stop ended or holds, the cell checked")
    ] = False,
    operator: OperatorOption = None,
) -> None:
    """Carry on a paused channel, or a run that was killed or interrupted (in its own database, at the step where
    it stood): inside the running controller that holds its channel, or in a controller of its own."""
    from cellbench.bench.ops import control, runs
    from cellbench.bench.runner.config import load_bench
    from cellbench.bench.runner.run import resume_run
    from cellbench.profiles.parse import InputError

    if (entry := _live_run(target, need=False)) is not None and entry.state == runs.PAUSED:
        if clear_latch:  # a channel its controller holds after a safety stop (on_safety_stop: hold)
            _command("clear_latch", entry, "by an operator, the cell checked", operator)
        _command("resume", entry, "by an operator", operator)
        return
    if entry is not None:
        raise _fail(f"run {entry.run_id} is running on channel '{entry.channel}': there is nothing to resume", 1)
    run_db = _database_of(target)
    if bench is None and (holder := _holder_of(run_db)) is not None:  # its channel is on a running controller
        _ask(holder.socket, f"bench '{holder.bench}'", control.Command(
            action="resume", channel=_recorded(run_db)[1], reason="by an operator", operator=_operator(operator),
            database=str(run_db.resolve())))
        return
    run_db = Path(target)
    try:
        cfg = load_bench(bench) if bench is not None else None
    except InputError as exc:
        raise _fail(exc.problems) from None

    async def one(clock: RealClock, progress: Progress) -> list[ChannelResult]:
        return [await resume_run(run_db, clock, bench=cfg, on_progress=_reporter(progress, "resumed"),
                                 clear_latch=clear_latch, on_start=_announce)]

    _on_real_bench(one)


@app.command("clear-latch")
def clear_latch_command(
    cell: Annotated[str, typer.Argument(help="the cell's ID, as the refusal names it")],
    reason: Annotated[str, typer.Option(help="what was checked on the cell (recorded)")],
    operator: OperatorOption = None,
) -> None:
    """Clear a cell's safety latch, after looking at the cell: `run` and `start` take it again. Recorded in the run
    that tripped, with the reason and who."""
    from cellbench.bench.ops import latches
    done = latches.clear(cell, f"{reason} (operator {_operator(operator)})")
    if done is None:
        raise _fail(f"cell {cell} has no safety latch", 1)
    console.print(f"cell {cell}: latch cleared ({done.reason}, run {done.run_id})", highlight=False)


@app.command()
def start(
    channel: Annotated[str, typer.Argument(help="an idle channel of a running controller (run --stay)")],
    profile: Annotated[Path, typer.Argument(help="the profile YAML file, or the name of a library profile")],
    bench: Annotated[str | None, typer.Option(help="the bench's name, where controllers share a channel name")]
    = None,
    operator: OperatorOption = None,
    allow_current_density: AllowDensityOption = False,
) -> None:
    """Start a new run on an idle channel of a running controller; its other channels run on."""
    from cellbench.bench.ops import control, runs
    if not any(channel in c.channels for c in control.controllers()):  # a run ID names its channel too
        channel = next((e.channel for e in runs.entries() if e.run_id == channel), channel)
    found = [c for c in control.controllers() if channel in c.channels and (bench is None or c.bench == bench)]
    if not found:
        raise _fail(f"no running controller holds a channel '{channel}' (start one with `cellbench run --bench "
                    "BENCH.yaml --stay`)")
    if len(found) > 1:
        raise _fail(f"channel '{channel}' is on several running benches ({', '.join(c.bench for c in found)}): "
                    "name one with --bench")
    path = _profile_path(profile).resolve()
    if not path.is_file():
        raise _fail(f"{profile}: cannot read the profile: no such file")
    _ask(found[0].socket, f"bench '{found[0].bench}'", control.Command(action="start", channel=channel,
                                                                       profile=str(path),
                                                                       operator=_operator(operator),
                                                                       allow_density=allow_current_density))


AllowDensityOption = Annotated[bool, typer.Option(
    "--allow-current-density", help="charge a cell denser than its max_charge_current_density (a lithium-metal "
                                    "cell's defaults to 2.5 mA/cm²), as a critical-current-density test does; "
                                    "recorded in the run")]
OperatorOption = Annotated[str | None, typer.Option(help="who gives the command (recorded with it; by default "
                                                           "the login name)")]
TargetArgument = Annotated[str, typer.Argument(help="the channel's run ID (see `cellbench runs`), its channel name, "
                                                    "or its database")]
ReasonOption = Annotated[str, typer.Option(help="why (recorded in the run's events)")]


@app.command()
def pause(target: TargetArgument, reason: ReasonOption = "by an operator", operator: OperatorOption = None) -> None:
    """Pause one running channel of a controller: its output off and its state saved, the others running on;
    `cellbench resume` carries it on."""
    entry = _live_run(target)
    assert entry is not None
    _command("pause", entry, reason, operator)


@app.command()
def stop(target: TargetArgument, reason: ReasonOption = "stopped by an operator",
         operator: OperatorOption = None) -> None:
    """Stop one running or paused channel of a controller (output off, recorded interrupted); the others run on."""
    entry = _live_run(target)
    assert entry is not None
    _command("stop", entry, reason, operator)


def _live_run(target: str, *, need: bool = True) -> runs.RunEntry | None:
    """The running or paused run a target names (run ID, channel, or database); one line and exit 2 when none
    or several do (unless not `need`: then None)."""
    from cellbench.bench.ops import runs
    here = [e for e in runs.entries() if e.state in (runs.RUNNING, runs.PAUSED)]
    path = Path(target)
    found = [e for e in here if e.run_id == target] or [e for e in here if e.channel == target] or [
        e for e in here if path.exists() and Path(e.database).exists() and Path(e.database).samefile(path)]
    if len(found) == 1:
        return found[0]
    if not need:
        return None
    if found:
        raise _fail(f"'{target}' names {len(found)} live runs ({', '.join(e.run_id for e in found)}): give the run ID")
    ended = [e for e in runs.entries() if e.run_id == target or e.channel == target or (
        path.exists() and Path(e.database).exists() and Path(e.database).samefile(path))]
    if ended:  # newest first: what became of the last run it names
        last = ended[0]
        when = f" at {runs.utc(last.ended)}" if last.ended else ""
        raise _fail(f"{last.channel} is idle: its run {last.run_id} ended: {last.reason or last.state}{when}", 1)
    raise _fail(f"no running or paused run is '{target}' (see `cellbench status`)")


def _operator(given: str | None) -> str:
    """Who gives a command: --operator, or the login name."""
    if given:
        return given
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _command(action: str, entry: runs.RunEntry, reason: str, operator: str | None = None) -> None:
    from cellbench.bench.ops import control
    if entry.control is None:
        raise _fail(f"run {entry.run_id}: its controller takes no commands (a dry run, or an older cellbench); "
                    f"stop it with a signal to pid {entry.pid}")
    _ask(entry.control, f"run {entry.run_id}", control.Command(
        action=action, channel=entry.channel, reason=reason, operator=_operator(operator)))


def _database_of(target: str) -> Path:
    """The run database a target names: its path, or a run ID of the registry."""
    from cellbench.bench.ops import runs
    path = Path(target)
    if path.exists() or path.suffix:
        return path
    return next((Path(e.database) for e in runs.entries() if e.run_id == target), path)


def _recorded(database: Path) -> tuple[str | None, str]:
    """The bench name and channel a run database records ((None, "") when it is no readable run)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{database.resolve()}?mode=ro", uri=True)
        try:
            meta = {k: v for k, v in con.execute("SELECT key, value FROM meta WHERE key IN ('bench', 'channel')")}
        finally:
            con.close()
        bench = json.loads(meta.get("bench", "null"))
        return (bench.get("name") if isinstance(bench, dict) else None), str(json.loads(meta.get("channel", '""')))
    except (sqlite3.DatabaseError, ValueError, OSError):
        return None, ""


def _holder_of(database: Path) -> control.Controller | None:
    """The running controller of this machine that holds the run's channel on its bench, if one does."""
    from cellbench.bench.ops import control
    if not database.is_file():
        return None
    bench, channel = _recorded(database)
    if bench is None or not channel:  # a run that does not say its bench is never handed to another's controller
        return None
    return next((c for c in control.controllers() if channel in c.channels and c.bench == bench), None)


def _ask(socket: str, who: str, command: control.Command) -> None:
    """One command to a controller's socket; its answer printed, or one line and exit 1."""
    import asyncio

    from cellbench.bench.ops import control
    try:
        reply = asyncio.run(control.send(Path(socket), command))
    except (OSError, TimeoutError) as exc:
        raise _fail(f"{who}: its controller did not answer: {exc}", 1) from None
    if not reply.ok:
        raise _fail(f"{who}: {reply.message}", 1)
    console.print(f"{who}: {reply.message}", highlight=False)


def _profile_path(profile: Path) -> Path:
    from cellbench.profiles.library import library_path

    if profile.exists() or profile.suffix:
        return profile
    try:
        return library_path(str(profile))
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None


@app.command()
def validate(
    profile: Annotated[Path | None, typer.Argument(help="the profile YAML file, or the name of a library profile "
                                                        "(with --bench: for the channels that name none)")] = None,
    bench: Annotated[Path | None, typer.Option("--bench", help="check against this bench's cells and instruments "
                                                               "too, each channel with its own profile")] = None,
    estimate: Annotated[bool, typer.Option(help="estimate the duration by a dry run on the simulated cell")] = True,
    cell: CellOption = "pellet",
    temperature: TempOption = 25.0,
    allow_current_density: AllowDensityOption = False,
) -> None:
    """Check a profile without touching any instrument, show its steps and estimate how long it runs; with
    --bench, every channel of the bench with the profile it would run."""
    from cellbench.bench.faces.simbench import simulated_config
    from cellbench.bench.runner.run import channel_range_problems, profile_problems
    from cellbench.profiles.checks import cell_problems, density_problems
    from cellbench.profiles.parse import locate

    if profile is None and bench is None:
        raise _fail("name a profile, or a bench file whose channels name theirs (--bench)")
    params = _preset(cell)
    if bench is None:
        assert profile is not None
        path = _profile_path(profile)
        prof, text = _load(path)
        cfg = simulated_config(params)
        (name, ch), = cfg.channels.items()
        c = cfg.cells[ch.cell]
        found = cell_problems(prof, c.voltage_min, c.voltage_max) + channel_range_problems(cfg, name, prof)
        if not allow_current_density and (limit := c.charge_density_limit) is not None:
            found += density_problems(prof, c.capacity, c.area, limit, f"simulated {cell}")
        if found:
            raise _fail(locate(text, path.name, [(p, f"{m} (simulated {cell} cell)") for p, m in found]))
        _show_profile(prof, text, path, params, cell, temperature, estimate)
        return
    cfg = _bench(bench)
    shared, own = _profiles(profile and _profile_path(profile), cfg, idle_ok=True)
    problems: list[str] = []
    checked: dict[int, ProfileFile] = {}
    which = []
    for name in cfg.channels:
        pf = own.get(name) or shared
        if pf is None:
            which.append(f"{name}: names no profile (idle until `cellbench start`)")
            continue
        said = profile_problems(cfg, name, pf.profile, allow_density=allow_current_density, tagged=False)
        problems += locate(pf.text, pf.source, [(p, f"{m} (bench '{cfg.name}', channel '{name}')") for p, m in said])
        checked.setdefault(id(pf), pf)
        which.append(f"{name}: {pf.source} ({pf.profile.name})")
    if problems:
        raise _fail(problems)
    for line in which:  # each channel with the profile it was checked with
        console.print(escape(line), highlight=False, soft_wrap=True)
    for pf in checked.values():
        _show_profile(pf.profile, pf.text, pf.base_dir / pf.source, params, cell, temperature, estimate,
                      warn=False)  # (warned of as it was loaded)


def _show_profile(prof: Profile, text: str, path: Path, params: CellParameters, cell: str, temperature: float,
                  estimate: bool, *, warn: bool = True) -> None:
    """A valid profile's step tree, its warnings, and its duration estimated by a dry run."""
    from rich.tree import Tree

    from cellbench.bench.faces.simbench import estimate_duration
    from cellbench.profiles.units import human_duration

    tree = Tree(f"[bold]{escape(prof.name)}[/bold] (sample every {prof.sample_period:g} s)")
    if prof.conditions:
        track = tree.add("conditions, alongside the steps")
        for cond in prof.conditions:
            (kind, body), = cond.model_dump(by_alias=True).items()
            track.add(f"{kind}: {body}" if not isinstance(body, float) else f"{kind}: {human_duration(body)}")
    _add_steps(tree, prof.steps)
    console.print(tree)
    console.print(f"[green]valid[/green]: {prof.executed_step_count()} steps when run without jumps")
    if warn:
        _warn(prof, text, path)
    if estimate:
        # a long profile's dry run takes seconds: on a terminal, say how far it has got (off one, nothing)
        with console.status("estimating the duration by a dry run") as status:
            shown = [0.0]

            def reached(test_time: float) -> None:
                if (now := time.monotonic()) - shown[0] >= 0.2:
                    shown[0] = now
                    status.update(f"estimating the duration by a dry run: {test_time / 3600:.1f} h so far")

            guess = estimate_duration(prof, text, params=params, temperature_c=temperature, base_dir=path.parent,
                                      on_progress=reached)
        console.print(guess.describe(cell, temperature), highlight=False, soft_wrap=True)


def _bench(path: Path) -> BenchConfig:
    from cellbench.bench.runner.config import load_bench
    from cellbench.profiles.parse import InputError

    try:
        return load_bench(path)
    except InputError as exc:
        raise _fail(exc.problems) from None


def _warn(prof: Profile, text: str, path: Path) -> None:
    """What the profile may do that it probably should not, as file:line warnings (the run still goes)."""
    from cellbench.profiles.checks import loop_warnings
    from cellbench.profiles.parse import locate

    for line in locate(text, path.name, loop_warnings(prof)):
        err.print(f"[yellow]warning: {escape(line)}[/yellow]", highlight=False, soft_wrap=True)


def _add_steps(tree: Tree, steps: list[Any]) -> None:
    from cellbench.profiles.schema import RepeatStep
    from cellbench.profiles.units import human_duration

    for step in steps:
        if isinstance(step, RepeatStep):
            budget = f", at most {human_duration(step.time_limit)}" if step.time_limit else ""
            label = f" [{step.label}]" if step.label else ""
            _add_steps(tree.add(f"repeat × {step.repeat}{budget}{label}"), step.steps)
        else:
            tree.add(_describe(step))


def _describe(step: Any) -> str:
    from cellbench.profiles.schema import body_of
    from cellbench.profiles.units import format_quantity

    body = body_of(step)
    shown = body.model_dump(exclude_defaults=True, exclude={"until", "label", "check"}).keys()
    text = ", ".join(f"{k}: {format_quantity(k, getattr(body, k))}" for k in shown)
    ends = " or ".join(lim.describe() + ("" if lim.then == "next" else f" → {lim.then}") for lim in body.until)
    label = f"[{body.label}] " if body.label else ""
    checks = "".join(f"; afterwards if {c.kind} {c.op} {c.value:g} → {c.then}" for c in body.check)
    return f"{label}{step.kind}: {text}" + (f" until {ends}" if ends else "") + checks


@app.command()
def export(
    run_db: Annotated[Path, typer.Argument(help="a run database (runs/....sqlite)")],
    out: Annotated[Path | None, typer.Option(help="folder for the files (default: beside the run)")] = None,
) -> None:
    """Export a run to the Battery Data Format: .bdf.csv, .bdf.parquet (.eis.bdf.csv), each with a .metadata.json."""
    from cellbench.bench.results.export import export_run
    from cellbench.bench.runtime.store import NotARun

    try:
        files = export_run(run_db, out)
    except (FileNotFoundError, NotARun) as exc:
        raise _fail(str(exc)) from None
    for kind, path in files.items():
        console.print(f"{kind:>9}: {path}")
    sidecar = json.loads(files["metadata"].read_text())
    for problem in [sidecar.get("unix_time_problem"), *sidecar.get("skipped", [])]:
        if problem:
            err.print(f"[yellow]warning: {escape(problem)}[/yellow]", highlight=False, soft_wrap=True)


@app.command()
def report(
    run_db: Annotated[Path, typer.Argument(help="a run database; it may still be running")],
    out: Annotated[Path | None, typer.Option(help="the report folder (default: beside the run)")] = None,
) -> None:
    """Plots (PNG) and one HTML page with the per-cycle table."""
    from cellbench.bench.results.report import write_report
    from cellbench.bench.runtime.extras import MissingExtra
    from cellbench.bench.runtime.store import NotARun

    try:
        page = write_report(run_db, out)
    except (FileNotFoundError, NotARun) as exc:
        raise _fail(str(exc)) from None
    except MissingExtra as exc:
        raise _fail(str(exc), 1) from None
    console.print(f"report: [bold]{page}[/bold]")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run databases")],
    out: Annotated[Path | None, typer.Option(help="the overlay plot (default: compare.png beside the first run)")]
    = None,
) -> None:
    """Overlay the capacity retention of several cells and state their cycle-life ratio."""
    from cellbench.bench.results.report import compare_runs
    from cellbench.bench.runtime.store import NotARun

    if len(runs) < 2:
        raise _fail("compare needs at least two runs")
    out = out or runs[0].parent / "compare.png"
    from cellbench.bench.runtime.extras import MissingExtra

    try:
        path, lives = compare_runs(runs, out)
    except (FileNotFoundError, NotARun) as exc:
        raise _fail(str(exc)) from None
    except MissingExtra as exc:
        raise _fail(str(exc), 1) from None
    for name, life in lives.items():
        console.print(f"{name}: cycle life to 80 % {'not reached' if life is None else f'{life:.1f} cycles'}")
    reached = [(n, life) for n, life in lives.items() if life]
    if len(reached) >= 2:
        (a, la), (b, lb) = reached[0], reached[1]
        console.print(f"cycle-life ratio {b} / {a}: [bold]{lb / la:.2f}[/bold]")
    console.print(f"overlay: {path}")


def _simulated(instrument: str) -> DriverSpec:
    """A registered driver with a simulator, by its name or (where only one fits) its role or a short name."""
    from cellbench.drivers.registry import drivers

    with_sim = {n: d for n, d in drivers().items() if d.simulator}
    key = instrument.lower()
    if key in with_sim:
        return with_sim[key]
    # a short name first (press, load-cell, espec), then a role (cycler, chamber, potentiostat)
    for fits in ([d for n, d in with_sim.items() if n.endswith(f"-{key}") or key in n.split("-")],
                 [d for d in with_sim.values() if key in d.roles]):
        if len(fits) == 1:
            return fits[0]
    raise _fail(f"unknown instrument '{instrument}' (expected one of: {', '.join(sorted(with_sim))})")


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        raise _fail(f"--since {text!r}: give a date as YYYY-MM-DD (UTC)") from None


@app.command("runs")
def runs_command(
    state: Annotated[str | None, typer.Option(help="only runs in this state (running, completed, interrupted, "
                                                   "failed, safety stop, recording failed)")] = None,
    cell: Annotated[str | None, typer.Option(help="only runs of this cell ID")] = None,
    since: Annotated[str | None, typer.Option(help="only runs started on or after this UTC date (YYYY-MM-DD)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array, for scripts")] = False,
    all_: Annotated[bool, typer.Option("--all", help="also the runs whose database is gone")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="forget the runs whose database is gone")] = False,
) -> None:
    """Every run this machine has started, newest first: state, cell, where its database and log are (runs whose
    database was deleted are left out unless --all; --prune forgets them)."""
    from rich.table import Table

    from cellbench.bench.ops import runs
    every = runs.entries()
    gone = [e for e in every if not Path(e.database).exists()]
    if prune:
        for e in gone:
            runs.forget(e)
        console.print(f"forgot {len(gone)} run(s) whose database is gone", highlight=False)
        return
    kept = every if all_ else [e for e in every if Path(e.database).exists()]
    found = runs.select(kept, state=state, cell=cell, since=_since(since))
    if as_json:
        print(json.dumps([e.model_dump() for e in found], indent=1))
        return
    if not found:
        console.print(f"no runs registered in {runs.state_dir() / 'runs'}", highlight=False)
        return
    table = Table(title="runs")
    for col in ("run ID", "state", "cell", "channel", "profile", "started (UTC)", "reason", "database"):
        table.add_column(col, overflow="fold")
    for e in found:
        table.add_row(e.run_id, e.state, e.cell_id, e.channel, e.profile, runs.utc(e.started),
                      e.reason if e.state != "completed" else "", e.database)
    _print_wide(table)


OFF_TERMINAL_WIDTH = 400  # columns a table gets when it goes to a file, a pipe or a log: not squeezed into 80


def _print_wide(table: Any) -> None:
    """A table on a terminal at its width; elsewhere (grep, a file, a log) as wide as its rows need."""
    if console.is_terminal:
        console.print(table)
    else:  # a console of its own: rich caps any print at its console's width (80 off a terminal)
        Console(file=_Output("stdout"), width=OFF_TERMINAL_WIDTH).print(table)  # type: ignore[arg-type]


def _hms(seconds: float | None) -> str:
    """1d 02:03:04, or 02:03:04."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _status_table(lives: list[runs.Live]) -> Table:
    from rich.table import Table

    from cellbench.bench.ops import runs
    table = Table(title=f"channels on this machine at {runs.utc(time.time())}")
    left = ("run ID", "cell", "channel", "state", "why", "step")
    for col in (*left, "cycle", "V", "mA", "T1 cell degC", "chamber degC", "MPa", "reading age", "elapsed",
                "step left"):
        table.add_column(col, justify="left" if col in left else "right", overflow="fold")

    def num(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, fmt)

    for lv in lives:
        step = "-" if lv.step_count is None else f"{lv.step_count}/{lv.total_steps or '?'} {lv.step_type}"
        cycle = "-" if lv.cycle is None else str(lv.cycle)
        why = lv.entry.reason if lv.entry.state != runs.RUNNING else ""
        table.add_row(lv.entry.run_id, lv.entry.cell_id, lv.entry.channel, lv.entry.state, escape(why) or "-", step,
                      cycle, num(lv.voltage, ".4f"), num(lv.current, "+.4f", 1e3), num(lv.cell_temperature_c, ".1f"),
                      num(lv.chamber_temperature_c, ".1f"), num(lv.pressure_mpa, ".2f"), _hms(lv.reading_age_s),
                      _hms(lv.test_time), _hms(lv.remaining_s))
    return table


def _channels_now() -> list[runs.Live]:
    """Every live run of this machine, and every idle channel of its running controllers with how and when its
    last run ended."""
    from cellbench.bench.ops import control, runs
    every = runs.entries()
    lives = [runs.live(e) for e in every if e.state in (runs.RUNNING, runs.PAUSED)]
    busy = {(lv.entry.bench, lv.entry.channel) for lv in lives}
    for c in control.controllers():
        for name in c.channels:
            if (c.bench, name) in busy:
                continue
            last = next((e for e in every if e.bench == c.bench and e.channel == name), None)
            if last is None:
                idle = runs.RunEntry(run_id="-", channel=name, cell_id="-", bench=c.bench, profile="-", state="idle",
                                     reason="no run since its controller started", database="", pid=c.pid, host="",
                                     started=0.0)
            else:
                when = f" at {runs.utc(last.ended)}" if last.ended else ""
                idle = last.model_copy(update={"state": "idle", "reason": f"its run ended: "
                                                                          f"{last.reason or last.state}{when}"})
            lives.append(runs.Live(idle))
    return lives


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print once as JSON, for scripts")] = False,
    watch: Annotated[bool | None, typer.Option(help="refresh until Ctrl-C (default: on a terminal)")] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 2.0,
    broker: Annotated[str | None, typer.Option(help="instead of this machine: every bench on this MQTT broker, "
                                                     "mqtt://[user@]host[:port][/prefix] (mqtts:// for TLS)")]
    = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
) -> None:
    """The live state of every channel on this machine (or on an MQTT broker), from any terminal: running,
    paused or latched and why, idle and how its last run ended; how old each reading is, the cell's (T1) and the
    chamber's temperature, and at most how long the step has left by its time and capacity limits."""
    if broker is not None:
        _broker_status(broker, password_file, as_json, ca_file)
        return
    now = _channels_now
    if as_json:
        print(json.dumps([lv.as_dict() for lv in now()], indent=1, default=str))
        return
    if not (console.is_terminal if watch is None else watch):
        _print_wide(_status_table(now()))
        return
    from rich.live import Live

    try:
        with Live(_status_table(now()), console=console, auto_refresh=False) as screen:
            while True:
                time.sleep(interval)
                screen.update(_status_table(now()), refresh=True)
    except KeyboardInterrupt:
        pass


PasswordFileOption = Annotated[Path | None, typer.Option(help="a file whose first line is the broker password")]
CaFileOption = Annotated[Path | None, typer.Option(help="the broker's CA certificate, for mqtts:// (the system's "
                                                         "CAs if absent)")]


def _broker_config(url: str, password_file: Path | None, ca_file: Path | None = None) -> Any:
    from cellbench.bench.ops import mqtt
    try:
        cfg = mqtt.from_url(url, password_file, ca_file)
        cfg.password()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return cfg


def _broker_status(url: str, password_file: Path | None, as_json: bool, ca_file: Path | None = None) -> None:
    import asyncio

    import aiomqtt
    from rich.table import Table

    from cellbench.bench.ops import mqtt
    cfg = _broker_config(url, password_file, ca_file)
    try:
        found = asyncio.run(mqtt.statuses(cfg))
    except aiomqtt.MqttError as exc:
        raise _fail(f"broker {cfg.host}:{cfg.port}: {exc}", code=1) from None
    if as_json:
        print(json.dumps([st.model_dump() for st in found], indent=1))
        return
    table = Table(title=f"{len(found)} channel(s) on {cfg.host}:{cfg.port}")
    for column in ("bench", "channel", "state", "run", "step", "cycle", "since"):
        table.add_column(column)
    for st in found:
        table.add_row(st.bench, st.channel, st.state, st.run_id or "-", st.step or "-",
                      "-" if st.cycle is None else str(st.cycle), st.time or "-")
    _print_wide(table)


mqtt_app = typer.Typer(help="The MQTT side of a bench: telemetry and remote commands.", no_args_is_help=True,
                  rich_markup_mode=None)
app.add_typer(mqtt_app, name="mqtt")


@mqtt_app.command("check")
def mqtt_check(
    bench: Annotated[Path | None, typer.Option(help="the bench file whose 'mqtt:' section to check")] = None,
    broker: Annotated[str | None, typer.Option(help="or a broker URL, mqtt://user@host[:port][/prefix]")] = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    name: Annotated[str, typer.Option(help="with --broker: the bench name whose topics to check")] = "bench",
) -> None:
    """Whether these credentials can do what a bench does on the broker: connect, take commands, publish."""
    import asyncio

    from cellbench.bench.ops import mqtt
    if (bench is None) == (broker is None):
        raise _fail("give either --bench FILE or --broker URL")
    if bench is not None:
        cfg_bench = _bench(bench)
        if cfg_bench.mqtt is None:
            raise _fail(f"{bench}: the bench file has no 'mqtt:' section (telemetry is off)")
        cfg, name = cfg_bench.mqtt, cfg_bench.name
        try:
            cfg.password()
        except ValueError as exc:
            raise _fail(str(exc)) from None
    else:
        cfg = _broker_config(broker or "", password_file, ca_file)
    results = asyncio.run(mqtt.check(cfg, name))
    for what, ok, detail in results:
        mark = "[green]ok[/green]" if ok else "[red]no[/red]"
        console.print(f"{mark}  {what}: {detail}", highlight=False, soft_wrap=True)
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)


@sim_app.command("serve")
def sim_serve(
    instrument: Annotated[str, typer.Argument(help="which instrument: a driver name (keithley2450, espec, "
                                                   "modbus-press or press, modbus-load-cell or load-cell, "
                                                   "palmsens, maccor, arbin)")],
    port: Annotated[int | None, typer.Option(help="TCP port to listen on (0 picks a free one; default: the "
                                                  "instrument's own: 5025 for a 2450, 57570 for MacNet, 9031 for CTI, "
                                                  "5502 for a Modbus press or load cell)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    serial: Annotated[bool, typer.Option(help="serve on a pseudo-terminal serial line instead of TCP")] = False,
    cell: CellOption = "pellet",
    soc: Annotated[float, typer.Option(help="initial state of charge, 0 to 1")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the measurement noise")] = 0,
    channels: Annotated[int, typer.Option(min=1, max=128, help="channels of a multi-channel cycler box")] = 8,
    bin_port: Annotated[int, typer.Option(help="the binary-message port of a Maccor box (0 picks a free one)")]
    = 57560,
    login: Annotated[str, typer.Option(help="user:password the simulated Arbin cycler accepts")] = "admin:000000",
    temperature: Annotated[float, typer.Option(help="temperature of the simulated cell, degC")] = 25.0,
    fault: Annotated[list[str] | None, typer.Option(help="inject a fault into a line instrument: silent, garbage, "
                                                         "drop, stuck or delay=SECONDS (repeatable)")] = None,
    short_on_usr1: Annotated[float | None, typer.Option(help="a lithium short of this many ohms across the cell "
                                                              "when the server gets SIGUSR1 (kill -USR1 PID): "
                                                              "rehearse a short at a moment of your choosing")]
    = None,
    exit_with_parent: Annotated[bool, typer.Option(help="stop when the process that started it dies (a test "
                                                        "runner killed with -9 leaves no simulator behind)")]
    = False,
) -> None:
    """Serve a simulated instrument until interrupted, in real time, for any client."""
    import asyncio

    from cellbench.drivers.registry import simulator
    from cellbench.simulators.server import ServeOptions

    spec = _simulated(instrument)
    _preset(cell)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve_instrument = simulator(spec)
    port = int(spec.extra.get("port", 5025)) if port is None else port
    from cellbench.simulators.server import faults_of

    try:
        faults_of(tuple(fault or ()))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    options = ServeOptions(host=host, port=port, serial=serial, soc=soc, seed=seed, cell=cell, channels=channels,
                           bin_port=bin_port, login=login, temperature_c=temperature, faults=tuple(fault or ()),
                           short_on_usr1=short_on_usr1)

    async def serve() -> None:
        parent = os.getppid()
        async with serve_instrument(options) as where:
            console.print(f"serving {where}", highlight=False)
            if not exit_with_parent:
                await asyncio.Event().wait()
            # an orphan is adopted by another process: its parent is gone (no event says so: it is polled)
            while os.getppid() == parent:  # noqa: ASYNC110
                await asyncio.sleep(PARENT_CHECK)
            console.print(f"the process that started it (pid {parent}) is gone: stopped")

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1) from None
    except KeyboardInterrupt:
        console.print("stopped")


if __name__ == "__main__":
    app()
