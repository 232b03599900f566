"""The run store: Battery Data Format columns, WAL, batched commits that survive a crash."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cellbench.bench.runtime.events import Sample
from cellbench.bench.runtime.store import COLUMNS, RunStore, open_run


def sample(t: float, cycle: int = 1) -> Sample:
    return Sample(t, 1.7e9 + t, 3.7, 1e-3, cycle, 1, 1, "CC Charge", 0.0, 0.0, 0.0, 0.0)


def test_columns_carry_battery_data_format_labels(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.sqlite") as store:
        store.add(sample(0.0), 0.0)
    db = sqlite3.connect(tmp_path / "run.sqlite")
    names = [row[1] for row in db.execute("PRAGMA table_info(samples)")]
    assert names[:4] == ["Test Time / s", "Unix Time / s", "Voltage / V", "Current / A"]
    assert "Charging Capacity / Ah" in names and "Discharging Energy / Wh" in names
    assert names == [label for _, label, _ in COLUMNS]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_samples_metadata_steps_and_events_read_back(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.sqlite", durable=False) as store:
        store.set_metadata(cell={"capacity": 3.5e-3}, profile_text="name: x")
        store.step_started(1, 1, "CC Charge", "0", 1, 0.0)
        for i in range(5):
            store.add(sample(float(i)), float(i))
        store.step_ended(1, 4.0, "time 4 s")
        store.event("end", "completed", 4.0, 1.7e9 + 4)
    with open_run(tmp_path / "run.sqlite") as store:
        assert [s.test_time for s in store.samples()] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert store.metadata()["cell"] == {"capacity": 3.5e-3}
        assert store.steps()[0]["end_reason"] == "time 4 s"
        assert store.events()[0]["message"] == "completed"


def test_a_crash_loses_at_most_the_batch_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    script = textwrap.dedent(
        f"""
        import os, sqlite3, time
        from cellbench.bench.runtime.events import Sample
        from cellbench.bench.runtime.store import RunStore
        store = RunStore({str(path)!r}, flush_interval=1.0)
        for i in range(10):
            t = i * 0.5
            store.add(Sample(t, t, 3.7, 0.001, 1, 1, 1, "Rest", 0, 0, 0, 0), t)
        # the writer thread commits what was handed over: seen from another connection before the death
        reader, deadline = sqlite3.connect({str(path)!r}), time.monotonic() + 30
        while reader.execute("SELECT COUNT(*) FROM samples").fetchone()[0] < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(3)  # the process dies: no close, no final flush
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    with open_run(path) as store:
        times = [s.test_time for s in store.samples()]
    # batches were handed over at t = 1, 2, 3, 4 and committed; the sample at 4.5 was still in the buffer
    assert times == [i * 0.5 for i in range(9)]


def test_writes_go_out_in_batches_not_one_commit_per_sample(tmp_path: Path) -> None:
    with RunStore(tmp_path / "run.sqlite", durable=False, flush_interval=10.0) as store:
        for i in range(100):
            store.add(sample(float(i)), float(i))
        store.flush()
        assert store.commits <= 10  # one hand-over per 10 s of run time, fewer when the writer merges them
        assert len(store.samples()) == 100


def test_a_full_disk_is_reported_not_swallowed(tmp_path: Path) -> None:
    seen: list[BaseException] = []
    # a database capped at a few pages fills up like a full disk (SQLITE_FULL)
    with RunStore(tmp_path / "run.sqlite", durable=False, on_failure=seen.append,
                  pragmas=("max_page_count=8",)) as store:
        for i in range(5000):
            store.add(sample(float(i)), float(i))
        store.flush()
        assert store.failure is not None and "full" in str(store.failure)
        assert seen == [store.failure]


def test_many_runs_share_a_few_writer_threads(tmp_path: Path) -> None:
    import threading

    from cellbench.bench.runtime import store as store_module
    before = {t.name for t in threading.enumerate()}
    stores = [RunStore(tmp_path / f"run{k}.sqlite", durable=False) for k in range(40)]
    for t in range(3):
        for k, st in enumerate(stores):
            st.add(sample(float(t), cycle=k + 1), float(t) * 2)  # every add is a flush interval on: handed over
    writers = {t.name for t in threading.enumerate() if t.name.startswith("store-writer")}
    assert len(writers - before) <= store_module.WRITER_THREADS and len(writers) <= store_module.WRITER_THREADS
    for st in stores:
        st.close()
    for k in range(40):  # each run's rows in its own file, in order
        with open_run(tmp_path / f"run{k}.sqlite") as back:
            assert [(s.test_time, s.cycle) for s in back.samples()] == [(0.0, k + 1), (1.0, k + 1), (2.0, k + 1)]


def test_a_sample_and_the_state_it_came_with_go_to_disk_together(tmp_path: Path) -> None:
    from cellbench.bench.runtime.events import SampleTaken
    from cellbench.bench.runtime.runstate import RunState

    def state(t: float) -> str:
        return RunState(test_time=t, cycle=7).model_dump_json()

    with RunStore(tmp_path / "run.sqlite", durable=False, flush_interval=10.0) as st:
        st.record(SampleTaken(sample(0.0), state(0.0)))
        st.record(SampleTaken(sample(5.0), state(5.0)))
        assert st.commits == 0  # nothing handed over yet: the batch is younger than its flush interval
        st.record(SampleTaken(sample(10.0), state(10.0)))  # the batch is due: the three samples and the last state
        st.flush()
        assert st.commits == 1
        saved = st.state()
        assert saved is not None and saved.test_time == 10.0 and saved.cycle == 7
        assert [s.test_time for s in st.samples()] == [0.0, 5.0, 10.0]


def test_a_batch_that_cannot_be_written_fails_the_run_and_never_hangs_its_close(tmp_path: Path) -> None:
    import threading

    failures: list[BaseException] = []
    store = RunStore(tmp_path / "run.sqlite", durable=False, on_failure=failures.append)
    store.add(sample(0.0), 0.0)
    store._now("INSERT INTO events VALUES (?, ?, ?, ?)", [42])  # type: ignore[list-item]  # not a row at all
    closing = threading.Thread(target=store.close)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive(), "close() hung after a failed write"
    assert len(failures) == 1 and isinstance(store.failure, TypeError)
    with open_run(tmp_path / "run.sqlite") as back:
        assert back.samples() == []  # the whole transaction rolled back: nothing half-written


def test_a_run_closed_under_another_processs_lock_waits_for_it_without_holding_up_the_writers_other_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs served by one writer thread; another connection holds run A's write lock. A's close waits for the
    lock to go and then writes every row (once, the writer slept in a loop for it, holding up every other run it
    served for up to a minute); run B, on the same thread, is flushed meanwhile."""
    import threading
    import time

    from cellbench.bench.runtime import store as store_module
    writer = store_module._Writer(99)
    writer.start()
    monkeypatch.setattr(store_module._writers, "take", lambda: writer)
    monkeypatch.setattr(store_module._writers, "give_back", lambda w: None)
    a, b = RunStore(tmp_path / "a.sqlite", durable=True), RunStore(tmp_path / "b.sqlite", durable=True)
    holder = sqlite3.connect(tmp_path / "a.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    for k in range(5):
        a.add(sample(k), float(k))
        b.add(sample(k), float(k))
    closing = threading.Thread(target=a.close)
    closing.start()
    time.sleep(0.5)
    assert closing.is_alive()  # waiting for the lock, within its grace
    t0 = time.monotonic()
    b.flush()
    assert time.monotonic() - t0 < 1.0  # the shared writer is not asleep on run A
    with sqlite3.connect(tmp_path / "b.sqlite") as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (5,)
    holder.execute("COMMIT")
    holder.close()
    closing.join(timeout=10)
    assert not closing.is_alive() and a.failure is None
    with sqlite3.connect(tmp_path / "a.sqlite") as con:
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (5,)
    b.close()
