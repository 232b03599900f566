"""The cellbench command line: demo, run, validate, sim serve."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from bench.analysis import cycle_table
from bench.clock import RealClock, VirtualClock
from bench.config import load_bench
from bench.run import ChannelResult, run_bench, run_simulated
from bench.store import open_run
from drivers.errors import InstrumentFault
from profiles import engine
from profiles.library import library_path
from profiles.parse import InputError, load_profile
from profiles.schema import Profile, RepeatStep
from simulators.parameters import PRESETS

app = typer.Typer(help="Hardware-in-the-loop test bench for solid-state battery cells.", no_args_is_help=True)
sim_app = typer.Typer(help="Simulated instruments that speak the real protocols.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
console = Console()
err = Console(stderr=True)

DEMO_PROFILE = "formation-and-cycling"


def _fail(problems: list[str] | str, code: int = 2) -> typer.Exit:
    for line in [problems] if isinstance(problems, str) else problems:
        err.print(f"[red]{line}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(path: Path) -> tuple[Profile, str]:
    try:
        return load_profile(path)
    except InputError as exc:
        raise _fail(exc.problems) from None


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(), console=console, transient=True,
    )


def _reporter(progress: Progress, profile: Profile) -> Any:
    tasks: dict[str, Any] = {}

    def report(channel: str, p: engine.Progress) -> None:
        if channel not in tasks:
            tasks[channel] = progress.add_task(channel, total=profile.executed_step_count())
        progress.update(
            tasks[channel],
            completed=p.step_count - 1,
            description=(
                f"{channel} · cycle {p.cycle} · {p.step_type:<12} · {p.voltage:6.3f} V "
                f"{p.current * 1e3:+8.4f} mA · test time {p.test_time / 3600:7.2f} h"
            ),
        )

    return report


def _show_results(results: list[ChannelResult]) -> None:
    for res in results:
        with open_run(res.database) as store:
            rows = cycle_table(store.iter_samples())
        table = Table(title=f"{res.channel}: per-cycle summary")
        for col in ("cycle", "charge / mAh", "discharge / mAh", "CE / %", "charge / mWh", "discharge / mWh"):
            table.add_column(col, justify="right")
        for r in rows:
            ce = f"{r.coulombic_efficiency * 100:.2f}" if r.coulombic_efficiency is not None else "-"
            table.add_row(
                str(r.cycle), f"{r.charge_ah * 1e3:.4f}", f"{r.discharge_ah * 1e3:.4f}", ce,
                f"{r.charge_wh * 1e3:.3f}", f"{r.discharge_wh * 1e3:.3f}",
            )
        console.print(table)
        state = "[green]completed[/green]" if res.outcome.completed else f"[red]{res.outcome.reason}[/red]"
        console.print(
            f"{res.channel}: {state} after {res.outcome.test_time / 3600:.2f} h of test time, "
            f"{res.outcome.steps} steps"
        )
        console.print(f"run database: [bold]{res.database}[/bold]")


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="seed of the simulated measurement noise")] = 0,
    runs_dir: Annotated[Path, typer.Option(help="where run databases go")] = Path("runs"),
    profile: Annotated[Path | None, typer.Option(help="a profile file instead of the bundled demo")] = None,
) -> None:
    """Run the bundled formation-and-cycling profile on a simulated bench, faster than real time."""
    path = profile or library_path(DEMO_PROFILE)
    prof, text = _load(path)
    console.print(f"[bold]{prof.name}[/bold] on a simulated Keithley 2450 with an NMC811 | Li6PS5Cl | Li cell")
    clock = VirtualClock()
    with _progress_bar() as progress:
        result, _ = clock.run(
            run_simulated(prof, text, clock, seed=seed, runs_dir=runs_dir, on_progress=_reporter(progress, prof))
        )
    _show_results([result])
    if not result.outcome.completed:
        raise typer.Exit(1)


@app.command()
def run(
    profile: Annotated[Path, typer.Argument(help="the profile YAML file")],
    bench: Annotated[Path, typer.Option("--bench", help="the bench YAML file naming instruments and cells")],
    runs_dir: Annotated[Path, typer.Option(help="where run databases go")] = Path("runs"),
) -> None:
    """Run a profile on every channel of a bench, in real time."""
    prof, text = _load(profile)
    try:
        cfg = load_bench(bench)
    except InputError as exc:
        raise _fail(exc.problems) from None
    clock = RealClock()
    try:
        with _progress_bar() as progress:
            results = clock.run(
                run_bench(cfg, prof, text, clock, runs_dir=runs_dir, on_progress=_reporter(progress, prof))
            )
    except InstrumentFault as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        raise _fail("interrupted: outputs were turned off", 130) from None
    _show_results(results)
    if not all(r.outcome.completed for r in results):
        raise typer.Exit(1)


@app.command()
def validate(profile: Annotated[Path, typer.Argument(help="the profile YAML file")]) -> None:
    """Check a profile without touching any instrument, and show its steps."""
    prof, _ = _load(profile)
    tree = Tree(f"[bold]{prof.name}[/bold] (sample every {prof.sample_period:g} s)")
    _add_steps(tree, prof.steps)
    console.print(tree)
    console.print(f"[green]valid[/green]: {prof.executed_step_count()} steps when run")


def _add_steps(tree: Tree, steps: list[Any]) -> None:
    for step in steps:
        if isinstance(step, RepeatStep):
            _add_steps(tree.add(f"repeat × {step.repeat}"), step.steps)
        else:
            (kind, body), = step.model_dump(mode="json").items()
            tree.add(f"{kind}: {body}")


@sim_app.command("serve")
def sim_serve(
    instrument: Annotated[str, typer.Argument(help="which instrument: keithley2450")],
    port: Annotated[int, typer.Option(help="TCP port to listen on (0 picks a free one)")] = 5025,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    cell: Annotated[str, typer.Option(help=f"simulated cell: {', '.join(PRESETS)}")] = "pellet",
    soc: Annotated[float, typer.Option(help="initial state of charge, 0 to 1")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the measurement noise")] = 0,
) -> None:
    """Serve a simulated instrument over TCP until interrupted, in real time."""
    from simulators.cell import SolidStateCell
    from simulators.keithley2450 import Keithley2450Sim
    from simulators.server import SimServer

    if instrument.lower() != "keithley2450":
        raise _fail(f"unknown instrument '{instrument}' (expected one of: keithley2450)")
    if cell not in PRESETS:
        raise _fail(f"unknown cell '{cell}' (expected one of: {', '.join(PRESETS)})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        sim = Keithley2450Sim(SolidStateCell(PRESETS[cell], soc=soc), loop.time, noise_v=20e-6, seed=seed)
        server = await SimServer(sim).start(host, port)
        console.print(f"serving a simulated Keithley 2450 ({cell} cell) at [bold]{server.resource}[/bold]")
        try:
            await server.serve_forever()
        finally:
            await server.close()

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1) from None
    except KeyboardInterrupt:
        console.print("stopped")


if __name__ == "__main__":
    app()
