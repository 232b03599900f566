"""Turning runs into answers: export, report, compare."""


from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:

    pass

from cellbench.bench.faces.cli.common import _fail, app, console, err


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


