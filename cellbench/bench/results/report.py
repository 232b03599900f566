"""`cellbench report` and `cellbench compare`: PNG plots and one HTML page per run, from its database.

Works on a run that is still going: it reads what has been committed so far.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellbench.bench.results.analysis import CycleSummary, Dcir, cycle_life, dcir, dqdv, store_table, unix_time_problem
from cellbench.bench.runtime.extras import need
from cellbench.bench.runtime.store import check_run, open_run

FIGSIZE = (8, 4.5)
DPI = 100


def _plt() -> Any:
    matplotlib = need("matplotlib", "the report")
    matplotlib.use("Agg")
    return need("matplotlib.pyplot", "the report")


def _retention(rows: list[CycleSummary]) -> tuple[list[float], list[int]]:
    """The retentions a run has (every cycle's, or its reference cycles') and their cycle numbers."""
    found = [(r.retention, r.cycle) for r in rows if r.retention is not None]
    return [x for x, _ in found], [c for _, c in found]


def write_report(database: str | Path, out_dir: str | Path | None = None) -> Path:
    """Plots and an index.html for one run; returns the page."""
    db = Path(database)
    out = Path(out_dir) if out_dir else db.with_suffix("")
    check_run(db)  # before any folder is made for it
    out.mkdir(parents=True, exist_ok=True)
    with open_run(db) as store:
        samples, meta, spectra, fits = store.samples(), store.metadata(), store.spectra(), store.fits()
        rows, events = store_table(store), store.events()
    plt = _plt()
    images = [_time_series(plt, samples, out / "time-series.png"), _cycles(plt, rows, out / "cycles.png")]
    if samples:
        images.append(_voltage_capacity(plt, samples, out / "voltage-capacity.png"))
    retention, cycles = _retention(rows)
    if retention:
        images.append(_retention_plot(plt, retention, cycles, out / "retention.png"))
    cycle_of = {s.step_count: s.cycle for s in samples}
    pulses = dcir(samples)
    if fits or pulses:
        images.append(_resistance(plt, samples, pulses, fits, cycle_of, out / "resistance.png"))
    with_discharge = sorted({s.cycle for s in samples if s.current < 0})
    chosen = sorted({with_discharge[0], with_discharge[len(with_discharge) // 2], with_discharge[-1]}) \
        if with_discharge else []
    curves = {c: curve for c in chosen if (curve := dqdv(samples, cycle=c))}
    if curves:
        images.append(_dqdv(plt, curves, out / "dqdv.png"))
    if spectra:
        images.append(_nyquist(plt, spectra, fits, cycle_of, out / "nyquist.png"))
    page = out / "index.html"
    page.write_text(_page(meta, rows, images, samples, events, pulses))
    return page


def _time_series(plt: Any, samples: list[Any], path: Path) -> Path:
    t = [s.test_time / 3600 for s in samples]
    panels = [("Voltage / V", [s.voltage for s in samples]), ("Current / mA", [s.current * 1e3 for s in samples])]
    if any(s.t1_c is not None or s.ambient_c is not None for s in samples):
        panels.append(("Temperature / degC", [s.t1_c if s.t1_c is not None else s.ambient_c for s in samples]))
    if any(s.pressure_pa is not None for s in samples):
        panels.append(("Pressure / MPa", [None if s.pressure_pa is None else s.pressure_pa / 1e6 for s in samples]))
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(8, 2.2 * len(panels)), dpi=DPI)
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.plot(t, values, lw=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("Test time / h")
    return _written(plt, fig, path)


def _cycles(plt: Any, rows: list[CycleSummary], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    cycles = [r.cycle for r in rows]
    ax.plot(cycles, [r.discharge_ah * 1e3 for r in rows], "o-", label="discharge")
    ax.plot(cycles, [r.charge_ah * 1e3 for r in rows], "s--", label="charge")
    ax.set_xlabel("Cycle")
    ax.set_ylabel("Capacity / mAh")
    ax.grid(alpha=0.3)
    _integer_ticks(ax)
    ce = ax.twinx()
    ce.plot(cycles, [(r.coulombic_efficiency or float("nan")) * 100 for r in rows], "^:", color="tab:green",
            label="CE")
    ce.set_ylabel("Coulombic efficiency / %")
    ax.legend(loc="lower left")
    return _written(plt, fig, path)


def _dqdv(plt: Any, curves: dict[int, list[tuple[float, float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for c, curve in curves.items():
        ax.plot([v for v, _ in curve], [d * 1e3 for _, d in curve], label=f"cycle {c}")
    ax.legend()
    ax.set_xlabel("Voltage / V")
    ax.set_ylabel("dQ/dV (discharge) / mAh/V")
    ax.grid(alpha=0.3)
    return _written(plt, fig, path)


def _nyquist(plt: Any, spectra: dict[int, list[tuple[float, float, float]]], fits: list[dict[str, Any]],
             cycle_of: dict[int, int], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 6), dpi=DPI)
    fitted = {f["step_count"]: f for f in fits}
    cycles = [cycle_of.get(step, 0) for step in spectra]
    colours, bar = _by_cycle(plt, cycles)
    for (step, points), c in zip(spectra.items(), cycles, strict=True):
        ax.plot([p[1] for p in points], [-p[2] for p in points], "o", ms=3, color=colours(c))
        if step in fitted:
            _plot_fit(ax, [p[0] for p in points], fitted[step], colours(c))
    ax.set_xlabel("Z' / ohm")
    ax.set_ylabel("-Z'' / ohm")
    ax.set_aspect("equal", adjustable="datalim")
    return _with_cycle_bar(plt, fig, ax, bar, path)


def _integer_ticks(ax: Any, axis: Any = None) -> None:
    """Whole cycle numbers on an axis (the x axis by default), however few cycles there are."""
    from matplotlib.ticker import MaxNLocator

    axis = axis if axis is not None else ax.xaxis
    axis.set_major_locator(MaxNLocator(integer=True))
    if axis is ax.xaxis:
        low, high = ax.get_xlim()
        if high - low < 2:
            middle = round((low + high) / 2)
            ax.set_xlim(middle - 1, middle + 1)


def _by_cycle(plt: Any, cycles: list[int]) -> tuple[Any, Any]:
    """A sequential colour for each cycle number, and the mappable for its colour bar."""
    import matplotlib as mpl

    low, high = (min(cycles), max(cycles)) if cycles else (1, 1)
    norm = mpl.colors.Normalize(vmin=low, vmax=max(high, low + 1))
    cmap = mpl.colormaps["viridis"]
    bar = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    return (lambda c: cmap(norm(c))), bar


def _voltage_capacity(plt: Any, samples: list[Any], path: Path) -> Path:
    """Voltage against capacity, each cycle's charge and discharge, coloured by cycle."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    by_cycle: dict[int, list[Any]] = {}
    for s in samples:  # one pass: a long run has hundreds of cycles
        if s.step_type != "Rest":
            by_cycle.setdefault(s.cycle, []).append(s)
    colours, bar = _by_cycle(plt, sorted(by_cycle))
    for c, mine in sorted(by_cycle.items()):
        halves: tuple[tuple[Callable[[Any], bool], Callable[[Any], float]], ...] = (
            (lambda s: s.current > 0, lambda s: s.charge_ah), (lambda s: s.current < 0, lambda s: s.discharge_ah))
        for flows, q in halves:
            half = [s for s in mine if flows(s)]
            if half:
                ax.plot([q(s) * 1e3 for s in half], [s.voltage for s in half], lw=0.8, color=colours(c))
    ax.set_xlabel("Capacity / mAh")
    ax.set_ylabel("Voltage / V")
    return _with_cycle_bar(plt, fig, ax, bar, path)


def _retention_plot(plt: Any, retention: list[float], cycles: list[int], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.plot(cycles, [x * 100 for x in retention], "o-")
    ax.axhline(80, color="grey", ls=":", label="80 %")
    return _by_cycle_axes(plt, fig, ax, "Capacity retention / %", path)


def _written(plt: Any, fig: Any, path: Path) -> Path:
    """Lay a figure out, write it and free it."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _with_cycle_bar(plt: Any, fig: Any, ax: Any, bar: Any, path: Path) -> Path:
    """Finish a plot coloured by cycle: grid, a colour bar with whole cycle numbers; write it."""
    ax.grid(alpha=0.3)
    _integer_ticks(ax, fig.colorbar(bar, ax=ax, label="Cycle").ax.yaxis)
    return _written(plt, fig, path)


def _by_cycle_axes(plt: Any, fig: Any, ax: Any, ylabel: str, path: Path) -> Path:
    """Finish a plot over whole cycles (labels, grid, legend, integer ticks) and write it."""
    ax.set_xlabel("Cycle")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _integer_ticks(ax)
    return _written(plt, fig, path)


def _resistance(plt: Any, samples: list[Any], pulses: list[Dcir], fits: list[dict[str, Any]],
                cycle_of: dict[int, int],
                path: Path) -> Path:
    """Resistance over cycles: the EIS fits' ohmic and interfacial parts, and the median DCIR of each cycle."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    if fits:
        at = [cycle_of.get(f["step_count"], 0) for f in fits]
        ax.plot(at, [f["r_ohmic"] for f in fits], "o-", label="EIS: ohmic")
        ax.plot(at, [f["r_interfacial"] for f in fits], "s-", label="EIS: interfacial")
    by_cycle: dict[int, list[float]] = {}
    times = [s.test_time for s in samples]
    for p in pulses:
        k = min(max(0, bisect.bisect_left(times, p.test_time)), len(samples) - 1)
        by_cycle.setdefault(samples[k].cycle, []).append(p.resistance_10ms)
    if by_cycle:
        cycles = sorted(by_cycle)
        ax.plot(cycles, [sorted(v)[len(v) // 2] for v in (by_cycle[c] for c in cycles)], "^-",
                label="DCIR at 10 ms (median)")
    return _by_cycle_axes(plt, fig, ax, "Resistance / ohm", path)


def _outcome(events: list[dict[str, Any]]) -> tuple[str, bool]:
    """How the run ended, in its own words, and whether it reached the end of its profile."""
    ended = [e for e in events if e["kind"] == "end"]
    if not ended:
        return "no end recorded: still running, or its controller died (see `cellbench runs`)", False
    said = str(ended[-1]["message"])
    return said, said == "completed"


def _plot_fit(ax: Any, frequency: list[float], fit: dict[str, Any], color: str) -> None:
    np = need("numpy", "the report's impedance fits")
    CustomCircuit = need("impedance.models.circuits", "the report's impedance fits").CustomCircuit

    p = fit["parameters"]
    circuit = CustomCircuit(fit["circuit"], initial_guess=[p[k] for k in p])
    circuit.parameters_ = np.array([p[k] for k in p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = circuit.predict(np.asarray(frequency), use_initial=True)
    ax.plot(z.real, -z.imag, "-", lw=1, color=color)


def _identity(meta: dict[str, Any]) -> list[str]:
    """Cell ID, batch, active mass and area, operator and comment, where the run records them."""
    cell = meta.get("cell") or {}
    mass = cell.get("active_mass_g")
    parts = [("Cell", meta.get("cell_id")), ("batch", cell.get("batch")),
             ("active mass", None if mass is None else f"{mass * 1e3:.4g} mg"),
             ("area", None if cell.get("area") is None else f"{cell['area']:.4g} cm²"),
             ("operator", meta.get("operator")), ("comment", meta.get("comment"))]
    return [f"{name} {value}" for name, value in parts if value not in (None, "")]


def _page(meta: dict[str, Any], rows: list[CycleSummary], images: list[Path], samples: list[Any],
          events: list[dict[str, Any]], pulses: list[Dcir]) -> str:
    """The page, from the package's template (autoescaped: a cell ID or comment is text, never markup)."""
    jinja2 = need("jinja2", "the report")

    def cell(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    table = [
        (str(r.cycle), f"{r.charge_ah * 1e3:.4f}", f"{r.discharge_ah * 1e3:.4f}",
         cell(r.coulombic_efficiency and r.coulombic_efficiency * 100, ".2f"), cell(r.mean_charge_voltage, ".3f"),
         cell(r.mean_discharge_voltage, ".3f"), cell(r.retention and r.retention * 100, ".1f"),
         cell(r.energy_density_wh_l, ".1f"), cell(r.stack_energy_density_wh_l, ".1f"),
         cell(r.specific_capacity_mah_g, ".1f"), cell(r.areal_capacity_mah_cm2, ".3f"))
        for r in rows
    ]
    retention, cycles = _retention(rows)
    outcome, completed = _outcome(events)
    if not completed:  # the last cycle of a run that was stopped may be cut short: it says nothing of ageing
        retention, cycles = retention[:-1], cycles[:-1]
    life = cycle_life(retention, cycles=cycles)
    if life is not None:
        life_line = f"Cycle life to 80 % retention: {life:.1f} cycles" + ("" if completed else
                                                                         " (before the run stopped)")
    elif completed:
        life_line = "Cycle life to 80 % retention: not reached"
    else:
        life_line = "No cycle life: the run did not reach the end of its profile"
    env = jinja2.Environment(loader=jinja2.PackageLoader("cellbench.bench.results", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    page: str = env.get_template("report.html").render(
        title=str(meta.get("profile_name", "run")), outcome=outcome, completed=completed,
        run_id=str(meta.get("run_id", "")), channel=str(meta.get("channel", "")), n_samples=len(samples),
        hours=samples[-1].test_time / 3600 if samples else 0.0, identity=_identity(meta), life_line=life_line,
        n_pulses=len(pulses), time_problem=unix_time_problem(s.unix_time for s in samples),
        dcir_median=sorted(p.resistance_10ms for p in pulses)[len(pulses) // 2] if pulses else None,
        rows=table, images=images,
    )
    return page


def compare_runs(databases: list[Path], out: Path) -> tuple[Path, dict[str, float | None]]:
    """Capacity retention of several runs overlaid; their cycle lives to 80 %."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    lives: dict[str, float | None] = {}
    for db in databases:
        check_run(db)
    for db in databases:
        with open_run(db) as store:
            rows = store_table(store)
        retention, cycles = _retention(rows)
        lives[db.stem] = cycle_life(retention, cycles=cycles)
        ax.plot([c - cycles[0] for c in cycles], [x * 100 for x in retention], label=db.stem)
    ax.axhline(80, color="grey", ls=":")
    ax.set_xlabel("Cycles after the first")
    ax.set_ylabel("Capacity retention / %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _written(plt, fig, out), lives
