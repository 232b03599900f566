"""`cellbench report` and `cellbench compare`: PNG plots and one HTML page per run, from its database.

Works on a run that is still going: it reads what has been committed so far.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path
from typing import Any

from cellbench.bench.analysis import CycleSummary, cycle_life, dcir, dqdv, store_table
from cellbench.bench.store import check_run, open_run

FIGSIZE = (8, 4.5)
DPI = 100


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        rows = store_table(store)
    plt = _plt()
    images = [_time_series(plt, samples, out / "time-series.png"), _cycles(plt, rows, out / "cycles.png")]
    with_discharge = sorted({s.cycle for s in samples if s.current < 0})
    chosen = sorted({with_discharge[0], with_discharge[len(with_discharge) // 2], with_discharge[-1]}) \
        if with_discharge else []
    curves = {c: curve for c in chosen if (curve := dqdv(samples, cycle=c))}
    if curves:
        images.append(_dqdv(plt, curves, out / "dqdv.png"))
    if spectra:
        images.append(_nyquist(plt, spectra, fits, out / "nyquist.png"))
    page = out / "index.html"
    page.write_text(_page(meta, rows, images, samples))
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _cycles(plt: Any, rows: list[CycleSummary], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    cycles = [r.cycle for r in rows]
    ax.plot(cycles, [r.discharge_ah * 1e3 for r in rows], "o-", label="discharge")
    ax.plot(cycles, [r.charge_ah * 1e3 for r in rows], "s--", label="charge")
    ax.set_xlabel("Cycle")
    ax.set_ylabel("Capacity / mAh")
    ax.grid(alpha=0.3)
    ce = ax.twinx()
    ce.plot(cycles, [(r.coulombic_efficiency or float("nan")) * 100 for r in rows], "^:", color="tab:green",
            label="CE")
    ce.set_ylabel("Coulombic efficiency / %")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _dqdv(plt: Any, curves: dict[int, list[tuple[float, float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for c, curve in curves.items():
        ax.plot([v for v, _ in curve], [d * 1e3 for _, d in curve], label=f"cycle {c}")
    ax.legend()
    ax.set_xlabel("Voltage / V")
    ax.set_ylabel("dQ/dV (discharge) / mAh/V")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _nyquist(plt: Any, spectra: dict[int, list[tuple[float, float, float]]], fits: list[dict[str, Any]],
             path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 6), dpi=DPI)
    fitted = {f["step_count"]: f for f in fits}
    for step, points in spectra.items():
        (line,) = ax.plot([p[1] for p in points], [-p[2] for p in points], "o", ms=3, label=f"step {step}")
        if step in fitted:
            _plot_fit(ax, [p[0] for p in points], fitted[step], line.get_color())
    ax.set_xlabel("Z' / ohm")
    ax.set_ylabel("-Z'' / ohm")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_fit(ax: Any, frequency: list[float], fit: dict[str, Any], color: str) -> None:
    import numpy as np
    from impedance.models.circuits import CustomCircuit

    p = fit["parameters"]
    circuit = CustomCircuit(fit["circuit"], initial_guess=[p[k] for k in p])
    circuit.parameters_ = np.array([p[k] for k in p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = circuit.predict(np.asarray(frequency), use_initial=True)
    ax.plot(z.real, -z.imag, "-", lw=1, color=color)


def _identity(meta: dict[str, Any]) -> str:
    """Cell ID, batch, active mass and area, operator and comment, where the run records them."""
    cell = meta.get("cell") or {}
    mass = cell.get("active_mass_g")
    parts = [("Cell", meta.get("cell_id")), ("batch", cell.get("batch")),
             ("active mass", None if mass is None else f"{mass * 1e3:.4g} mg"),
             ("area", None if cell.get("area") is None else f"{cell['area']:.4g} cm²"),
             ("operator", meta.get("operator")), ("comment", meta.get("comment"))]
    shown = [f"{name} {html.escape(str(value))}" for name, value in parts if value not in (None, "")]
    return f"<p>{', '.join(shown)}.</p>" if shown else ""


def _page(meta: dict[str, Any], rows: list[CycleSummary], images: list[Path], samples: list[Any]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    table = "".join(
        f"<tr><td>{r.cycle}</td><td>{r.charge_ah * 1e3:.4f}</td><td>{r.discharge_ah * 1e3:.4f}</td>"
        f"<td>{cell(r.coulombic_efficiency and r.coulombic_efficiency * 100, '.2f')}</td>"
        f"<td>{cell(r.mean_charge_voltage, '.3f')}</td><td>{cell(r.mean_discharge_voltage, '.3f')}</td>"
        f"<td>{cell(r.retention and r.retention * 100, '.1f')}</td><td>{cell(r.energy_density_wh_l, '.1f')}</td>"
        f"<td>{cell(r.stack_energy_density_wh_l, '.1f')}</td><td>{cell(r.specific_capacity_mah_g, '.1f')}</td>"
        f"<td>{cell(r.areal_capacity_mah_cm2, '.3f')}</td></tr>"
        for r in rows
    )
    retention, cycles = _retention(rows)
    life = cycle_life(retention, cycles=cycles)
    pulses = dcir(samples)
    dcir_line = (f"<p>DCIR at 10 ms over {len(pulses)} current steps: median "
                 f"{sorted(p.resistance_10ms for p in pulses)[len(pulses) // 2]:.3g} ohm</p>") if pulses else ""
    figures = "".join(f'<figure><img src="{img.name}" alt="{img.stem}"></figure>' for img in images)
    title = html.escape(str(meta.get("profile_name", "run")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>{title}</h1>
<p>Run {html.escape(str(meta.get("run_id", "")))}, channel {html.escape(str(meta.get("channel", "")))},
{len(samples)} samples, {samples[-1].test_time / 3600 if samples else 0:.2f} h of test time.</p>
{_identity(meta)}
<p>Cycle life to 80 % retention: {"not reached" if life is None else f"{life:.1f} cycles"}</p>
{dcir_line}
<table><tr><th>cycle</th><th>charge / mAh</th><th>discharge / mAh</th><th>CE / %</th>
<th>mean charge V</th><th>mean discharge V</th><th>retention / %</th><th>Wh/L</th>
<th>Wh/L (stack under pressure)</th><th>mAh/g</th><th>mAh/cm²</th></tr>{table}</table>
{figures}
</body></html>
"""


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
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out, lives
