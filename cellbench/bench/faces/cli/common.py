"""What every command of the cellbench command line shares: the app, its output, loading and showing runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:
    from rich.progress import Progress

    from cellbench.bench.runner.config import BenchConfig
    from cellbench.bench.runner.run import ChannelResult, ProfileFile
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


def _profile_path(profile: Path) -> Path:
    from cellbench.profiles.library import library_path

    if profile.exists() or profile.suffix:
        return profile
    try:
        return library_path(str(profile))
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None


