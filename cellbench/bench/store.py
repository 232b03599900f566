"""The run store: one SQLite file per run (WAL), columns labelled as the Battery Data Format labels them.

One writer, batched transactions: samples are buffered and committed together once the batch is
a flush interval old (on the run's clock) or full; steps and events commit at once. After a
process crash every sample older than the last batch is on disk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

# (attribute, Battery Data Format label, SQL type), in column order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("test_time", "Test Time / s", "REAL"),
    ("unix_time", "Unix Time / s", "REAL"),
    ("voltage", "Voltage / V", "REAL"),
    ("current", "Current / A", "REAL"),
    ("cycle", "Cycle Count / 1", "INTEGER"),
    ("step_count", "Step Count / 1", "INTEGER"),
    ("step_index", "Step Index / 1", "INTEGER"),
    ("step_type", "Step Type", "TEXT"),
    ("charge_ah", "Charging Capacity / Ah", "REAL"),
    ("discharge_ah", "Discharging Capacity / Ah", "REAL"),
    ("charge_wh", "Charging Energy / Wh", "REAL"),
    ("discharge_wh", "Discharging Energy / Wh", "REAL"),
    ("ambient_c", "Ambient Temperature / degC", "REAL"),
    ("t1_c", "Surface Temperature T1 / degC", "REAL"),
    ("pressure_pa", "Applied Pressure / Pa", "REAL"),
    ("displacement_um", "Displacement / um", "REAL"),  # not a Battery Data Format label: declared on export
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One recorded row; capacities and energies accumulate within a cycle."""

    test_time: float
    unix_time: float
    voltage: float
    current: float
    cycle: int
    step_count: int
    step_index: int
    step_type: str
    charge_ah: float
    discharge_ah: float
    charge_wh: float
    discharge_wh: float
    ambient_c: float | None = None  # chamber air, when the channel has a chamber
    t1_c: float | None = None  # the cell (the press's platen thermocouple), when it has a press
    pressure_pa: float | None = None
    displacement_um: float | None = None


assert [f.name for f in fields(Sample)] == [c[0] for c in COLUMNS]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples ({", ".join(f'"{label}" {sql}' for _, label, sql in COLUMNS)});
CREATE TABLE IF NOT EXISTS steps (
    step_count INTEGER PRIMARY KEY, step_index INTEGER, step_type TEXT, path TEXT, cycle INTEGER,
    start_time REAL, end_time REAL, end_reason TEXT
);
CREATE TABLE IF NOT EXISTS events (test_time REAL, unix_time REAL, kind TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS eis (
    "Step Count / 1" INTEGER, "Test Time / s" REAL, "Frequency / Hz" REAL,
    "Real Impedance / ohm" REAL, "Imaginary Impedance / ohm" REAL
);
CREATE TABLE IF NOT EXISTS eis_fits (
    step_count INTEGER PRIMARY KEY, test_time REAL, circuit TEXT, r_ohmic REAL, r_interfacial REAL,
    parameters TEXT, rel_rmse REAL
);
"""


class RunStore:
    """Writes one run; reads it back for analysis and reports."""

    def __init__(
        self, path: str | Path, *, durable: bool = True, flush_interval: float = 1.0, max_batch: int = 2000
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL survives power loss; NORMAL (used for simulated runs) survives a process crash.
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._buffer: list[Sample] = []
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._last_flush: float | None = None
        self._insert = f"INSERT INTO samples VALUES ({', '.join('?' * len(COLUMNS))})"

    # --- writing ---------------------------------------------------------------------------
    def set_metadata(self, **values: Any) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
            )

    def add(self, sample: Sample, now: float) -> None:
        """Buffer a sample; commit the batch when it is flush_interval old or full."""
        self._buffer.append(sample)
        if self._last_flush is None:
            self._last_flush = now
        if now - self._last_flush >= self._flush_interval or len(self._buffer) >= self._max_batch:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._buffer:
            with self._db:
                self._db.executemany(self._insert, [astuple(s) for s in self._buffer])
            self._buffer.clear()
        self._last_flush = now

    def step_started(
        self, step_count: int, step_index: int, step_type: str, path: str, cycle: int, start_time: float
    ) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                (step_count, step_index, step_type, path, cycle, start_time),
            )

    def step_ended(self, step_count: int, end_time: float, reason: str) -> None:
        self.flush(self._last_flush)
        with self._db:
            self._db.execute(
                "UPDATE steps SET end_time = ?, end_reason = ? WHERE step_count = ?", (end_time, reason, step_count)
            )

    def event(self, kind: str, message: str, test_time: float, unix_time: float) -> None:
        self.flush(self._last_flush)
        with self._db:
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (test_time, unix_time, kind, message))

    def add_spectrum(self, step_count: int, test_time: float, points: list[tuple[float, float, float]]) -> None:
        """One impedance spectrum: (frequency, Z', Z'') points."""
        with self._db:
            self._db.executemany(
                "INSERT INTO eis VALUES (?, ?, ?, ?, ?)", [(step_count, test_time, *p) for p in points]
            )

    def add_fit(self, step_count: int, test_time: float, circuit: str, r_ohmic: float, r_interfacial: float,
                parameters: dict[str, float], rel_rmse: float) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO eis_fits VALUES (?, ?, ?, ?, ?, ?, ?)",
                (step_count, test_time, circuit, r_ohmic, r_interfacial, json.dumps(parameters), rel_rmse),
            )

    def close(self) -> None:
        self.flush()
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def samples(self) -> list[Sample]:
        return list(self.iter_samples())

    def iter_samples(self) -> Iterator[Sample]:
        for row in self._db.execute('SELECT * FROM samples ORDER BY "Test Time / s"'):
            yield Sample(*row)

    def steps(self) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM steps ORDER BY step_count")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def spectra(self) -> dict[int, list[tuple[float, float, float]]]:
        """Impedance spectra by step count: (frequency, Z', Z'') points."""
        out: dict[int, list[tuple[float, float, float]]] = {}
        for step, _, f, zr, zi in self._db.execute('SELECT * FROM eis ORDER BY rowid'):
            out.setdefault(step, []).append((f, zr, zi))
        return out

    def fits(self) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM eis_fits ORDER BY step_count")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) | {"parameters": json.loads(row[5])} for row in cur]

    def events(self) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM events ORDER BY test_time")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]


def open_run(path: str | Path) -> RunStore:
    """Open an existing run's database for reading."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no run database at {p}")
    return RunStore(p)
