"""The run store against the floor: rows per second through RunStore (event loop side and writer thread)
and through a raw `BEGIN; executemany; COMMIT` on the same schema, in one run, with their ratio.

Also the time the control loop spends per sample handing rows over (what a run pays on its own loop),
and how many commits the writer made. Both durabilities: synchronous=NORMAL (simulated runs) and FULL.

Then what a real bench does, which the bulk figure does not show: one sample a second with the run state that
accounts for it, committed with synchronous=FULL once a flush interval, each commit waited for (its fsync is the
cost), against raw SQLite doing the same (`BEGIN; INSERT sample; INSERT OR REPLACE state; COMMIT`): the time per
commit, and how many such channels one writer thread commits each second.
Run: .venv/bin/python benchmarks/store_writer.py [rows]
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

from cellbench.bench.runtime.events import SampleTaken
from cellbench.bench.runtime.store import _INSERT_SAMPLE, _SAVE_STATE, _SCHEMA, COLUMNS, RunStore, Sample

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


CADENCE = 300  # commits of the bench-cadence case
STATE = '{"version": 1, "pc": 3, "cycle": 12, "counters": {"2": 11}, "step_count": 40}' * 4  # a run state's size


def bench_cadence(path: Path, rows: list[Sample]) -> float:
    """Seconds per commit of one sample and its state through RunStore, FULL, each commit waited for."""
    store = RunStore(path, durable=True)
    t0 = time.perf_counter()
    for s in rows:
        store.record(SampleTaken(s, STATE))
        store.flush()  # a flush interval's batch (one sample at 1 Hz), committed
    took = time.perf_counter() - t0
    store.close()
    return took / len(rows)


def raw_cadence(path: Path, rows: list[Sample]) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    t0 = time.perf_counter()
    for s in rows:
        db.execute("BEGIN")
        db.execute(_INSERT_SAMPLE, tuple(s))
        db.execute(_SAVE_STATE, (s.test_time, STATE))
        db.execute("COMMIT")
    took = time.perf_counter() - t0
    db.close()
    return took / len(rows)


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
    few = rows[:CADENCE]
    best_bench, best_raw = float("inf"), float("inf")
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            best_bench = min(best_bench, bench_cadence(Path(tmp) / "bench.sqlite", few))
            best_raw = min(best_raw, raw_cadence(Path(tmp) / "raw.sqlite", few))
    print(f"a bench's cadence (1 sample + its state per commit, FULL, {CADENCE} commits, best of 3): RunStore "
          f"{best_bench * 1e3:.2f} ms/commit ({1 / best_bench:.0f} channels a second per writer thread)   raw "
          f"{best_raw * 1e3:.2f} ms/commit ({1 / best_raw:.0f})   ratio {best_raw / best_bench:.2f}")


if __name__ == "__main__":
    main()
