"""Export a run to the Battery Data Format: `.bdf.csv`, `.bdf.parquet`, each with its `.metadata.json` sidecar.

The tables carry the Battery Data Format's column labels (quantity / unit, current positive on
charge). Columns a run never filled (no chamber, no press) are left out; labels that are not in
the standard (displacement) are declared in the sidecar, which also says how capacities accumulate
(per cycle). Impedance spectra, when the run has them, go to their own `.eis.bdf.csv` (time, DC bias and
current, then the points). Each table's sidecar sits beside it as `<table>.metadata.json`, the BDF
tooling's layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from cellbench.bench.results.analysis import unix_time_problem
from cellbench.bench.runtime.extras import MissingExtra
from cellbench.bench.runtime.store import COLUMNS, check_run, open_run

NET = "Net Capacity / Ah"
DATA_POINT = "Data Point / 1"
NON_STANDARD = {
    DATA_POINT: "the row's number from 1, in time order (cellpy and other readers index rows by it)",
    "Displacement / um": "stack thickness change since the press was tared, micrometres",
    "Step Type": "what the step did: CC Charge, CC Discharge, CV, CCCV Charge, CP Discharge, Rest, Pulse, EIS, ...",
}
EIS_COLUMNS = ("Test Time / s", "Voltage / V", "Current / A", "Step Count / 1", "Frequency / Hz",
               "Real Impedance / ohm", "Imaginary Impedance / ohm")


def export_run(database: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the run's tables and sidecar next to it (or into out_dir); return the files by kind."""
    db = Path(database)
    out = Path(out_dir) if out_dir else db.parent
    check_run(db)  # before any folder is made for it
    out.mkdir(parents=True, exist_ok=True)
    stem = out / db.stem
    with open_run(db) as store:
        rows = _with_net_capacity([_row(s) for s in store.iter_samples()])
        meta = store.metadata()
        spectra = store.spectra()
        fits = store.fits()
        events = store.events()
    for number, r in enumerate(rows, 1):
        r[DATA_POINT] = number
    time_problem = unix_time_problem(r["Unix Time / s"] for r in rows)
    all_labels = [label for _, label, _ in COLUMNS] + [NET, DATA_POINT]
    labels = [label for label in all_labels if any(r[label] is not None for r in rows)] or all_labels[:4]
    files = {"csv": stem.with_suffix(".bdf.csv"), "parquet": stem.with_suffix(".bdf.parquet")}
    _write_csv(files["csv"], labels, rows)
    skipped = []
    try:
        _write_parquet(files["parquet"], labels, rows)
    except MissingExtra as exc:  # a controller without the analysis stack: the CSV is the export, said so
        del files["parquet"]
        skipped.append(str(exc))
    if spectra:
        files["eis"] = stem.with_suffix(".eis.bdf.csv")
        _write_csv(files["eis"], list(EIS_COLUMNS), _eis_rows(spectra, rows))
    tables = dict(files)
    # a cellpy instrument definition for the CSV, beside it: cellpy reads it without a loader of its own
    files["cellpy"] = stem.with_suffix(".cellpy.yml")
    files["cellpy"].write_bytes((Path(__file__).parent / "cellpy_instrument.yml").read_bytes())
    sidecar = {
        "format": "Battery Data Format",
        "files": {k: p.name for k, p in files.items() if k != "metadata"},
        "columns": labels,
        "non_standard_columns": {k: v for k, v in NON_STANDARD.items() if k in labels},
        "current_sign": "positive on charge",
        # cycle_mode='full_cell': a cathode | lithium cell charges first; cellpy's default ('anode') takes the
        # discharge for the charge and reports the coulombic efficiency upside down (115 % for 87 %)
        "readers": {"cellpy": f"cellpy.get('{files['csv'].name}', instrument='custom', "
                              f"instrument_file='{files['cellpy'].name}', cycle_mode='full_cell')"},
        "capacity_accumulation": {
            "Charging Capacity / Ah": "per cycle: restarts at 0 where each cycle starts (Cycle Count / 1)",
            "Discharging Capacity / Ah": "per cycle: restarts at 0 where each cycle starts (Cycle Count / 1)",
            "Charging Energy / Wh": "per cycle, like the capacities",
            "Discharging Energy / Wh": "per cycle, like the capacities",
            NET: "over the whole test: charge minus discharge since its start",
        },
        "eis_table": None if not spectra else (
            "one row per impedance point; Voltage / V is the spectrum's DC bias (the open-circuit voltage measured "
            "before it, or the profile's bias), Current / A its DC current (0: potentiostatic at the bias)"),
        "cell_id": meta.get("cell_id"),
        "cell": meta.get("cell"),
        "operator": meta.get("operator"),
        "comment": meta.get("comment"),
        "bench": meta.get("bench"),
        "instruments": meta.get("instruments"),
        "profile": {"name": meta.get("profile_name"), "text": meta.get("profile_text")},
        "cellbench_version": meta.get("cellbench_version"),
        "run_id": meta.get("run_id"),
        "channel": meta.get("channel"),
        "clock": meta.get("clock"),
        "unix_time_problem": time_problem,
        "skipped": skipped,
        "simulation": meta.get("simulation"),
        "impedance_fits": fits,
        "events": events,
    }
    # the Battery Data Format tooling's layout: each table's sidecar beside it, named after it
    text = json.dumps(sidecar, indent=2, default=str)
    for kind, table in tables.items():
        files["metadata" if kind == "csv" else f"{kind}-metadata"] = sidecar_path = table.with_name(
            table.name + ".metadata.json")
        sidecar_path.write_text(text)
    return files


def _eis_rows(spectra: dict[int, list[tuple[float, float, float]]], rows: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """The impedance points as a Battery Data Format table: time, the spectrum's DC bias and current, the point."""
    at = {r["Step Count / 1"]: r for r in rows}  # each EIS step's recorded sample: its time and bias
    out = []
    for step, points in spectra.items():
        sample = at.get(step, {})
        for f, zr, zi in points:
            out.append(dict(zip(EIS_COLUMNS, (sample.get("Test Time / s"), sample.get("Voltage / V"), 0.0, step, f,
                                             zr, zi), strict=True)))
    return out


def _with_net_capacity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Net charge passed since the start of the test (charge minus discharge), across cycles."""
    before, cycle, last = 0.0, None, 0.0
    for r in rows:
        if r["Cycle Count / 1"] != cycle:
            before, cycle = before + last, r["Cycle Count / 1"]
        last = r["Charging Capacity / Ah"] - r["Discharging Capacity / Ah"]
        r[NET] = before + last
    return rows


def _row(sample: Any) -> dict[str, Any]:
    return {label: getattr(sample, attr) for attr, label, _ in COLUMNS}


def _write_csv(path: Path, labels: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(labels)
        for r in rows:
            writer.writerow(["" if r[label] is None else r[label] for label in labels])


def _write_parquet(path: Path, labels: list[str], rows: list[dict[str, Any]]) -> None:
    from cellbench.bench.runtime.extras import need

    pa = need("pyarrow", "Parquet export")
    pq = need("pyarrow.parquet", "Parquet export")

    table = pa.table({label: [r[label] for r in rows] for label in labels})
    pq.write_table(table, path)
