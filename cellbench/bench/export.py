"""Export a run to the Battery Data Format: `.bdf.csv`, `.bdf.parquet` and a `.metadata.json` sidecar.

The tables carry the Battery Data Format's column labels (quantity / unit, current positive on
charge). Columns a run never filled (no chamber, no press) are left out; labels that are not in
the standard (displacement) are declared in the sidecar. Impedance spectra, when the run has
them, go to their own `.eis.bdf.csv`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from cellbench.bench.store import COLUMNS, check_run, open_run

NET = "Net Capacity / Ah"
NON_STANDARD = {
    "Displacement / um": "stack thickness change since the press was tared, micrometres",
    "Step Type": "what the step did: CC Charge, CC Discharge, CV, CCCV Charge, CP Discharge, Rest, Pulse, EIS, ...",
}
EIS_COLUMNS = ("Step Count / 1", "Test Time / s", "Frequency / Hz", "Real Impedance / ohm", "Imaginary Impedance / ohm")


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
    all_labels = [label for _, label, _ in COLUMNS] + [NET]
    labels = [label for label in all_labels if any(r[label] is not None for r in rows)] or all_labels[:4]
    files = {"csv": stem.with_suffix(".bdf.csv"), "parquet": stem.with_suffix(".bdf.parquet"),
             "metadata": stem.with_suffix(".metadata.json")}
    _write_csv(files["csv"], labels, rows)
    _write_parquet(files["parquet"], labels, rows)
    if spectra:
        files["eis"] = stem.with_suffix(".eis.bdf.csv")
        eis_rows = [dict(zip(EIS_COLUMNS, (step, None, *p), strict=True)) for step, pts in spectra.items() for p in pts]
        _write_csv(files["eis"], [c for c in EIS_COLUMNS if c != "Test Time / s"], eis_rows)
    sidecar = {
        "format": "Battery Data Format",
        "files": {k: p.name for k, p in files.items() if k != "metadata"},
        "columns": labels,
        "non_standard_columns": {k: v for k, v in NON_STANDARD.items() if k in labels},
        "current_sign": "positive on charge",
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
        "simulation": meta.get("simulation"),
        "impedance_fits": fits,
        "events": events,
    }
    files["metadata"].write_text(json.dumps(sidecar, indent=2, default=str))
    return files


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({label: [r[label] for r in rows] for label in labels})
    pq.write_table(table, path)
