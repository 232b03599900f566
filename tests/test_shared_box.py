"""A shared box operated as a lab does for a week: one `run --stay` controller, commands from other terminals.

Every test runs the real controller as its own process against simulated 2450s served in processes of their own,
and checks what a lab reads (Unix time against the wall clock, the records, the messages) rather than only what
the run computes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.test_unattended import (
    PROFILE,
    ask,
    cli,
    files,
    pair_bench,
    run_env,
    start_run,
    stay,
    wait_until_sourcing,
)

SLACK = 1.5  # s: a sample's stamp against the wall clock read around it (sample period 1 s, loaded machine)


def database_of(tmp_path: Path, channel: str) -> Path:
    for db in sorted((tmp_path / "runs").glob("*.sqlite")):
        with sqlite3.connect(db) as con:
            if con.execute("SELECT value FROM meta WHERE key = 'channel'").fetchone()[0] == f'"{channel}"':
                return db
    raise AssertionError(f"no run database of {channel}")


def unix_times(db: Path) -> tuple[list[float], list[tuple[str, float]]]:
    with sqlite3.connect(db) as con:
        samples = [t for (t,) in con.execute('SELECT "Unix Time / s" FROM samples ORDER BY rowid')]
        events = [(k, t) for k, t in con.execute("SELECT kind, unix_time FROM events ORDER BY rowid")]
    return samples, events


def test_unix_time_is_the_wall_clocks_across_pause_resume_start_and_resume_after_kill(
        tmp_path: Path, two_smus: tuple[str, str]) -> None:
    """One controller's clock serves every channel: a pause and resume on ch1 and a later start on ch2 must not
    move any channel's Unix time off the wall clock; a run resumed in a new process after kill -9 neither."""
    r1, r2 = two_smus
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    launched = time.time()
    proc = stay(tmp_path, pair_bench(tmp_path, two_smus, str(profile)))
    try:
        wait_until_sourcing(r1)
        time.sleep(2.0)
        assert cli(tmp_path, "pause", "ch1").returncode == 0
        time.sleep(4.0)  # paused: the wall clock goes on, test time does not
        assert cli(tmp_path, "resume", "ch1").returncode == 0
        wait_until_sourcing(r1)
        time.sleep(2.0)
        started = cli(tmp_path, "start", "ch2", str(profile))
        assert started.returncode == 0, started.stdout + started.stderr
        wait_until_sourcing(r2)
        time.sleep(3.0)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    one, two = database_of(tmp_path, "ch1"), database_of(tmp_path, "ch2")
    for db in (one, two):
        samples, events = unix_times(db)
        assert samples and all(b > a for a, b in itertools.pairwise(samples))  # never backwards
        assert launched - SLACK < samples[0] and samples[-1] < killed_at + SLACK
        assert samples[-1] > killed_at - 1.0 - SLACK  # the newest sample is now, not minutes ago
        assert all(b >= a for (_, a), (_, b) in itertools.pairwise(events)), events
    _, events = unix_times(one)
    stamps = dict(events)
    assert stamps["resumed"] - stamps["paused"] > 4.0 - 0.5  # the pause lasted as long on the records as it did
    # resumed by hand in a new process after the kill: its samples are stamped with that process's now
    resumed_at = time.time()
    again = subprocess.Popen([sys.executable, "-m", "cellbench", "resume", str(one)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env(tmp_path))
    try:
        # the guardian turned the outputs off when the controller died; the resumed run turns ch1's on again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (ask(r1, ":OUTP?") != "1" or time.time() < resumed_at + 1):
            time.sleep(0.1)
        time.sleep(2.0)
        stopped_at = time.time()
        again.send_signal(signal.SIGTERM)
        out, _ = again.communicate(timeout=30)
    finally:
        if again.poll() is None:
            again.kill()
    samples, events = unix_times(one)
    after = [t for t in samples if t > killed_at]
    assert after and resumed_at - SLACK < after[0] and after[-1] < stopped_at + SLACK, out
    assert all(b > a for a, b in itertools.pairwise(samples))
    outage = [t for k, t in events if k == "outage"]
    assert outage and outage[-1] >= killed_at - SLACK
    said = [m for k, m in events_of(one) if k == "outage"]  # as times a person reads, not Unix seconds
    assert re.fullmatch(r"no control from 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ to 20\S+Z \(.+\)", said[-1]), said


def events_of(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return [(k, m) for k, m in con.execute("SELECT kind, message FROM events ORDER BY rowid")]


def test_one_stopped_channel_is_resumed_inside_the_running_controller_and_messages_say_what_is_true(
        tmp_path: Path, two_smus: tuple[str, str]) -> None:
    """`stop ch2` then `resume RUN` continues ch2's run in its own database inside the controller that holds the
    box, while ch1 runs on; a second stop (the loser of a race) is told the channel is idle and how its run
    ended; every command's operator and reason are in the run's events."""
    r1, r2 = two_smus
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    proc = stay(tmp_path, pair_bench(tmp_path, two_smus, str(profile)))
    try:
        assert cli(tmp_path, "start", "ch2", str(profile)).returncode == 0
        wait_until_sourcing(r1)
        wait_until_sourcing(r2)
        time.sleep(2.0)
        two = database_of(tmp_path, "ch2")
        run_id = two.stem
        stopped = cli(tmp_path, "stop", run_id, "--reason", "re-crimp", "--operator", "J. Doe")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 10
        while ask(r2, ":OUTP?") != "0" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ask(r2, ":OUTP?") == "0" and ask(r1, ":OUTP?") == "1"
        late = cli(tmp_path, "stop", "ch2")  # the second operator of a race
        assert late.returncode == 1, late.stdout + late.stderr
        said = " ".join(late.stderr.split())
        assert f"ch2 is idle: its run {run_id} ended: interrupted: re-crimp (operator J. Doe) at" in said
        missing = cli(tmp_path, "start", "ch2", str(tmp_path / "no-such.yaml"))
        assert missing.returncode == 2 and "no such file" in missing.stderr
        resumed = cli(tmp_path, "resume", str(two), "--operator", "A. Smith")
        assert resumed.returncode == 0 and f"resumes run {run_id}" in resumed.stdout, resumed.stdout + resumed.stderr
        wait_until_sourcing(r2)
        time.sleep(2.0)
        assert proc.poll() is None and ask(r1, ":OUTP?") == "1"
        running = cli(tmp_path, "resume", run_id)
        assert running.returncode == 1 and "nothing to resume" in running.stderr
        assert cli(tmp_path, "stop", "ch2").returncode == 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in out
    summary = " ".join(out[out.index("how every channel ended:"):].split())
    assert f"ch1: run {database_of(tmp_path, 'ch1').stem}: interrupted: SIGTERM received" in summary, summary
    assert f"ch2: run {run_id}: interrupted: re-crimp (operator J. Doe); run {run_id}: interrupted: stopped by an " \
           "operator" in summary, summary
    assert len(list((tmp_path / "runs").glob("*.sqlite"))) == 2  # continued in its own database: no new file
    events = events_of(two)
    kinds = [k for k, _ in events]
    assert kinds.count("start") == 1 and kinds.count("resumed") == 1 and kinds.count("end") == 2
    assert ("interrupted", "re-crimp (operator J. Doe)") in events
    assert ("notice", "resumed by command: by an operator (operator A. Smith)") in events
    # each run's log holds what concerns it: the command to ch2 is in ch2's log only
    assert "re-crimp" in two.with_suffix(".log").read_text()
    assert "re-crimp" not in database_of(tmp_path, "ch1").with_suffix(".log").read_text()
    with sqlite3.connect(two) as con:
        times = [t for (t,) in con.execute('SELECT "Test Time / s" FROM samples ORDER BY rowid')]
    assert all(b > a for a, b in itertools.pairwise(times))  # test time goes on from where it stood


def test_the_guardian_tells_the_lab_of_a_hard_death_through_the_benchs_notify_command(
        tmp_path: Path, served: str) -> None:
    """kill -9 the controller: the guardian turns the output off, records it, and runs the bench's notify command
    with the run's state `interrupted` and why, one JSON record a line, so nobody learns of it only by looking."""
    told = tmp_path / "told.jsonl"
    bench, profile = files(tmp_path, served, more=f"notify: [sh, -c, 'cat >> {told}']\n")
    proc = start_run(tmp_path, bench, profile)
    try:
        wait_until_sourcing(served)
        time.sleep(1.5)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while not (told.exists() and told.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = told.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 2, lines  # one record, ending in a newline
    record = json.loads(lines[0])
    db = next((tmp_path / "runs").glob("*.sqlite"))
    assert record["state"] == "interrupted" and record["run_id"] == db.stem and record["channel"] == "ch1"
    assert "the controller died" in record["reason"] and "output turned off by the guardian" in record["reason"]
    assert ask(served, ":OUTP?") == "0"
    with sqlite3.connect(db) as con:
        (stamped,) = con.execute("SELECT test_time FROM events WHERE kind = 'guardian'").fetchone()
        (last_test_time,) = con.execute(
            'SELECT max(t) FROM (SELECT max("Test Time / s") AS t FROM samples UNION ALL '
            "SELECT max(test_time) FROM events WHERE kind != 'guardian')").fetchone()
    assert stamped == last_test_time  # the run's last test time: the dead time is no test time


def test_status_tells_idle_and_ended_channels_why_one_is_paused_its_readings_age_and_the_steps_time_left(
        tmp_path: Path, two_smus: tuple[str, str]) -> None:
    r1, _ = two_smus
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)  # one charge step: until 4.2 V or 2 h
    proc = stay(tmp_path, pair_bench(tmp_path, two_smus, str(profile)))
    try:
        wait_until_sourcing(r1)
        time.sleep(3.0)

        def rows() -> dict[str, dict[str, object]]:
            done = cli(tmp_path, "status", "--json")
            assert done.returncode == 0, done.stderr
            return {row["channel"]: row for row in json.loads(done.stdout)}

        now = rows()
        ch1, ch2 = now["ch1"], now["ch2"]
        assert ch1["state"] == "running" and ch2["state"] == "idle"
        assert ch2["reason"] == "no run since its controller started"
        assert isinstance(ch1["reading_age_s"], float) and 0.0 <= ch1["reading_age_s"] < 3.0
        assert isinstance(ch1["test_time"], float) and isinstance(ch1["remaining_s"], float)
        assert abs(ch1["remaining_s"] + ch1["test_time"] - 7200.0) < 2.0  # the 2 h limit, less the time in step
        assert "cell_temperature_c" in ch1 and "chamber_temperature_c" in ch1
        assert cli(tmp_path, "pause", "ch1", "--reason", "checking the crimp", "--operator", "ana").returncode == 0
        deadline = time.monotonic() + 10
        while rows()["ch1"]["state"] != "paused" and time.monotonic() < deadline:
            time.sleep(0.2)
        paused = rows()["ch1"]
        assert paused["reason"] == "paused: checking the crimp (operator ana)"
        assert paused["current"] == 0.0  # the output is off: not the last sample's 0.2 mA
        assert cli(tmp_path, "stop", "ch1").returncode == 0
        deadline = time.monotonic() + 10
        while rows()["ch1"]["state"] != "idle" and time.monotonic() < deadline:
            time.sleep(0.2)
        ended = rows()["ch1"]
        assert re.fullmatch(r"its run ended: interrupted: stopped by an operator \(operator \S+\) at 20\S+Z",
                            str(ended["reason"])), ended
        table = cli(tmp_path, "status")  # the table, off a terminal: once
        assert table.returncode == 0 and "idle" in table.stdout and "step left" in table.stdout, table.stdout
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_dense_charge_is_refused_at_start_and_runs_only_when_allowed_which_the_run_records(
        tmp_path: Path, two_smus: tuple[str, str]) -> None:
    _, r2 = two_smus
    bench = pair_bench(tmp_path, two_smus)
    bench.write_text(bench.read_text().replace("A-2: {capacity: 3.5 mAh,", "A-2: {area: 1 cm^2, capacity: 3.5 mAh,"))
    dense = tmp_path / "dense.yaml"
    dense.write_text("name: dense\nsample_period: 1 s\nsteps:\n  - charge: {current: 3 mA, until: [4.2 V, 1 h]}\n")
    proc = stay(tmp_path, bench)
    try:
        refused = cli(tmp_path, "start", "ch2", str(dense))
        said = " ".join((refused.stdout + refused.stderr).split())
        assert refused.returncode == 1 and "charges at 3 mA/cm² on 1 cm², above the 2.5 mA/cm²" in said, said
        assert ask(r2, ":OUTP?") == "0"
        allowed = cli(tmp_path, "start", "ch2", str(dense), "--allow-current-density")
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        wait_until_sourcing(r2)
        assert cli(tmp_path, "stop", "ch2").returncode == 0
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    db = database_of(tmp_path, "ch2")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'current_density_allowed'").fetchone() == ("true",)
    notices = [m for k, m in events_of(db) if k == "notice"]
    assert any(m.startswith("allowed by the operator (--allow-current-density): current 3 mA charges at 3 mA/cm²")
               for m in notices), notices
    # a run on the bench is refused before anything is touched, with the file and line
    run = subprocess.run([sys.executable, "-m", "cellbench", "run", str(dense), "--bench", str(bench)],
                         capture_output=True, text=True, env=run_env(tmp_path), timeout=60)
    assert run.returncode == 2 and "dense.yaml:4" in run.stderr and ask(r2, ":OUTP?") == "0"


def test_a_hung_controller_is_stopped_by_its_guardian_and_its_output_turned_off(tmp_path: Path,
                                                                                served: str) -> None:
    """SIGSTOP the controller while it sources: alive but no longer working, it once kept the output on,
    unsupervised. Its control loop beats to the guardian every second; past guardian.HUNG_AFTER without a beat
    the guardian kills it (so it cannot wake up and source on) and turns the output off, and the record says so."""
    import os

    from cellbench.bench.ops import guardian
    bench, profile = files(tmp_path, served)
    proc = start_run(tmp_path, bench, profile)
    try:
        wait_until_sourcing(served)
        time.sleep(2.0)
        stopped_at = time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = stopped_at + guardian.HUNG_AFTER + 30
        while ask(served, ":OUTP?") != "0" and time.monotonic() < deadline:
            time.sleep(0.2)
        off_after = time.monotonic() - stopped_at
        assert ask(served, ":OUTP?") == "0", "the hung controller's output stayed on"
        assert guardian.HUNG_AFTER - 1 < off_after < guardian.HUNG_AFTER + 30
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL  # stopped for good: it cannot wake and source on
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    (db,) = [p for p in (tmp_path / "runs").glob("*.sqlite")]
    deadline = time.monotonic() + 15
    said: list[str] = []
    while not said and time.monotonic() < deadline:
        said = [m for k, m in events_of(db) if k == "guardian"]
        time.sleep(0.2)
    assert said and said[0].startswith("the controller stopped working for 15 s (hung or stopped): the guardian "
                                       "killed it; smu1: output turned off"), said


def guardians_of(pid: int) -> list[int]:
    """The guardian processes a controller started (its children running cellbench.bench.ops.guardian)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"cellbench.bench.ops.guardian" in cmdline and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_dead_guardian_is_replaced_at_once_and_the_new_one_acts(tmp_path: Path, served: str) -> None:
    """Kill the guardian, then the controller: the output once stayed on. The controller sees its guardian gone
    within a beat and starts a new one, which turns the output off when the controller dies."""
    import os

    bench, profile = files(tmp_path, served)
    proc = start_run(tmp_path, bench, profile)
    try:
        wait_until_sourcing(served)
        (first,) = guardians_of(proc.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while [g for g in guardians_of(proc.pid) if g != first] == [] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [g for g in guardians_of(proc.pid) if g != first], "no new guardian"
        assert ask(served, ":OUTP?") == "1"  # the run went on meanwhile
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while ask(served, ":OUTP?") != "0" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ask(served, ":OUTP?") == "0"
    finally:
        if proc.poll() is None:
            proc.kill()
    log = next((tmp_path / "runs").glob("*.log")).read_text()
    assert "is gone" in log and "a new guardian" in log


def test_an_unreachable_cycler_holds_up_no_other_when_the_guardian_acts(tmp_path: Path) -> None:
    """kill -9 a controller of two 2450s, the first of which has just stopped answering (its server stopped):
    the guardian tries every cycler at once, so the answering one is off within the promised 5 s (once it
    waited the 10 s the guardian gives the silent one first), and the silent one is sent its off blind."""
    import os

    from tests.test_cli import serve

    servers = [serve("keithley2450", "--port", "0", "--soc", "0.3") for _ in range(2)]
    (silent_proc, silent), (_, answering) = servers
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    proc = start_run(tmp_path, pair_bench(tmp_path, (silent, answering)), profile)
    try:
        wait_until_sourcing(silent)
        wait_until_sourcing(answering)
        os.kill(silent_proc.pid, signal.SIGSTOP)  # ch1's 2450: connections accepted, nothing answered
        proc.kill()
        died = time.monotonic()
        proc.wait(timeout=10)
        deadline = died + 30
        while ask(answering, ":OUTP?") != "0" and time.monotonic() < deadline:
            time.sleep(0.1)
        off_after = time.monotonic() - died
        assert ask(answering, ":OUTP?") == "0"
        assert off_after < 5.0, f"the answering cycler went off {off_after:.1f} s after the death"
        os.kill(silent_proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        said: list[str] = []
        while len(said) < 2 and time.monotonic() < deadline:
            said = [m for k, m in events_of(database_of(tmp_path, "ch2")) if k == "guardian"]
            time.sleep(0.2)
        assert any("smu2: output turned off by the guardian" in m for m in said), said
        assert any(m.startswith("the controller died; smu1: ") for m in said), said  # off, or sent blind
    finally:
        if proc.poll() is None:
            proc.kill()
        for p, _ in servers:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGCONT)
            p.terminate()
            p.wait(timeout=10)


def test_a_cell_that_shorts_while_paused_is_seen_latched_and_never_turned_on_into(tmp_path: Path) -> None:
    """A paused channel still holds a cell: its open-circuit voltage is read once a second. A short at open circuit
    (20 ohm, on the served 2450's cell at a moment of the test's choosing) latches the channel within seconds,
    recorded; `resume` is refused, clearing the latch is refused with the reading, and stopping ends the run in
    that safety stop (latched for a later `cellbench resume` too)."""
    import os

    from cellbench.bench.runtime import supervisor
    from tests.test_cli import serve

    sim, resource = serve("keithley2450", "--port", "0", "--soc", "0.3", "--short-on-usr1", "20")
    bench, profile = files(tmp_path, resource)
    proc = start_run(tmp_path, bench, profile)
    try:
        wait_until_sourcing(resource)
        time.sleep(2.0)
        assert cli(tmp_path, "pause", "ch1", "--reason", "re-crimp").returncode == 0
        db = database_of(tmp_path, "ch1")
        deadline = time.monotonic() + 10
        while "paused" not in [k for k, _ in events_of(db)] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        assert not [m for k, m in events_of(db) if k == "safety"]  # a healthy cell at rest: nothing found
        os.kill(sim.pid, signal.SIGUSR1)
        shorted = time.monotonic()
        found: list[str] = []
        while not found and time.monotonic() < shorted + 15:
            found = [m for k, m in events_of(db) if k == "safety"]
            time.sleep(0.1)
        assert found and time.monotonic() - shorted < supervisor.HELD_PERIOD + 5.0, found
        assert found[0].startswith("safety stop: cell voltage ") and "at open circuit" in found[0], found
        status = json.loads(cli(tmp_path, "status", "--json").stdout)
        assert status[0]["state"] == "paused" and status[0]["reason"] == found[0], status  # held: the trip says why
        resumed = cli(tmp_path, "resume", "ch1")
        assert resumed.returncode != 0 and "latch" in resumed.stdout + resumed.stderr
        cleared = cli(tmp_path, "resume", "ch1", "--clear-latch")
        said = cleared.stdout + cleared.stderr
        assert cleared.returncode != 0 and "latch not cleared: the cell reads" in said, said
        assert "sourcing" not in said and "resumed" not in [k for k, _ in events_of(db)][-3:]
        assert cli(tmp_path, "stop", "ch1").returncode == 0
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.terminate()
        sim.wait(timeout=10)
    (end,) = [m for k, m in events_of(db) if k == "end"]
    assert end == found[0]
    from cellbench.bench.runner.run import read_for_resume
    from cellbench.profiles.parse import InputError

    try:
        read_for_resume(db)
        raise AssertionError("a run latched while paused was resumable")
    except InputError as exc:
        assert "clears the latch" in str(exc)


def killed_while_charging(tmp_path: Path, bench: Path, profile: Path, resource: str) -> Path:
    """`cellbench run` killed -9 a moment after it began sourcing; its database once the guardian has recorded
    turning the output off."""
    proc = start_run(tmp_path, bench, profile)
    try:
        wait_until_sourcing(resource)
        time.sleep(1.5)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    db = database_of(tmp_path, "ch1")
    deadline = time.monotonic() + 15
    while "guardian" not in [k for k, _ in events_of(db)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return db


def test_a_resume_reads_the_cell_first_and_refuses_a_shorted_one(tmp_path: Path) -> None:
    """kill -9 the controller while it charges; the cell shorts while nobody runs it. `cellbench resume` reads the
    cell at open circuit before anything else and refuses, a safety stop with the reading: no step goes on."""
    import os

    from tests.test_cli import serve

    sim, resource = serve("keithley2450", "--port", "0", "--soc", "0.3", "--short-on-usr1", "20")
    bench, profile = files(tmp_path, resource)
    try:
        db = killed_while_charging(tmp_path, bench, profile, resource)
        os.kill(sim.pid, signal.SIGUSR1)
        with sqlite3.connect(db) as con:
            (before,) = con.execute("SELECT count(*) FROM samples").fetchone()
        done = subprocess.run([sys.executable, "-m", "cellbench", "resume", str(db), "--bench", str(bench)],
                              capture_output=True, text=True, env=run_env(tmp_path), timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    ends = [m for k, m in events_of(db) if k == "end"]
    assert ends[-1].startswith("safety stop: not resumed: the cell reads ") and "at open circuit" in ends[-1], ends
    with sqlite3.connect(db) as con:
        (after,) = con.execute("SELECT count(*) FROM samples").fetchone()
    assert after == before  # not one step's sample: the output never went on


def test_a_cell_a_safety_stop_ended_is_not_run_again_by_any_process_until_cleared(tmp_path: Path,
                                                                                     served: str) -> None:
    """A safety stop latches the cell by its ID across processes: a plain `cellbench run` on it is refused before
    anything is sent to the instrument, naming the trip; `cellbench clear-latch` (recorded in the tripped run)
    lets the next run go."""
    tripping = ("name: rest\nsample_period: 1 s\nsafety: {voltage: [2.5 V, 3.0 V]}\n"  # the cell reads ~3.7 V
                "steps:\n  - rest: 1 h\n")
    bench, profile = files(tmp_path, served, profile_text=tripping)
    first = subprocess.run([sys.executable, "-m", "cellbench", "run", str(profile), "--bench", str(bench),
                            "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                           env=run_env(tmp_path), timeout=60)
    assert first.returncode == 1 and "safety stop" in first.stdout + first.stderr
    (tripped,) = (tmp_path / "runs").glob("*.sqlite")
    again = subprocess.run([sys.executable, "-m", "cellbench", "run", str(profile), "--bench", str(bench),
                            "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                           env=run_env(tmp_path), timeout=60)
    said = again.stdout + again.stderr
    assert again.returncode == 1 and "cell pellet is latched since " in said and "by a safety stop" in said, said
    assert "cellbench clear-latch pellet" in said and "Traceback" not in said
    assert len(list((tmp_path / "runs").glob("*.sqlite"))) == 1  # refused before a run file or an instrument
    assert ask(served, ":OUTP?") == "0"
    wrong = cli(tmp_path, "clear-latch", "nope", "--reason", "x")
    assert wrong.returncode == 1 and "has no safety latch" in wrong.stderr
    cleared = cli(tmp_path, "clear-latch", "pellet", "--reason", "impedance checked", "--operator", "ana")
    assert cleared.returncode == 0, cleared.stderr
    assert [m for k, m in events_of(tripped) if k == "latch cleared"] == [
        "cell latch cleared by the operator (impedance checked (operator ana)) after the "
        + [m for k, m in events_of(tripped) if k == "end"][-1]]
    third = subprocess.run([sys.executable, "-m", "cellbench", "run", str(profile), "--bench", str(bench),
                            "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                           env=run_env(tmp_path), timeout=60)
    assert "is latched" not in third.stdout + third.stderr
    assert len(list((tmp_path / "runs").glob("*.sqlite"))) == 2  # it ran (and tripped on its narrow range again)


def test_a_run_database_has_one_writer_whatever_the_bench_files_say(tmp_path: Path,
                                                                     two_smus: tuple[str, str]) -> None:
    """Two `resume`s of one killed run, each with its own bench file (on different 2450s, so no instrument lock
    stops the second), by two users (their own runs registries, so neither sees the other's run there): once both
    wrote one database. The second is refused before it touches an instrument, naming the process recording it."""
    r1, r2 = two_smus
    bench, profile = files(tmp_path, r1)
    db = killed_while_charging(tmp_path, bench, profile, r1)
    moved = tmp_path / "moved.yaml"
    moved.write_text(bench.read_text().replace(r1, r2))
    first = subprocess.Popen([sys.executable, "-m", "cellbench", "resume", str(db)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env(tmp_path))
    try:
        wait_until_sourcing(r1)
        other_user = {**run_env(tmp_path), "CELLBENCH_STATE_DIR": str(tmp_path / "state-of-another-user")}
        second = subprocess.run([sys.executable, "-m", "cellbench", "resume", str(db), "--bench",
                                 str(moved)], capture_output=True, text=True, env=other_user, timeout=60)
        said = second.stdout + second.stderr
        assert second.returncode == 1 and f"is in use by cellbench pid {first.pid}" in said, said
        assert ask(r2, ":OUTP?") == "0"  # the second bench's 2450 was never turned on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert [k for k, _ in events_of(db)].count("resumed") == 1


def test_a_write_lock_held_on_one_channels_database_stops_no_channel_and_loses_no_sample(
        tmp_path: Path, two_smus: tuple[str, str]) -> None:
    """Another process holds ch1's database's write lock for 6 s (a viewer in a transaction): once, every channel
    of the bench ended `recording failed`. The rows wait in memory and are written when the lock goes; ch2 never
    notices. (A lock held past store.LOCKED_GRACE fails that channel alone; a full disk, every channel.)"""
    r1, r2 = two_smus
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    proc = start_run(tmp_path, pair_bench(tmp_path, two_smus), profile)
    try:
        wait_until_sourcing(r1)
        wait_until_sourcing(r2)
        time.sleep(2.0)
        db = database_of(tmp_path, "ch1")
        holder = sqlite3.connect(db, isolation_level=None, timeout=10)
        holder.execute("BEGIN IMMEDIATE")
        time.sleep(6.0)
        holder.execute("COMMIT")
        holder.close()
        time.sleep(2.5)
        assert ask(r1, ":OUTP?") == "1" and ask(r2, ":OUTP?") == "1" and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out
    with sqlite3.connect(db) as con:
        times = [t for (t,) in con.execute('SELECT "Test Time / s" FROM samples ORDER BY rowid')]
    assert max(b - a for a, b in itertools.pairwise(times)) < 2.5, times  # 1 s samples: none lost to the lock
    assert [m for k, m in events_of(db) if k == "end"] == ["interrupted: SIGTERM received"]
    assert [m for k, m in events_of(database_of(tmp_path, "ch2")) if k == "end"] == ["interrupted: SIGTERM received"]
    assert "locked by another process" in next((tmp_path / "runs").glob("*A-1*.log")).read_text()


def test_a_step_killed_before_its_first_sample_period_ends_keeps_its_first_sample(tmp_path: Path,
                                                                                  served: str) -> None:
    """A 60 s sample period and a kill -9 a few seconds into the step: the step's first sample (taken at its
    start) is in the database, and `status` showed it rather than dashes."""
    slow = "name: slow\nsample_period: 60 s\nsteps:\n  - charge: {current: 1 mA, until: [4.2 V, 2 h]}\n"
    bench, profile = files(tmp_path, served, profile_text=slow)
    proc = start_run(tmp_path, bench, profile)
    try:
        wait_until_sourcing(served)
        time.sleep(2.5)
        status = json.loads(cli(tmp_path, "status", "--json").stdout)
        assert isinstance(status[0]["voltage"], float) and status[0]["step_type"] == "CC Charge", status
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with sqlite3.connect(database_of(tmp_path, "ch1")) as con:
        rows = con.execute('SELECT "Test Time / s", "Current / A" FROM samples WHERE "Step Type" = ?',
                           ("CC Charge",)).fetchall()
    assert rows and rows[0][0] < 1.0 and abs(rows[0][1] - 1e-3) < 1e-5, rows


def test_the_readmes_operating_blocks_run_as_written_against_a_staying_controller(tmp_path: Path) -> None:
    """Every `cellbench` line of the README's "Runs, status and logs" and "Operating a shared box" blocks, run as
    written (the example run ID replaced by the real one of ch05) against a `run --bench --stay` controller on
    three served 2450s: ch03 and ch05 running, ch07 idle. Each ends with exit 0 and does what its comment says."""
    import shlex
    import textwrap

    from tests.test_cli import serve

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Runs, status and logs"):readme.index("Every command records who gave it")]
    lines = [line.split("  #")[0].strip() for sh in re.findall(r"```sh\n(.*?)```", section, re.S)
             for line in sh.splitlines() if line.startswith("cellbench ")]
    assert len(lines) >= 12, lines
    servers = [serve("keithley2450", "--port", "0", "--soc", "0.3") for _ in range(3)]
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    bench = tmp_path / "bench.yaml"
    bench.write_text(textwrap.dedent(f"""
        name: box
        instruments:
          smu3: {{driver: keithley2450, resource: "{servers[0][1]}", timeout: 2 s}}
          smu5: {{driver: keithley2450, resource: "{servers[1][1]}", timeout: 2 s}}
          smu7: {{driver: keithley2450, resource: "{servers[2][1]}", timeout: 2 s}}
        cells:
          P-03: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
          P-05: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
          P-07: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
        channels:
          ch03: {{cycler: smu3, cell: P-03, profile: {profile}}}
          ch05: {{cycler: smu5, cell: P-05, profile: {profile}}}
          ch07: {{cycler: smu7, cell: P-07}}
    """))
    proc = stay(tmp_path, bench)
    try:
        wait_until_sourcing(servers[0][1])
        wait_until_sourcing(servers[1][1])
        ch05_run = database_of(tmp_path, "ch05").stem
        said: dict[str, str] = {}
        for line in lines:
            line = line.replace("20261207T081500Z-P-05", ch05_run)
            done = cli(tmp_path, *shlex.split(line)[1:])
            assert done.returncode == 0, f"{line}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
            said[line] = done.stdout
            if line.startswith("cellbench stop ch05"):  # the stopped channel lets go before it is resumed
                deadline = time.monotonic() + 10
                while ask(servers[1][1], ":OUTP?") != "0" and time.monotonic() < deadline:
                    time.sleep(0.1)
        running = json.loads(said["cellbench runs --state running --json"])
        assert {r["channel"] for r in running} >= {"ch03", "ch05"}
        assert "ch07" in said["cellbench status"] and "idle" in said["cellbench status"]
        # ch07 took a formation run; ch05 goes on in its own database after its stop and resume
        wait_until_sourcing(servers[2][1])
        assert database_of(tmp_path, "ch07").stem.endswith("P-07") and ch05_run in said[f"cellbench resume {ch05_run}"]
        assert ("interrupted", "re-crimp (operator ana)") in events_of(database_of(tmp_path, "ch05"))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p, _ in servers:
            p.terminate()
            p.wait(timeout=10)
