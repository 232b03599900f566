"""Running tests: demo, run, resume, start, pause, stop, clear-latch."""


from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:
    from rich.progress import Progress

    from cellbench.bench.ops import control, runs
    from cellbench.bench.runner.run import ChannelResult
    from cellbench.bench.runtime.clock import RealClock

from cellbench.bench.faces.cli.common import (
    DEMO_PROFILE,
    CellOption,
    RunsOption,
    SeedOption,
    SocOption,
    TempOption,
    _announce,
    _bench,
    _fail,
    _profile_path,
    _profiles,
    _progress_bar,
    _rehearse,
    _reporter,
    _show_results,
    _simulate,
    _summary,
    app,
    console,
)


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




