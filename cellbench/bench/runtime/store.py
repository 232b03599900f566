"""The run store: one SQLite file per run (WAL), columns labelled as the Battery Data Format labels them.

Writes never happen on the control loop. Samples are buffered and handed over as a batch once the
batch is a flush interval old (on the run's clock) or full; steps, events and run states are handed
over in order with them; on a real bench each sample brings the run state that accounts for it, and the
latest goes in the same batch. One of the process's WRITER_THREADS (shared by every run) commits what a
run has handed over in one transaction (at most one commit per COMMIT_GAP of wall time, several batches
at once). After a process crash every sample older than the last batch is on disk, less what the writer
had not yet reached (at most COMMIT_GAP). A failed write (a full disk) is kept as `failure` and reported
through `on_failure`; nothing more is written after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import operator
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cellbench.bench.runtime.events import (
    Note,
    RunEvent,
    Sample,
    SampleTaken,
    SpectrumFitted,
    SpectrumMeasured,
    StateSaved,
    StepEnded,
    StepStarted,
)
from cellbench.bench.runtime.runstate import RunState

log = logging.getLogger(__name__)

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


assert list(Sample._fields) == [c[0] for c in COLUMNS]

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
CREATE TABLE IF NOT EXISTS run_state (id INTEGER PRIMARY KEY CHECK (id = 1), test_time REAL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS eis_fits (
    step_count INTEGER PRIMARY KEY, test_time REAL, circuit TEXT, r_ohmic REAL, r_interfacial REAL,
    parameters TEXT, rel_rmse REAL
);
"""


_Op = tuple[str, list[tuple[Any, ...]]]  # SQL and the parameters of each row it writes
_sql = operator.itemgetter(0)
_SAVE_STATE = "INSERT OR REPLACE INTO run_state VALUES (1, ?, ?)"
_INSERT_SAMPLE = f"INSERT INTO samples VALUES ({', '.join('?' * len(COLUMNS))})"


class _Barrier:
    def __init__(self) -> None:
        self.done = threading.Event()


COMMIT_GAP = 0.25  # s of wall time at least between two commits of a run: a fast simulated run writes in real batches
LOCKED_GRACE = 60.0  # s a run's database may stay write-locked by another process before its writing fails
BUSY_WAIT = 0.2  # s a commit waits on another process's write lock before it tries again at a later commit
WRITER_THREADS = 4  # writer threads in a process, whatever the number of runs (a thread per run of a 1,000-channel
# controller made the control loop wait its turn for the GIL behind hundreds of them at every sampling instant)


class _Sink:
    """One run's database as its writer thread sees it: what it has been handed and not yet committed."""

    def __init__(self, path: Path, durable: bool, pragmas: tuple[str, ...],
                 on_failure: Callable[[BaseException], None] | None) -> None:
        self.path, self.durable, self.pragmas, self.on_failure = path, durable, pragmas, on_failure
        self.db: sqlite3.Connection | None = None
        self.opened = False
        self.failure: BaseException | None = None
        self.commits = 0
        self.last_commit = 0.0
        self.ops: list[_Op] = []  # handed over, waiting for the commit gap
        self.waiting: list[_Barrier] = []  # flushes waiting for what was handed over before them
        self.stop: threading.Event | None = None  # set once closed
        self.locked_since: float | None = None  # monotonic time another process's write lock first held us up

    @property
    def held(self) -> bool:
        """Rows wait for another process's write lock to go (within LOCKED_GRACE): tried again, not given up."""
        return bool(self.ops) and self.locked_since is not None and self.failure is None

    def due(self, now: float) -> float:
        """When this sink's pending work should be committed (now or later)."""
        if self.held:  # the next try, a moment on; the writer serves its other runs meanwhile
            return self.last_commit + BUSY_WAIT
        if self.waiting or self.stop is not None:
            return now
        return self.last_commit + COMMIT_GAP if self.ops else math.inf

    def commit(self) -> None:
        """Commit what is pending; unless its rows are held by another process's lock (tried again later), release
        the flushes waiting and a close, whatever happened."""
        try:
            if not self.opened:
                self.opened = True
                self.db = _connect(self.path, self.durable)
                for pragma in self.pragmas:
                    self.db.execute(f"PRAGMA {pragma}")
            ops, self.ops = self.ops, []
            if ops and self.db is not None and self.failure is None:
                self._commit(self.db, ops)
        except Exception as exc:  # (sqlite3.Error or worse): the run's writing has failed, and says so once
            if self.failure is None:
                self._failed(exc)
        finally:
            if not self.held:  # held: a flush or a close waits until the rows are written, or the grace is over
                self._release()

    def _release(self) -> None:
        for barrier in self.waiting:
            barrier.done.set()
        self.waiting.clear()
        if self.stop is not None:
            if self.db is not None:
                self.db.close()
                self.db = None
            self.stop.set()

    def _commit(self, db: sqlite3.Connection, ops: list[_Op]) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
            # one executemany per run of the same statement across batches; sqlite3 binds a plain tuple 1.5x
            # faster than a Sample
            for sql, group in itertools.groupby(ops, key=_sql):
                db.executemany(sql, map(tuple, itertools.chain.from_iterable(rows for _, rows in group)))
            db.execute("COMMIT")
            self.commits += 1
            self.last_commit = time.monotonic()
            if self.locked_since is not None:
                log.warning("%s: written again after %.1f s locked by another process", self.path,
                            time.monotonic() - self.locked_since)
                self.locked_since = None
        except sqlite3.OperationalError as exc:
            if db.in_transaction:
                db.rollback()
            if not _locked(exc):
                self._failed(exc)
                return
            # another process holds the database's write lock (a viewer in a transaction, a stray script): the
            # rows wait in memory and are tried again at the next commit; only this run is concerned
            now = time.monotonic()
            if self.locked_since is None:
                self.locked_since = now
                log.warning("%s: locked by another process; the run's rows wait (up to %g s)", self.path,
                            LOCKED_GRACE)
            if now - self.locked_since >= LOCKED_GRACE:
                self._failed(exc)
                return
            self.ops[:0] = ops
            self.last_commit = now
        except Exception as exc:  # anything else that could not be written
            if db.in_transaction:
                db.rollback()
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        log.error("%s: writing the run failed: %s", self.path, exc)
        if self.on_failure is not None:
            self.on_failure(exc)


class _Writer(threading.Thread):
    """A writer thread: commits what the runs it serves hand it, each run in order and in as few transactions as
    its commit gap allows; a flush or a close does not wait for the gap."""

    def __init__(self, number: int) -> None:
        super().__init__(name=f"store-writer-{number}", daemon=True)
        self.queue: queue.SimpleQueue[tuple[_Sink, Any]] = queue.SimpleQueue()
        self.sinks = 0  # runs it serves (for sharing the work out)

    def run(self) -> None:
        pending: set[_Sink] = set()
        while True:
            now = time.monotonic()
            wait = min((sink.due(now) for sink in pending), default=math.inf) - now
            got: list[tuple[_Sink, Any]] = []
            try:
                got.append(self.queue.get() if wait == math.inf else self.queue.get(timeout=max(wait, 0.0)))
                while True:  # and everything else already handed over
                    got.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            for sink, item in got:
                if isinstance(item, list):
                    sink.ops.extend(item)
                elif isinstance(item, _Barrier):
                    sink.waiting.append(item)
                else:
                    sink.stop = item
                pending.add(sink)
            now = time.monotonic()
            for sink in [s for s in pending if s.due(now) <= now]:
                try:
                    sink.commit()
                except Exception:  # a writer thread must outlive one run's trouble (an on_failure that raised)
                    log.exception("%s: the writer failed", sink.path)
                if not sink.held:  # rows held by another process's lock stay pending: tried again at due()
                    pending.discard(sink)


class _Writers:
    """The process's writer threads, started as runs need them; each run is served by the least busy."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads: list[_Writer] = []

    def take(self) -> _Writer:
        with self.lock:
            if len(self.threads) < WRITER_THREADS:
                self.threads.append(_Writer(len(self.threads)))
                self.threads[-1].start()
            writer = min(self.threads, key=lambda w: w.sinks)
            writer.sinks += 1
            return writer

    def give_back(self, writer: _Writer) -> None:
        with self.lock:
            writer.sinks -= 1


_writers = _Writers()


CACHE_KIB = 256  # page cache per connection: a run appends, so a few pages at the tables' ends are all it uses


def _locked(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the write lock (SQLITE_BUSY, SQLITE_LOCKED): a wait, not a failure of the disk."""
    return "locked" in str(exc) or "busy" in str(exc)


def shared_failure(exc: BaseException) -> bool:
    """Whether a failed write is the disk's (full, read-only, I/O error), which every run on it meets, rather than
    one database's own (locked too long, damaged)."""
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
    text = str(exc).lower()
    return any(word in text for word in ("disk is full", "disk i/o", "readonly", "read-only", "no space"))


def _connect(path: Path, durable: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_WAIT)
    # SQLite's default (2 MiB a connection) filled over weeks: a long campaign's memory grew with it
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    db.execute("PRAGMA journal_mode=WAL")
    # FULL survives power loss; NORMAL (used for simulated runs) survives a process crash.
    db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    return db


class RunStore:
    """Writes one run (through its writer thread); reads it back for analysis and reports."""

    def __init__(
        self, path: str | Path, *, durable: bool = True, flush_interval: float = 1.0, max_batch: int = 2000,
        on_failure: Callable[[BaseException], None] | None = None, pragmas: tuple[str, ...] = (),
    ) -> None:
        """`pragmas` go to the writer's connection (e.g. `max_page_count=...` to cap a run's size)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path, durable)
        self._db.executescript(_SCHEMA)
        self._sink = _Sink(self.path, durable, pragmas, on_failure)
        self._writer: _Writer | None = None  # the writer thread serving this run, from its first hand-over
        self._buffer: list[_Op] = []
        self._rows: list[tuple[Any, ...]] = []  # samples since the last other op: written with one executemany
        self._state: tuple[float, str] | None = None  # the run state the last of those samples came with
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._batch_start: float | None = None
        # a durable run hands a batch over when it is a flush interval old by the wall clock too, not only at the
        # next sample: with a 60 s sample period a step's first sample once waited 60 s in memory (lost to a kill)
        self._aging = durable
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # --- writing (never blocks: the writer thread commits) ---------------------------------
    @property
    def failure(self) -> BaseException | None:
        """Why writing failed, if it did."""
        return self._sink.failure

    @property
    def commits(self) -> int:
        """Transactions committed by the writer so far."""
        return self._sink.commits

    def record(self, event: RunEvent) -> None:
        """Subscriber of the run's event stream: each event to its table."""
        if isinstance(event, SampleTaken):
            if event.state_json is not None:  # goes with the sample, in the same transaction
                self._state = (event.sample.test_time, event.state_json)
            self.add(event.sample, event.sample.test_time)
        elif isinstance(event, StepStarted):
            self.step_started(event.step_count, event.step_index, event.step_type, event.path, event.cycle,
                              event.test_time)
        elif isinstance(event, StepEnded):
            self.step_ended(event.step_count, event.test_time, event.reason)
        elif isinstance(event, Note):
            self.event(event.kind, event.message, event.test_time, event.unix_time)
        elif isinstance(event, SpectrumMeasured):
            self.add_spectrum(event.step_count, event.test_time, event.points)
        elif isinstance(event, SpectrumFitted):
            self.add_fit(event.step_count, event.test_time, event.circuit, event.r_ohmic, event.r_interfacial,
                         event.parameters, event.rel_rmse)
        elif isinstance(event, StateSaved):
            self._now(_SAVE_STATE, [(event.test_time, event.state_json)])

    def set_metadata(self, **values: Any) -> None:
        self._now("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    def add(self, sample: Sample, now: float) -> None:
        """Buffer a sample; hand the batch over when it is flush_interval old (run time) or full."""
        rows = self._rows
        rows.append(sample)  # a Sample is its row
        if self._batch_start is None:
            self._batch_start = now
            if self._aging:
                self._arm()
        if now - self._batch_start >= self._flush_interval or len(rows) >= self._max_batch:
            self._hand_over()

    def _arm(self) -> None:
        """On the run's loop: hand the batch over a flush interval from now, whenever the next sample comes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # written outside a loop (a tool, a test): the next sample or a flush hands it over
            return
        self._timer = loop.call_later(self._flush_interval, self._aged)

    def _aged(self) -> None:
        self._timer = None
        if self._batch_start is not None and not self._closing:
            self._hand_over()

    def step_started(
        self, step_count: int, step_index: int, step_type: str, path: str, cycle: int, start_time: float
    ) -> None:
        self._now("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                  [(step_count, step_index, str(step_type), path, cycle, start_time)])

    def step_ended(self, step_count: int, end_time: float, reason: str) -> None:
        self._now("UPDATE steps SET end_time = ?, end_reason = ? WHERE step_count = ?",
                  [(end_time, reason, step_count)])

    def event(self, kind: str, message: str, test_time: float, unix_time: float) -> None:
        self._now("INSERT INTO events VALUES (?, ?, ?, ?)", [(test_time, unix_time, str(kind), message)])

    def add_spectrum(self, step_count: int, test_time: float, points: list[tuple[float, float, float]]) -> None:
        """One impedance spectrum: (frequency, Z', Z'') points."""
        self._now("INSERT INTO eis VALUES (?, ?, ?, ?, ?)", [(step_count, test_time, *p) for p in points])

    def add_fit(self, step_count: int, test_time: float, circuit: str, r_ohmic: float, r_interfacial: float,
                parameters: dict[str, float], rel_rmse: float) -> None:
        self._now("INSERT OR REPLACE INTO eis_fits VALUES (?, ?, ?, ?, ?, ?, ?)",
                  [(step_count, test_time, circuit, r_ohmic, r_interfacial, json.dumps(parameters), rel_rmse)])

    def flush(self, now: float | None = None) -> None:
        """Hand over what is buffered and wait until the writer has committed it (never on the control loop)."""
        self._hand_over()
        if self._writer is not None:
            barrier = _Barrier()
            self._writer.queue.put((self._sink, barrier))
            barrier.done.wait()

    def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._writer is not None:
            closed = threading.Event()
            self._writer.queue.put((self._sink, closed))
            closed.wait()
            _writers.give_back(self._writer)
            self._writer = None
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Rows that go out with the samples before them, without waiting for the batch to age."""
        self._close_rows()
        self._buffer.append((sql, rows))
        self._hand_over()

    def _close_rows(self) -> None:
        if self._rows:
            self._buffer.append((_INSERT_SAMPLE, self._rows))
            self._rows = []
        if self._state is not None:  # only the latest matters: one row, replaced
            self._buffer.append((_SAVE_STATE, [self._state]))
            self._state = None

    def _hand_over(self) -> None:
        self._batch_start = None
        if self._timer is not None and not self._closing:
            self._timer.cancel()
            self._timer = None
        self._close_rows()
        if not self._buffer:
            return
        if self._writer is None:
            self._writer = _writers.take()
        batch, self._buffer = self._buffer, []
        self._writer.queue.put((self._sink, batch))

    # --- reading ---------------------------------------------------------------------------
    def _sync(self) -> None:
        if self._writer is not None or self._buffer or self._rows or self._state:
            self.flush()

    def state(self) -> RunState | None:
        """The run's last saved state, if any."""
        self._sync()
        row = self._db.execute("SELECT state FROM run_state WHERE id = 1").fetchone()
        return None if row is None else RunState.model_validate_json(row[0])

    def metadata(self) -> dict[str, Any]:
        self._sync()
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def samples(self) -> list[Sample]:
        return list(self.iter_samples())

    def iter_samples(self) -> Iterator[Sample]:
        self._sync()
        for row in self._db.execute('SELECT * FROM samples ORDER BY "Test Time / s"'):
            yield Sample(*row)

    def steps(self) -> list[dict[str, Any]]:
        self._sync()
        cur = self._db.execute("SELECT * FROM steps ORDER BY step_count")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def spectra(self) -> dict[int, list[tuple[float, float, float]]]:
        """Impedance spectra by step count: (frequency, Z', Z'') points."""
        self._sync()
        out: dict[int, list[tuple[float, float, float]]] = {}
        for step, _, f, zr, zi in self._db.execute('SELECT * FROM eis ORDER BY rowid'):
            out.setdefault(step, []).append((f, zr, zi))
        return out

    def fits(self) -> list[dict[str, Any]]:
        self._sync()
        cur = self._db.execute("SELECT * FROM eis_fits ORDER BY step_count")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) | {"parameters": json.loads(row[5])} for row in cur]

    def events(self) -> list[dict[str, Any]]:
        self._sync()
        cur = self._db.execute("SELECT * FROM events ORDER BY test_time")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]


class NotARun(ValueError):
    """A file that is not a cellbench run database (a profile, a foreign database, garbage)."""


def check_run(path: str | Path) -> Path:
    """The path of an existing run database, or FileNotFoundError / NotARun in one line. Read-only: a file
    that is not a run is never written to."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no run database at {p}")
    try:
        con = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise NotARun(f"{p}: not a cellbench run database ({exc})") from None
    if not {"meta", "samples", "steps", "events"} <= tables:
        raise NotARun(f"{p}: not a cellbench run database (an SQLite file without a run's tables)")
    return p


def open_run(path: str | Path) -> RunStore:
    """Open an existing run's database for reading."""
    return RunStore(check_run(path))
