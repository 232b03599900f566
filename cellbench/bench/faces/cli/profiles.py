"""Looking at a profile before it runs: validate."""


from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:
    from rich.tree import Tree

    from cellbench.bench.runner.run import ProfileFile
    from cellbench.profiles.schema import Profile
    from cellbench.simulators.parameters import CellParameters

from cellbench.bench.faces.cli.common import (
    CellOption,
    TempOption,
    _bench,
    _fail,
    _load,
    _preset,
    _profile_path,
    _profiles,
    _warn,
    app,
    console,
)
from cellbench.bench.faces.cli.running import AllowDensityOption


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


