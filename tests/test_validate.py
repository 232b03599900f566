"""`cellbench validate` refuses, with file:line, what would hurt the cell or fail at run time, and warns of what
may never end: through the CLI as a technician types it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellbench.bench.faces.cli import app

BENCH = """\
name: two
instruments:
  smu1: {{driver: keithley2450, resource: "TCPIP::127.0.0.1::5025::SOCKET"}}
  smu2: {{driver: keithley2450, resource: "TCPIP::127.0.0.1::5026::SOCKET"}}
cells:
  pouch: {{capacity: 3.5 Ah, voltage_min: 2.5 V, voltage_max: 4.3 V}}
  pellet: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
channels:
  ch1: {{cycler: smu1, cell: pouch}}
  ch2: {{cycler: {second}, cell: pellet}}
"""


def validate(tmp_path: Path, profile: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(profile))
    result = CliRunner().invoke(app, ["validate", str(path), "--no-estimate", *args], env={"COLUMNS": "300"})
    return result.exit_code, result.output


def test_a_negative_current_where_the_step_gives_the_sign_is_refused_at_its_line(tmp_path: Path) -> None:
    code, out = validate(tmp_path, """\
        name: sign
        steps:
          - rest: 1 min
          - charge: {current: -1 mA, until: 4.2 V}
    """)
    assert code == 2
    assert "p.yaml:4: steps[1].charge.current: current -1 mA is negative, but a charge step gives the sign" in out


def test_a_current_beyond_the_instrument_is_refused_before_any_run(tmp_path: Path) -> None:
    code, out = validate(tmp_path, """\
        name: too much
        steps:
          - discharge: {current: 5 A, until: 2.5 V}
    """)
    assert code == 2
    assert "p.yaml:3: steps[0].discharge: current 5 A is beyond the 1.05 A the keithley2450 'smu1' can source" in out
    # the same profile at 1C on a bench file's 3.5 Ah pouch: 3.5 A on that channel's 2450
    (tmp_path / "bench.yaml").write_text(BENCH.format(second="smu2"))
    code, out = validate(tmp_path, """\
        name: 1C
        steps:
          - charge: {current: 1C, until: 4.2 V}
    """, "--bench", str(tmp_path / "bench.yaml"))
    assert code == 2
    assert "current 1C (3.5 A) is beyond the 1.05 A the keithley2450 'smu1' can source (bench 'two', channel 'ch1')" \
        in out
    assert "ch2" not in out  # the pellet's 3.5 mA is fine


def test_a_limit_beyond_the_profiles_own_safety_window_is_refused(tmp_path: Path) -> None:
    code, out = validate(tmp_path, """\
        name: over
        safety: {voltage: [2.5 V, 4.2 V]}
        steps:
          - charge: {current: C/20, until: 4.25 V}
    """)
    assert code == 2 and "p.yaml:4: steps[0].charge: until voltage 4.25 V is above the profile's safety maximum" in out


def test_two_channels_on_one_source_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bench.yaml").write_text(BENCH.format(second="smu1"))
    code, out = validate(tmp_path, "name: x\nsteps:\n  - rest: 1 min\n", "--bench", str(tmp_path / "bench.yaml"))
    assert code == 2
    assert "bench.yaml:10: channels.ch2.cycler: 'smu1' is already the cycler of channel 'ch1'" in out


def test_a_goto_that_can_loop_forever_is_warned_of(tmp_path: Path) -> None:
    code, out = validate(tmp_path, """\
        name: loop
        steps:
          - charge: {current: C/20, until: 4.2 V, label: top}
          - rest: {until: [1 h, {voltage: "> 3.0 V", then: top}]}
    """)
    assert code == 0 and "valid" in out
    assert "warning: p.yaml:4: steps[1]: goto 'top' jumps back with no time limit around it" in out
    code, out = validate(tmp_path, """\
        name: bounded
        steps:
          - repeat: 1
            time_limit: 2 d
            steps:
              - charge: {current: C/20, until: 4.2 V, label: top}
              - rest: {until: [1 h, {voltage: "> 3.0 V", then: top}]}
    """)
    assert code == 0 and "warning" not in out


def test_every_command_given_a_file_that_is_not_a_run_says_so_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    profile = tmp_path / "some.yaml"
    profile.write_text("name: x\nsteps:\n  - rest: 1 min\n")
    foreign = tmp_path / "other.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE x (a)").connection.commit()
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["report", str(profile)], ["export", str(profile)], ["compare", str(profile), str(foreign)],
                 ["export", str(foreign)], ["report", str(tmp_path / "gone.sqlite")], ["resume", str(profile)]):
        result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
        assert "not a cellbench run database" in lines[0] or "no run database" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray report or export folder
    assert sqlite3.connect(foreign).execute("SELECT name FROM sqlite_master").fetchall() == [("x",)]  # untouched


def test_a_dry_run_of_a_bench_file_rehearses_its_channels_and_cells(tmp_path: Path) -> None:
    from cellbench.bench.runtime.store import open_run

    bench = tmp_path / "bench.yaml"
    bench.write_text(textwrap.dedent("""\
        name: two-cells
        operator: ana
        instruments:
          smu1: {driver: keithley2450, resource: "TCPIP::10.0.0.5::5025::SOCKET"}
          smu2: {driver: keithley2450, resource: "TCPIP::10.0.0.6::5025::SOCKET"}
        cells:
          a: {id: P-1, capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}
          b: {id: P-2, capacity: 7 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V, area: 2 cm^2}
        channels:
          ch1: {cycler: smu1, cell: a}
          ch2: {cycler: smu2, cell: b}
    """))
    profile = tmp_path / "one.yaml"
    profile.write_text("name: one cycle\nsample_period: 1 min\nsteps:\n  - charge: {current: C/20, until: 4.2 V}\n"
                       "  - discharge: {current: C/20, until: 2.5 V}\n")
    result = CliRunner().invoke(app, ["run", str(profile), "--dry-run", "--bench", str(bench), "--runs-dir",
                                      str(tmp_path / "runs")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    (a,) = (tmp_path / "runs").glob("*Z-P-1.sqlite")
    (b,) = (tmp_path / "runs").glob("*Z-P-2.sqlite")
    discharged = {}
    for db in (a, b):
        with open_run(db) as store:
            meta = store.metadata()
            assert meta["rehearsal_of"] == "two-cells" and meta["operator"] == "ana" and meta["clock"] == "virtual"
            discharged[meta["cell_id"]] = max(s.discharge_ah for s in store.samples())
    # each channel's own cell: C/20 of 3.5 mAh and of 7 mAh (twice the area, the same areal physics)
    assert discharged["P-2"] / discharged["P-1"] == pytest.approx(2.0, rel=0.01)


def test_a_web_server_on_the_instruments_port_is_named_as_such(tmp_path: Path) -> None:
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bench = tmp_path / "bench.yaml"
        bench.write_text(textwrap.dedent(f"""\
            name: web
            instruments:
              smu1: {{driver: keithley2450, resource: "TCPIP::127.0.0.1::{server.server_address[1]}::SOCKET"}}
            cells:
              c: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
            channels:
              ch1: {{cycler: smu1, cell: c}}
        """))
        profile = tmp_path / "p.yaml"
        profile.write_text("name: x\nsteps:\n  - rest: 1 min\n")
        result = CliRunner().invoke(app, ["run", str(profile), "--bench", str(bench), "--runs-dir",
                                          str(tmp_path / "runs")], env={"COLUMNS": "300"})
    finally:
        server.shutdown()
    assert result.exit_code == 1
    assert "a web server answers at that address, not an instrument" in result.output
    assert "switch the instrument to SCPI" not in result.output


def test_a_bench_is_validated_channel_by_channel_with_each_channels_own_profile(tmp_path: Path) -> None:
    """Channels that name their own profile are checked with it, the others with the one given: an owner's
    profile is not checked against the other channels (it once gave 110 false errors), and a fault in a
    channel's own profile is found though the profile given is fine."""
    own = tmp_path / "own.yaml"
    own.write_text("name: owner's\nsteps:\n  - charge: {current: 1 mA, until: 4.25 V}\n")
    (tmp_path / "bench.yaml").write_text(textwrap.dedent(f"""\
        name: oven
        instruments:
          smu1: {{driver: keithley2450, resource: "TCPIP::127.0.0.1::5025::SOCKET"}}
          smu2: {{driver: keithley2450, resource: "TCPIP::127.0.0.1::5026::SOCKET"}}
        cells:
          high: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
          low: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.1 V}}
        channels:
          ch1: {{cycler: smu1, cell: high, profile: {own}}}
          ch2: {{cycler: smu2, cell: low}}
    """))
    code, out = validate(tmp_path, "name: shared\nsteps:\n  - charge: {current: 1 mA, until: 4.0 V}\n",
                         "--bench", str(tmp_path / "bench.yaml"))
    assert code == 0, out
    assert "ch1: own.yaml (owner's)" in out and "ch2: p.yaml (shared)" in out
    own.write_text("name: owner's\nsteps:\n  - rest: 1 min\n  - charge: {current: 1 mA, until: 4.35 V}\n")
    code, out = validate(tmp_path, "name: shared\nsteps:\n  - charge: {current: 1 mA, until: 4.0 V}\n",
                         "--bench", str(tmp_path / "bench.yaml"))
    assert code == 2 and "own.yaml:4: steps[1].charge" in out and "(bench 'oven', channel 'ch1')" in out, out
    assert "p.yaml" not in out  # the profile given is fine for the channel it runs on
    result = CliRunner().invoke(app, ["validate", "--bench", str(tmp_path / "bench.yaml"), "--no-estimate"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "own.yaml:4" in result.output  # a bench alone: its channels' own profiles


@pytest.mark.parametrize("estimate", ["--estimate", "--no-estimate"])
def test_charging_denser_than_the_cells_limit_is_refused_unless_allowed(tmp_path: Path, estimate: str) -> None:
    """10 mA/cm² on a lithium pellet once printed `valid` and exit 0 with a warning after it (none with
    --no-estimate): it is an error now, by the cell's declared limit or the lithium-metal default, and runs only
    when the operator says so."""
    dense = "name: dense\nsteps:\n  - rest: 1 min\n  - charge: {current: 10 mA, until: [4.2 V, 1 min]}\n"
    (tmp_path / "p.yaml").write_text(dense)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "p.yaml"), estimate], env={"COLUMNS": "300"})
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "valid" not in out, out
    assert ("p.yaml:4: steps[1].charge: current 10 mA charges at 10 mA/cm² on 1 cm², above the 2.5 mA/cm² that "
            "cell 'simulated pellet' takes (max_charge_current_density)") in out
    allowed = CliRunner().invoke(app, ["validate", str(tmp_path / "p.yaml"), "--no-estimate",
                                       "--allow-current-density"])
    assert allowed.exit_code == 0 and "valid" in allowed.output
    # a cell's own limit, declared in the bench file, is tighter: 1 mA/cm² on a 0.785 cm² pellet is 0.785 mA
    (tmp_path / "bench.yaml").write_text(textwrap.dedent("""\
        name: desk
        instruments:
          smu1: {driver: keithley2450, resource: "TCPIP::127.0.0.1::5025::SOCKET"}
        cells:
          P-7: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V, area: 0.785 cm^2,
                max_charge_current_density: 1 mA/cm^2}
        channels:
          ch1: {cycler: smu1, cell: P-7}
    """))
    (tmp_path / "p.yaml").write_text("name: fine\nsteps:\n  - charge: {current: 0.7 mA, until: 4.2 V}\n"
                                     "  - charge: {current: 0.8 mA, until: 4.2 V}\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "p.yaml"), "--bench", str(tmp_path / "bench.yaml"),
                                      "--no-estimate"], env={"COLUMNS": "300"})
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "p.yaml:4: steps[1].charge: current 800 µA charges at 1.02 mA/cm²" in out, out
    assert "p.yaml:3" not in out


def test_the_estimates_dry_run_leaves_nothing_in_the_runs_registry(tmp_path: Path) -> None:
    """validate's estimate is a throwaway dry run: `cellbench runs` never lists it (its database is gone)."""
    (tmp_path / "p.yaml").write_text("name: rest\nsample_period: 1 min\nsteps:\n  - rest: 10 min\n")
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "p.yaml")],
                                env={"COLUMNS": "300", "CELLBENCH_STATE_DIR": str(state)})
    assert result.exit_code == 0 and "estimated" in result.output.lower(), result.output
    assert not list(state.rglob("*.json"))


def test_the_bench_file_reference_is_the_models_own() -> None:
    """docs/bench-file.md lists every key of every section and every driver, generated from the models: a key added
    without regenerating it fails here."""
    from cellbench.bench.runner.config import BenchConfig, reference

    doc = (Path(__file__).resolve().parent.parent / "docs" / "bench-file.md").read_text()
    assert doc == reference(), "out of date: python -m cellbench.bench.runner.config > docs/bench-file.md"
    assert all(f"| `{key}` |" in doc for key in BenchConfig.model_fields)


def test_the_first_instrument_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """docs/first-instrument.md against `cellbench sim serve keithley2450` standing in for the real 2450 (its
    address the only change): the *IDN? one-liner, validate, the rehearsal, then the real run, stopped with
    Ctrl-C after a few seconds (its charge would last an hour): the output goes off and the record says why."""
    import re
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from tests.test_cli import serve
    from tests.test_unattended import ask, run_env

    doc = (Path(__file__).resolve().parent.parent / "docs" / "first-instrument.md").read_text()
    sim, resource = serve("keithley2450", "--port", "0", "--soc", "0.3")
    try:
        doc = doc.replace("TCPIP::192.168.1.50::5025::SOCKET", resource)
        for block in re.findall(r"```yaml\n# (\S+)\n(.*?)```", doc, re.S):
            (tmp_path / block[0]).write_text(block[1])
        commands = [line for block in re.findall(r"```sh\n(.*?)```", doc, re.S) for line in block.splitlines()]
        env = {**run_env(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
        idn, validate, rehearse, real = commands
        said = subprocess.run(shlex.split(idn), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
        assert said.returncode == 0 and said.stdout.startswith("KEITHLEY INSTRUMENTS,MODEL 2450"), said.stderr
        for line in (validate, rehearse):
            done = subprocess.run(shlex.split(line), capture_output=True, text=True, cwd=tmp_path, env=env,
                                  timeout=300)
            assert done.returncode == 0, line + "\n" + done.stdout[-2000:] + done.stderr[-2000:]
        proc = subprocess.Popen(shlex.split(real), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp_path, env=env)
        time.sleep(6.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert ask(resource, ":OUTP?") == "0"
        import sqlite3

        ends = []
        for db in (tmp_path / "runs").glob("*.sqlite"):
            with sqlite3.connect(db) as con:
                ends += [m for (m,) in con.execute("SELECT message FROM events WHERE kind = 'end'")]
        assert sorted(ends) == ["completed", "interrupted: SIGINT received"], ends  # the rehearsal, the real run
    finally:
        sim.terminate()
        sim.wait(timeout=10)


@pytest.mark.xdist_group("fixed-ports")  # the README serves on the simulators' default ports
def test_the_readmes_shell_commands_run_as_written(tmp_path: Path) -> None:
    """Every `cellbench` line of the README's "Using it" and "Profiles" blocks, run as written from a folder where
    the repository's paths resolve: the ones that end do so with exit 0; each `sim serve` announces where it
    serves, then is stopped; a run on real instruments (desk.yaml's addresses) is left to the lab."""
    import concurrent.futures
    import re
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    blocks = [readme[readme.index("## Using it"):readme.index("### Runs, status and logs")],
              readme[readme.index("## Profiles"):readme.index("## A lab's benches on one broker")]]
    lines = [line.split("  #")[0].strip() for block in blocks for sh in re.findall(r"```sh\n(.*?)```", block, re.S)
             for line in sh.splitlines() if line.startswith("cellbench ")]
    (tmp_path / "cellbench").symlink_to(root / "cellbench")  # `cellbench/profiles/...` as written
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "COLUMNS": "200", "PYTHONPATH": str(root),
           "CELLBENCH_STATE_DIR": str(tmp_path / "state"), "CELLBENCH_LOCK_DIR": str(tmp_path / "locks")}
    ran = served = 0
    # the commands that end run two at a time (a dry run of a 17-channel bench takes a minute and a half alone)
    ending = [line for line in lines if " sim serve " not in f" {line} "
              and not (line.startswith("cellbench run ") and "--dry-run" not in line)]

    def finish(line: str) -> None:
        args = [sys.executable, "-m", "cellbench", *shlex.split(line)[1:]]
        done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(finish, line) for line in ending]:
            future.result()
            ran += 1
    for line in lines:
        args = [sys.executable, "-m", "cellbench", *shlex.split(line)[1:]]
        if " sim serve " in f" {line} ":
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                                    env=env)
            assert proc.stdout is not None
            said = ""
            while "serving" not in said and (line_out := proc.stdout.readline()):  # a library may log first
                said += line_out
            proc.terminate()
            proc.wait(timeout=10)
            assert "serving" in said, f"{line}: {said}"
            served += 1
        # the others ran above; a run on real instruments (desk.yaml's addresses) is the lab's
    assert ran >= 7 and served >= 7, (ran, served)


def test_the_readmes_python_and_data_blocks_run_as_written(tmp_path: Path) -> None:
    """The README's pyvisa snippet against a served 2450 (its address put in), its "From Python" block as written
    from a folder holding a `cycle.yaml` and a `bench.yaml` on that 2450, and its "Data" commands on the runs the
    block made (`runs/<run>.sqlite`, `runs/a.sqlite` and `runs/b.sqlite` named by them)."""
    import re
    import shlex
    import subprocess
    import sys

    from tests.test_cli import serve
    from tests.test_unattended import files

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()

    def block(after: str, kind: str) -> str:
        return str(re.findall(rf"```{kind}\n(.*?)```", readme[readme.index(after):], re.S)[0])

    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "COLUMNS": "200", "PYTHONPATH": str(root),
           "CELLBENCH_STATE_DIR": str(tmp_path / "state"), "CELLBENCH_LOCK_DIR": str(tmp_path / "locks"),
           "HOME": str(tmp_path)}
    proc, resource = serve("keithley2450", "--port", "0", "--soc", "0.6")
    try:
        snippet = block("Any VISA client can drive the simulator too", "python")
        assert "TCPIP::127.0.0.1::5025::SOCKET" in snippet
        said = subprocess.run([sys.executable, "-c", snippet.replace("TCPIP::127.0.0.1::5025::SOCKET", resource)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert said.returncode == 0 and said.stdout.startswith("KEITHLEY INSTRUMENTS,MODEL 2450"), said.stderr

        (tmp_path / "cycle.yaml").write_text("name: cycle\nsample_period: 0.5 s\nsteps:\n"
                                             "  - discharge: {current: 0.2 mA, until: 2 s}\n")
        files(tmp_path, resource)  # bench.yaml: one channel on the served 2450
        python = block("## From Python", "python")
        ran = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=600,
                             env=env, cwd=tmp_path)
        assert ran.returncode == 0, ran.stdout[-1500:] + ran.stderr[-1500:]
        assert ran.stdout.startswith("completed ")  # the real-time run on the served 2450
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    dbs = sorted((tmp_path / "runs").glob("*.sqlite"), key=lambda p: p.stat().st_mtime)
    assert len(dbs) == 2, dbs
    first, second = dbs  # the dry run of formation-and-cycling, then the run on the 2450
    for line in block("Turn a run into answers", "sh").splitlines():
        command = line.split("  #")[0].strip()
        command = command.replace("runs/<run>.sqlite", str(first)).replace("runs/a.sqlite", str(first))
        command = command.replace("runs/b.sqlite", str(first))  # compare: the same cell twice
        done = subprocess.run([sys.executable, "-m", "cellbench", *shlex.split(command)[1:]], capture_output=True,
                              text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
    assert list(tmp_path.glob("runs/*.bdf.csv")) and list(tmp_path.glob("runs/*/index.html"))
    import sqlite3

    with sqlite3.connect(second) as con:  # the run on the 2450, in its own database, ended as its profile did
        assert con.execute("SELECT message FROM events WHERE kind = 'end'").fetchone() == ("completed",)
