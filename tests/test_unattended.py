"""Unattended runs as they end at 3 a.m.: signals, ownership of instruments, run files that never collide.

Each test runs `cellbench run` as its own process against `cellbench sim serve` in another process,
over the real wire, and asks the simulated 2450 itself whether its output is still on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_cli import serve

PROFILE = """
name: long charge
sample_period: 1 s
steps:
  - charge: {current: 1 mA, until: [4.2 V, 2 h]}
"""


def ask(resource: str, command: str) -> str:
    """One query to the served 2450 on a connection of its own (as a second client would)."""
    _, host, port, _ = resource.split("::")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def files(tmp_path: Path, resource: str, more: str = "", profile_text: str = PROFILE) -> tuple[Path, Path]:
    """A one-channel bench on the served 2450 (with `more` bench-file text) and a profile."""
    bench = tmp_path / "bench.yaml"
    bench.write_text(textwrap.dedent(f"""
        name: night
        instruments:
          smu1: {{driver: keithley2450, resource: "{resource}", timeout: 2 s}}
        cells:
          pellet: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
        channels:
          ch1: {{cycler: smu1, cell: pellet}}
    """) + textwrap.dedent(more))
    profile = tmp_path / "charge.yaml"
    profile.write_text(profile_text)
    return bench, profile


def run_env(tmp_path: Path) -> dict[str, str]:
    """A bare environment for a cellbench subprocess: its own lock folder and runs registry under tmp_path."""
    return {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "CELLBENCH_LOCK_DIR": str(tmp_path / "locks"),
            "CELLBENCH_STATE_DIR": str(tmp_path / "state"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def start_run(tmp_path: Path, bench: Path, profile: Path, runs: str = "runs") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cellbench", "run", str(profile), "--bench", str(bench),
         "--runs-dir", str(tmp_path / runs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=run_env(tmp_path),
    )


def stay(tmp_path: Path, bench: Path) -> subprocess.Popen[str]:
    """`cellbench run --bench BENCH --stay` in a process of its own, once its control socket is up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellbench", "run", "--bench", str(bench), "--stay", "--runs-dir",
         str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=run_env(tmp_path))
    deadline = time.monotonic() + 30
    while not list((tmp_path / "state" / "control").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc


def wait_until_sourcing(resource: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ask(resource, ":OUTP?") == "1":
            return
        time.sleep(0.1)
    raise AssertionError("the run never turned the output on")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_turns_the_output_off_and_records_why(served: str, tmp_path: Path, sig: signal.Signals,
                                                       code: int) -> None:
    bench, profile = files(tmp_path, served)
    proc = start_run(tmp_path, bench, profile)
    wait_until_sourcing(served)
    time.sleep(1.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    assert ask(served, ":OUTP?") == "0"
    (db,) = (tmp_path / "runs").glob("*.sqlite")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    events = con.execute("SELECT kind, message FROM events ORDER BY rowid").fetchall()
    assert events[0][0] == "start"
    assert ("interrupted", f"{sig.name} received") in events
    assert events[-1] == ("end", f"interrupted: {sig.name} received")
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] >= 2
    state = con.execute("SELECT state FROM run_state").fetchone()
    assert state is not None and '"finished":false' in state[0]
    assert "Traceback" not in out


def test_a_second_run_on_an_owned_instrument_is_refused(served: str, tmp_path: Path) -> None:
    bench, profile = files(tmp_path, served)
    first = start_run(tmp_path, bench, profile, "a")
    try:
        wait_until_sourcing(served)
        second = start_run(tmp_path, bench, profile, "b")
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1, out
        assert "in use by" in out and f"pid {first.pid}" in out, out
        assert ask(served, ":OUTP?") == "1"  # the first run was not disturbed
        assert not list((tmp_path / "b").glob("*.sqlite"))  # and the refused run left no file
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 143


def test_run_files_never_collide(tmp_path: Path) -> None:
    from cellbench.bench.runner.run import reserve

    paths = {reserve(tmp_path, "20260101T000000Z-x-ch1") for _ in range(5)}
    assert len(paths) == 5 and all(p.exists() for p in paths)


GUARDIAN_ACTS_WITHIN = 5.0  # s after the controller died: the guarantee stated in docs/unattended.md


def test_a_hard_death_at_twenty_random_moments_never_leaves_the_output_on(served: str, tmp_path: Path) -> None:
    import random

    rng = random.Random(20261125)
    bench, profile = files(tmp_path, served)
    worst, sourcing = 0.0, 0
    for attempt in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellbench", "run", str(profile), "--bench", str(bench),
             "--runs-dir", str(tmp_path / f"runs{attempt}")],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / f"stderr{attempt}.txt").open("w"),
            env=run_env(tmp_path),
        )
        time.sleep(rng.uniform(0.2, 4.0))  # before, while and after the output goes on
        sourcing += ask(served, ":OUTP?") == "1"
        proc.kill()
        proc.wait()
        died = time.monotonic()
        while ask(served, ":OUTP?") != "0":
            assert time.monotonic() - died < GUARDIAN_ACTS_WITHIN, (
                f"attempt {attempt}: the output stayed on\n" + (tmp_path / f"stderr{attempt}.txt").read_text()
                + subprocess.run(["bash", "-c", f"cat {tmp_path}/locks/*; lsof {tmp_path}/locks/*"],
                                 capture_output=True, text=True).stdout)
            time.sleep(0.05)
        worst = max(worst, time.monotonic() - died)
        # the next attempt may start only when the guardian has let go of the instrument (its lock: a controller
        # killed before it started a guardian leaves its text in the file, but the kernel released its flock)
        while not all(lock_free(p) for p in (tmp_path / "locks").glob("*.lock")):
            assert time.monotonic() - died < 15, "the guardian kept the instrument"
            time.sleep(0.05)
    assert sourcing >= 10  # most deaths came while current was flowing
    print(f"{sourcing} of 20 killed while sourcing; output off at most {worst:.2f} s after the controller died")


def lock_free(path: Path) -> bool:
    """Whether nobody holds an instrument's lock (its flock; the text in the file may be a dead holder's)."""
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


QUICK_CYCLES = """
name: quick cycles
sample_period: 0.25 s
steps:
  - repeat: 3
    steps:
      - charge: {current: 1 mA, until: [4.25 V, 4 s]}
      - rest: 1 s
      - discharge: {current: 1 mA, until: [2.6 V, 4 s]}
"""


def cellbench(*args: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cellbench", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=run_env(tmp_path),
    )


def per_cycle(db: Path) -> list[tuple[float, float]]:
    from cellbench.bench.results.analysis import cycle_table
    from cellbench.bench.runtime.store import open_run

    with open_run(db) as store:
        return [(r.charge_ah, r.discharge_ah) for r in cycle_table(store.iter_samples())]


def test_a_run_killed_three_times_and_resumed_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    profile = tmp_path / "quick.yaml"
    profile.write_text(QUICK_CYCLES)
    # the same cell twice: once uninterrupted, once killed with SIGKILL three times and resumed
    tables = []
    for label in ("whole", "cut"):
        sim, resource = serve("keithley2450", "--port", "0", "--soc", "0.3")
        try:
            (tmp_path / label).mkdir()
            bench, _ = files(tmp_path / label, resource)
            run = cellbench("run", str(profile), "--bench", str(bench), "--runs-dir", str(tmp_path / label / "runs"),
                            tmp_path=tmp_path)
            kept: set[tuple[float, float]] = set()
            if label == "cut":
                for kill in range(3):
                    time.sleep(rng.uniform(2.0, 6.0))
                    run.kill()
                    run.wait()
                    (db,) = (tmp_path / label / "runs").glob("*.sqlite")
                    con = sqlite3.connect(db)
                    kept |= set(con.execute('SELECT "Test Time / s", "Voltage / V" FROM samples'))
                    con.close()
                    deadline = time.monotonic() + 10  # the guardian turns the output off
                    while ask(resource, ":OUTP?") != "0" and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert ask(resource, ":OUTP?") == "0", f"kill {kill}: the output was left on"
                    run = cellbench("resume", str(db), tmp_path=tmp_path)
            out, _ = run.communicate(timeout=120)
            assert run.returncode == 0, out
            (db,) = (tmp_path / label / "runs").glob("*.sqlite")
            tables.append(per_cycle(db))
        finally:
            sim.terminate()
            sim.wait(timeout=10)
    whole, cut = tables
    assert len(whole) == len(cut) == 3
    for (c0, d0), (c1, d1) in zip(whole, cut, strict=True):
        assert c1 == pytest.approx(c0, rel=0.03) and d1 == pytest.approx(d0, rel=0.03)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = con.execute('SELECT "Test Time / s", "Voltage / V" FROM samples ORDER BY rowid').fetchall()
    assert kept <= set(rows)  # no committed sample was lost
    times = [t for t, _ in rows]
    assert times == sorted(times) and len(set(times)) == len(times)  # test time never goes back
    # every step's row is closed, the three interrupted ones among them, and none is recorded twice
    steps = con.execute("SELECT step_count, end_time, end_reason FROM steps ORDER BY step_count").fetchall()
    assert [s for s, _, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 6
    assert all(end is not None and reason for _, end, reason in steps), steps
    kinds = [k for (k,) in con.execute("SELECT kind FROM events ORDER BY rowid")]
    assert kinds.count("resumed") == 3 and kinds.count("outage") == 3 and kinds.count("guardian") >= 1
    assert kinds[-1] == "end" and con.execute("SELECT message FROM events ORDER BY rowid DESC").fetchone()[0] == \
        "completed"


def test_resume_refuses_what_is_not_a_run_in_one_line(tmp_path: Path) -> None:
    """A hostile or mistaken file: a text file, an unrelated SQLite database, a run whose state was mangled."""
    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app

    text = tmp_path / "notes.sqlite"
    text.write_text("not a database\n")
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    mangled = tmp_path / "mangled.sqlite"
    con = sqlite3.connect(mangled)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE run_state (id INTEGER PRIMARY KEY, test_time REAL, state TEXT NOT NULL);
        CREATE TABLE samples ("Unix Time / s" REAL);
        CREATE TABLE events (test_time REAL, unix_time REAL, kind TEXT, message TEXT);
        INSERT INTO meta VALUES ('profile_text', '"name: x"'), ('channel', '"ch1"'), ('clock', '"real"');
        INSERT INTO run_state VALUES (1, 0, '{"pc": "evil"}');
    """)
    con.close()
    runner = CliRunner()
    for db, says in [(text, "not a cellbench run database"), (other, "not a cellbench run database"),
                     (mangled, "its saved run state cannot be read"), (tmp_path / "absent.sqlite", "no run database")]:
        result = runner.invoke(app, ["resume", str(db)])
        assert result.exit_code == 2, (db, result.output)
        assert says in result.output and isinstance(result.exception, SystemExit)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A second terminal's cellbench command, beside the running controller (same registry)."""
    return subprocess.run([sys.executable, "-m", "cellbench", *args], capture_output=True, text=True,
                          env=run_env(tmp_path), timeout=60)


def pair_bench(tmp_path: Path, smus: tuple[str, str], ch1_profile: str = "") -> Path:
    """A two-channel bench on the two 2450s (ch1 may name its own profile)."""
    bench = tmp_path / "bench.yaml"
    own = f", profile: {ch1_profile}" if ch1_profile else ""
    bench.write_text(textwrap.dedent(f"""
        name: pair
        instruments:
          smu1: {{driver: keithley2450, resource: "{smus[0]}", timeout: 2 s}}
          smu2: {{driver: keithley2450, resource: "{smus[1]}", timeout: 2 s}}
        cells:
          A-1: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
          A-2: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
        channels:
          ch1: {{cycler: smu1, cell: A-1{own}}}
          ch2: {{cycler: smu2, cell: A-2}}
    """))
    return bench


def test_one_channel_is_paused_resumed_and_stopped_from_another_terminal_while_the_other_runs_on(
        tmp_path: Path, two_smus: tuple[str, str]) -> None:
    r1, r2 = two_smus
    bench = pair_bench(tmp_path, two_smus)
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    proc = start_run(tmp_path, bench, profile)
    wait_until_sourcing(r1)
    wait_until_sourcing(r2)
    time.sleep(2.0)
    done = cli(tmp_path, "pause", "ch1", "--reason", "checking the crimp")
    assert done.returncode == 0 and "pauses" in done.stdout, done.stdout + done.stderr
    deadline = time.monotonic() + 10
    while ask(r1, ":OUTP?") != "0" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ask(r1, ":OUTP?") == "0" and ask(r2, ":OUTP?") == "1"  # only the paused channel rests
    status = cli(tmp_path, "status", "--json")
    states = {row["channel"]: row["state"] for row in __import__("json").loads(status.stdout)}
    assert states == {"ch1": "paused", "ch2": "running"}, status.stdout
    again = cli(tmp_path, "pause", "ch1")
    assert again.returncode == 1 and "already paused" in again.stderr + again.stdout
    time.sleep(3.0)  # paused: not test time
    assert cli(tmp_path, "resume", "ch1").returncode == 0
    wait_until_sourcing(r1)
    time.sleep(2.0)
    stopped = cli(tmp_path, "stop", "ch2")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while ask(r2, ":OUTP?") != "0" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ask(r2, ":OUTP?") == "0" and ask(r1, ":OUTP?") == "1"  # the other channel sources on
    assert cli(tmp_path, "stop", "nope").returncode == 2
    time.sleep(1.5)
    assert cli(tmp_path, "pause", "ch1").returncode == 0  # paused again: the controller is stopped while so
    deadline = time.monotonic() + 10
    while ask(r1, ":OUTP?") != "0" and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert ask(r1, ":OUTP?") == "0"
    dbs = {sqlite3.connect(db).execute("SELECT value FROM meta WHERE key = 'channel'").fetchone()[0]: db
           for db in (tmp_path / "runs").glob("*.sqlite")}
    one = sqlite3.connect(dbs['"ch1"'])
    kinds = [k for (k,) in one.execute("SELECT kind FROM events ORDER BY rowid")]
    assert kinds.count("start") == 1 and kinds.count("end") == 1 and kinds[-1] == "end"
    assert kinds.index("paused") < kinds.index("resumed") and kinds.count("paused") == 2
    assert one.execute("SELECT message FROM events WHERE kind = 'end'").fetchone()[0] == \
        "interrupted: SIGTERM received"
    from cellbench.bench.runner.run import read_for_resume

    assert not read_for_resume(dbs['"ch1"'])[1].finished  # a run stopped while paused can be resumed
    times = [t for (t,) in one.execute('SELECT "Test Time / s" FROM samples ORDER BY rowid')]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 2.5  # the 3 s pause is not test time: samples go on from where they stood
    two = sqlite3.connect(dbs['"ch2"'])
    assert two.execute("SELECT message FROM events WHERE kind = 'end'").fetchone()[0].startswith(
        "interrupted: stopped by an operator (operator ")  # who: the login name, as no --operator was given
    assert "Traceback" not in out


def test_a_run_is_started_on_an_idle_channel_of_a_running_controller(tmp_path: Path,
                                                                     two_smus: tuple[str, str]) -> None:
    """`run --stay` keeps the controller and its instruments after its runs end; `cellbench start` adds a run on
    an idle channel from another terminal, checked like any run before it touches the cell."""
    r2 = two_smus[1]
    (tmp_path / "short.yaml").write_text("name: short\nsample_period: 1 s\nsteps:\n  - rest: 2 s\n")
    (tmp_path / "bad.yaml").write_text("name: bad\nsteps:\n  - charge: {current: C/10, until: 4.6 V}\n")
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    bench = pair_bench(tmp_path, two_smus, str(tmp_path / "short.yaml"))
    proc = stay(tmp_path, bench)
    time.sleep(4.0)  # ch1's two-second rest has ended; the controller stays
    assert proc.poll() is None
    assert ask(r2, ":OUTP?") == "0"  # ch2 idle
    runs = tmp_path / "runs"
    runs.rename(tmp_path / "runs-aside")
    runs.write_text("a file where the runs folder should be")  # the run file cannot be made: nothing starts
    nowhere_to_write = cli(tmp_path, "start", "ch2", str(profile))
    assert nowhere_to_write.returncode == 1 and "no run file could be made" in nowhere_to_write.stderr
    assert ask(r2, ":OUTP?") == "0" and proc.poll() is None
    runs.unlink()
    (tmp_path / "runs-aside").rename(runs)
    started = cli(tmp_path, "start", "ch2", str(profile))
    assert started.returncode == 0 and "starts 'long charge'" in started.stdout, started.stdout + started.stderr
    wait_until_sourcing(r2)
    busy = cli(tmp_path, "start", "ch2", str(profile))
    assert busy.returncode == 1 and "running a test" in busy.stdout + busy.stderr
    refused = cli(tmp_path, "start", "ch1", str(tmp_path / "bad.yaml"))
    assert refused.returncode == 1 and "bad.yaml:3" in refused.stdout + refused.stderr
    assert "4.6 V" in refused.stdout + refused.stderr
    nowhere = cli(tmp_path, "start", "ch9", str(profile))
    assert nowhere.returncode == 2 and "no running controller holds a channel 'ch9'" in nowhere.stderr
    assert cli(tmp_path, "stop", "ch2").returncode == 0
    deadline = time.monotonic() + 10
    while ask(r2, ":OUTP?") != "0" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ask(r2, ":OUTP?") == "0"
    time.sleep(1.0)
    assert proc.poll() is None  # idle again, and still there
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out
    states = {json.loads(p.read_text())["channel"]: json.loads(p.read_text())["state"]
              for p in (tmp_path / "state" / "runs").glob("*.json")}
    assert states == {"ch1": "completed", "ch2": "interrupted"}
    assert not list((tmp_path / "state" / "control").glob("*"))  # socket and its note removed


def test_a_run_started_later_is_the_guardians_too(served: str, tmp_path: Path) -> None:
    """A run that `cellbench start` adds to a `run --stay` controller is guarded as the first ones are: the
    controller killed with -9, the guardian turns the output off and records it in that run's database."""
    bench, profile = files(tmp_path, served)
    runs = tmp_path / "runs"
    proc = stay(tmp_path, bench)
    try:
        started = cli(tmp_path, "start", "ch1", str(profile))
        assert started.returncode == 0, started.stdout + started.stderr
        wait_until_sourcing(served)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    (db,) = runs.glob("*.sqlite")
    deadline = time.monotonic() + 20
    said: list[str] = []
    while not said and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.closing(sqlite3.connect(db)) as con:
            said = [m for (m,) in con.execute("SELECT message FROM events WHERE kind = 'guardian'")]
    assert said and "the controller died; smu1: output turned off by the guardian" in said[0], said
    assert ask(served, ":OUTP?") == "0"
