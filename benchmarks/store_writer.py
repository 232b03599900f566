"""The run store against the floor: rows per second through RunStore (event loop side and writer thread)
and through a raw `BEGIN; executemany; COMMIT` on the same schema, in one run, with their ratio.

Also the time the control loop spends per sample handing rows over (what a run pays on its own loop),
and how many commits the writer made. Both durabilities: synchronous=NORMAL (simulated runs) and FULL.
Run: .venv/bin/python benchmarks/store_writer.py [rows]
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

from cellbench.bench.store import _SCHEMA, COLUMNS, RunStore, Sample

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000


def samples(n: int) -> list[Sample]:
    return [Sample(float(i), 1.7e9 + i, 3.7, 1e-3, 1, 1, 1, "CC Charge", i * 1e-9, 0.0, i * 3.7e-9, 0.0)
            for i in range(n)]


def ours(path: Path, rows: list[Sample], durable: bool) -> tuple[float, float, int]:
    """(wall seconds to committed, loop seconds spent in add(), commits)."""
    t0 = time.perf_counter()
    store = RunStore(path, durable=durable)
    loop_time = 0.0
    for s in rows:
        a = time.perf_counter()
        store.add(s, s.test_time / 100)  # 100 samples per second of run time: a batch per 100 rows
        loop_time += time.perf_counter() - a
    store.flush()
    commits = store.commits
    store.close()
    return time.perf_counter() - t0, loop_time, commits


def floor(path: Path, rows: list[Sample], durable: bool) -> float:
    tuples = [tuple(s) for s in rows]  # plain tuples made before the clock starts: the floor is SQLite alone
    t0 = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    db.executescript(_SCHEMA)
    db.execute("BEGIN")
    db.executemany(f"INSERT INTO samples VALUES ({', '.join('?' * len(COLUMNS))})", tuples)
    db.execute("COMMIT")
    db.close()
    return time.perf_counter() - t0


def main() -> None:
    rows = samples(ROWS)
    print(f"{ROWS} rows, 3 interleaved repeats, best of each")
    for durable in (False, True):
        best_ours, best_loop, best_floor, commits = float("inf"), float("inf"), float("inf"), 0
        for _ in range(3):
            with tempfile.TemporaryDirectory() as tmp:
                wall, loop, commits = ours(Path(tmp) / "ours.sqlite", rows, durable)
                best_ours, best_loop = min(best_ours, wall), min(best_loop, loop)
                best_floor = min(best_floor, floor(Path(tmp) / "floor.sqlite", rows, durable))
        label = "FULL  " if durable else "NORMAL"
        print(f"synchronous={label}  RunStore {ROWS / best_ours:10.0f} rows/s ({commits} commits)   "
              f"raw batched {ROWS / best_floor:10.0f} rows/s   ratio {best_floor / best_ours:.2f}   "
              f"loop cost {best_loop / ROWS * 1e6:.2f} us/sample")


if __name__ == "__main__":
    main()
