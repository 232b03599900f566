"""The command line as people use it: sim serve for any client, run against it, and the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pyvisa
from pyvisa.resources import MessageBasedResource
from typer.testing import CliRunner

from cellbench.bench.faces.cli import app
from cellbench.bench.results.export import export_run
from cellbench.bench.results.report import write_report
from cellbench.bench.runtime.store import open_run


def announced(*args: str, pattern: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """`cellbench sim serve ...` as its own process; returns it and the match of `pattern` in what it announced."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellbench", "sim", "serve", "--exit-with-parent", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"},
    )
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(pattern, line):
            return proc, m
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError(f"sim serve {' '.join(args)} did not announce where it serves")


def serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`cellbench sim serve ...` as its own process; returns it and the resource it announced."""
    proc, m = announced(*args, pattern=r"((TCPIP::127\.0\.0\.1::\d+::SOCKET)|(ASRL\S+::INSTR))")
    return proc, m.group(1)


@pytest.fixture
def served() -> Iterator[str]:
    """A simulated 2450 served by `cellbench sim serve keithley2450 --port 0`."""
    proc, resource = serve("keithley2450", "--port", "0", "--soc", "0.5")
    yield resource
    proc.terminate()
    proc.wait(timeout=10)


def test_a_served_chamber_on_a_serial_line_answers_a_plain_pyvisa_client() -> None:
    proc, resource = serve("espec", "--serial")
    try:
        rm = pyvisa.ResourceManager("@py")
        inst = cast(MessageBasedResource, rm.open_resource(resource, read_termination="\r\n",
                                                           write_termination="\r\n", timeout=3000))
        assert inst.query("TYPE?") == "T,S2,160.0"
        assert inst.query("TEMP, S40.0") == "OK:TEMP, S40.0"
        assert inst.query("TEMP?").split(",")[1] == "40.0"
        inst.close()
        rm.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_served_press_answers_a_plain_modbus_client() -> None:
    from pymodbus.client import ModbusTcpClient

    proc, resource = serve("press", "--port", "0")
    try:
        port = int(resource.split("::")[2])
        client = ModbusTcpClient("127.0.0.1", port=port)
        assert client.connect()  # type: ignore[no-untyped-call]
        regs = client.read_holding_registers(0, count=4, device_id=1).registers
        force = client.convert_from_registers(regs[2:4], client.DATATYPE.FLOAT32)
        assert force == pytest.approx(0.5)  # 5 MPa on the 1 cm² pellet
        client.close()  # type: ignore[no-untyped-call]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_plain_pyvisa_client_can_drive_the_served_simulator(served: str) -> None:
    rm = pyvisa.ResourceManager("@py")
    inst = cast(MessageBasedResource, rm.open_resource(served, read_termination="\n", write_termination="\n",
                                                       timeout=3000))
    try:
        assert inst.query("*IDN?").startswith("KEITHLEY INSTRUMENTS,MODEL 2450,")
        inst.write(":SOUR:FUNC CURR;:SOUR:CURR:VLIM 4.3;:SOUR:CURR -0.0005;:SENS:FUNC 'VOLT';:OUTP ON")
        volts, amps = (float(x) for x in inst.query(':READ? "defbuffer1", READ, SOUR').split(","))
        assert 3.7 < volts < 3.81 and amps == pytest.approx(-5e-4)
        assert inst.query(":SYST:ERR?") == '0,"No error;0;0 0"'
        inst.write(":OUTP OFF")
    finally:
        inst.close()
        rm.close()


def test_cellbench_run_drives_a_served_simulator_in_real_time(served: str, tmp_path: Path) -> None:
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        textwrap.dedent(
            f"""\
            name: desk
            instruments:
              smu1: {{driver: keithley2450, resource: "{served}", timeout: 2 s}}
            cells:
              pellet-01: {{id: P-0142, batch: B7, capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V,
                           area: 0.5 cm^2, loading: 20 mg/cm^2}}
            channels:
              ch1: {{cycler: smu1, cell: pellet-01}}
            operator: ana
            """
        )
    )
    profile = tmp_path / "quick.yaml"
    profile.write_text(
        "name: quick\nsample_period: 0.25 s\nsteps:\n"
        "  - charge: {current: C/10, until: 1 s}\n  - rest: 1 s\n  - discharge: {current: C/10, until: 1 s}\n"
    )
    result = CliRunner().invoke(app, ["run", str(profile), "--bench", str(bench), "--runs-dir", str(tmp_path),
                                      "--comment", "after the warm press"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ch1 (cell P-0142): per-cycle summary" in result.output and "mAh/g" in result.output
    (db,) = tmp_path.glob("*Z-P-0142.sqlite")  # named by the run's UTC start and the cell's ID
    with open_run(db) as store:
        meta = store.metadata()
        assert (meta["cell_id"], meta["cell"]["batch"], meta["operator"], meta["comment"]) == (
            "P-0142", "B7", "ana", "after the warm press")
        assert meta["cell"]["active_mass_g"] == pytest.approx(0.01)  # 20 mg/cm² over 0.5 cm²
        samples = store.samples()
        assert [st["end_reason"] for st in store.steps()] == ["time 1 s"] * 3
    assert {s.step_type for s in samples} == {"CC Charge", "Rest", "CC Discharge"}
    assert max(s.charge_ah for s in samples) == pytest.approx(3.5e-4 / 3600, rel=0.05)
    page = write_report(db, tmp_path / "report").read_text()
    assert "Cell P-0142, batch B7, active mass 10 mg, area 0.5 cm², operator ana, comment after the warm" in page
    sidecar = json.loads(export_run(db, tmp_path / "export")["metadata"].read_text())
    assert (sidecar["cell_id"], sidecar["operator"], sidecar["cell"]["loading"]) == ("P-0142", "ana", 20.0)


def test_cellbench_run_names_a_bad_bench_file_line(tmp_path: Path) -> None:
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "instruments:\n  smu1: {driver: keithley2450, resource: 'TCPIP::127.0.0.1::1::SOCKET'}\n"
        "cells:\n  c1: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}\n"
        "channels:\n  ch1: {cycler: smu2, cell: c1}\n"
    )
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nsteps:\n  - rest: 1 s\n")
    result = CliRunner().invoke(app, ["run", str(profile), "--bench", str(bench)])
    assert result.exit_code == 2
    assert "bench.yaml:6: channels.ch1.cycler: 'smu2' is not among the instruments (smu1)" in result.output


def test_cellbench_run_reports_an_unreachable_instrument(tmp_path: Path) -> None:
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "instruments:\n  smu1: {driver: keithley2450, resource: 'TCPIP::127.0.0.1::9::SOCKET', timeout: 1 s}\n"
        "cells:\n  c1: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}\n"
        "channels:\n  ch1: {cycler: smu1, cell: c1}\n"
    )
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nsteps:\n  - rest: 1 s\n")
    result = CliRunner().invoke(app, ["run", str(profile), "--bench", str(bench), "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "smu1: cannot connect to 127.0.0.1:9" in result.output.replace("\n", "")


def test_cellbench_demo_prints_the_cycle_table(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--runs-dir", str(tmp_path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    rows = re.findall(r"│\s+(\d)\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│", result.output)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    ce = [float(r[3]) for r in rows]  # coulombic efficiency, %
    assert 85.0 < ce[0] < 95.0  # the first charge of a fresh cell builds its interphases
    assert all(99.0 < x < 101.0 for x in ce[1:])
    assert "run database:" in result.output


def test_validate_estimates_the_duration_by_a_dry_run() -> None:
    result = CliRunner().invoke(app, ["validate", "formation-and-cycling"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    m = re.search(r"estimated duration on a simulated pellet cell at 25 degC: ([\d.]+) h", result.output)
    assert m and 120 < float(m.group(1)) < 150
    assert "estimating the duration" not in result.output  # the status line is for a terminal only


def test_run_dry_run_records_like_a_real_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", "hppc", "--dry-run", "--runs-dir", str(tmp_path), "--soc", "0.9"], env={"COLUMNS": "160"}
    )
    assert result.exit_code == 0, result.output
    (db,) = tmp_path.glob("*Z-pellet.sqlite")  # the simulated cell's ID
    with open_run(db) as store:
        meta = store.metadata()
        assert meta["clock"] == "virtual" and meta["simulation"]["initial_soc"] == 0.9
        assert meta["profile_name"] == "HPPC / DCIR"
        assert len(store.steps()) > 10 and store.samples()


def test_run_without_a_bench_says_what_to_do() -> None:
    result = CliRunner().invoke(app, ["run", "hppc"])
    assert result.exit_code == 2
    assert "--bench BENCH.yaml" in result.output


@pytest.mark.parametrize("name", ["desk", "pressure-rig"])
def test_the_example_bench_files_are_valid(name: str, tmp_path: Path) -> None:
    from cellbench.bench.runner.config import load_bench
    from cellbench.profiles.parse import InputError

    path = Path(__file__).parent.parent / "cellbench" / "bench" / "examples" / f"{name}.yaml"
    bench = load_bench(path)
    for channel in bench.channels.values():  # every channel's cycler is a registered driver that can cycle
        assert "cycler" in bench.instruments[channel.cycler].roles
    # a run records its bench as written, units and all, and a resume reads it back as it was
    assert type(bench).model_validate(bench.as_written()) == bench
    # the same file with a misspelt driver is refused at its line, naming the registered drivers
    text = path.read_text()
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "driver: keithley2450" in row)
    broken = tmp_path / f"{name}.yaml"
    broken.write_text(text.replace("driver: keithley2450", "driver: keithly2450", 1))
    with pytest.raises(InputError) as caught:
        load_bench(broken)
    assert any(p.startswith(f"{name}.yaml:{line}:") and "unknown driver 'keithly2450'" in p and "palmsens" in p
               for p in caught.value.problems), caught.value.problems


def test_each_driver_reads_its_entry_with_its_own_keys(tmp_path: Path) -> None:
    """A key of another driver is refused at its line with the keys this driver takes; each driver's own keys
    reach its open request; an entry written back by the bench is read again by the same driver's model."""
    from cellbench.bench.runner.config import load_bench
    from cellbench.drivers.maccor import MaccorSettings
    from cellbench.profiles.parse import InputError

    def bench(instruments: str, channel: str = "") -> Path:
        path = tmp_path / "b.yaml"
        path.write_text("instruments:\n" + instruments + "cells:\n  c: {capacity: 3 mAh, voltage_min: 2.5 V, "
                        "voltage_max: 4.3 V}\nchannels:\n  ch1: {cycler: smu1, cell: c" + channel + "}\n")
        return path

    with pytest.raises(InputError) as caught:
        load_bench(bench('  smu1: {driver: keithley2450, resource: "TCPIP::h::5025::SOCKET", device_id: 3}\n'))
    (said,) = caught.value.problems  # one line: the 2450's own model, not every driver's
    assert said.startswith("b.yaml:2: instruments.smu1: unknown instrument key 'device_id'")
    assert "baud_rate" in said and "login_file" not in said and "owner" not in said
    with pytest.raises(InputError, match=r"b.yaml:3: instruments.box: 'driver' is required"):
        load_bench(bench('  smu1: {driver: keithley2450, resource: "TCPIP::h::5025::SOCKET"}\n'
                         '  box: {resource: "TCPIP::h::57570::SOCKET"}\n'))
    b = load_bench(bench('  smu1: {driver: maccor, resource: "TCPIP::h::57570::SOCKET", binary_port: 57561, '
                         'watchdog: 30 s}\n', ", cycler_channel: 0"))
    box = b.instruments["smu1"]
    assert isinstance(box, MaccorSettings)
    request = box.request("smu1", 1.0)
    assert (request.binary_port, request.watchdog, request.address, request.device_id) == (57561, 30.0, None, 1)
    assert type(b).model_validate(b.as_written()) == b
    assert b.as_written()["instruments"]["smu1"]["watchdog"] == "30.0 s"


def test_an_estimate_is_bounded_by_simulated_time_and_the_same_on_any_machine() -> None:
    from cellbench.bench.faces.simbench import estimate_duration
    from cellbench.profiles.library import library_path
    from cellbench.profiles.parse import load_profile

    profile, text = load_profile(library_path("formation-and-cycling"))
    bounded = estimate_duration(profile, text, limit=20 * 3600)
    assert not bounded.complete and 20 * 3600 < bounded.seconds < 21 * 3600
    assert "more than 20.0 h" in bounded.describe("pellet", 25)
    reached: list[float] = []  # what a terminal's status line is told as the dry run goes
    whole = [estimate_duration(profile, text, on_progress=reached.append), estimate_duration(profile, text)]
    assert whole[0] == whole[1] and whole[0].complete and whole[0].completed  # deterministic, to the sample
    assert 130 * 3600 < whole[0].seconds < 140 * 3600
    assert len(reached) > 1000 and reached == sorted(reached) and reached[-1] <= whole[0].seconds


def test_validate_says_when_and_why_the_simulated_cell_shorts() -> None:
    result = CliRunner().invoke(app, ["validate", "cycle-life"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert re.match(r"the simulated run on a simulated pellet cell at 25 degC ends early, at \d+\.\d h: "
                    r"safety stop: hard short", line), line
    # C/3 of 3.5 mAh on 1 cm²: 1.17 mA/cm², against the model's 0.3 mA/cm² at 25 degC and 5 MPa
    assert ("charging at 1.17 mA/cm² is above the simulated cell's critical current density (0.3 mA/cm² at "
            "25 degC and 5 MPa); try 65 degC or C/20") in line


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_sim_serve_with_exit_with_parent_ends_when_its_starter_is_killed(tmp_path: Path) -> None:
    starter = tmp_path / "starter.py"
    starter.write_text(textwrap.dedent("""\
        import subprocess, sys, time
        sim = subprocess.Popen([sys.executable, "-m", "cellbench", "sim", "serve", "keithley2450",
                                "--port", "0", "--exit-with-parent"], stdout=subprocess.PIPE, text=True,
                               env={**__import__("os").environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"})
        print(sim.pid, flush=True)
        print(sim.stdout.readline(), end="", flush=True)
        time.sleep(600)
        """))
    parent = subprocess.Popen([sys.executable, str(starter)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        assert "serving a simulated Keithley 2450" in parent.stdout.readline()
        assert _running(pid)
        parent.kill()  # as a test runner killed with -9: no chance to stop its children
        parent.wait()
        deadline = time.monotonic() + 20
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(pid), "the simulator outlived the process that started it"
    finally:
        if _running(pid):
            os.kill(pid, 9)


def test_every_commands_help_is_printed() -> None:
    """Every command and subcommand, found from the app itself so a new one is covered too: its --help exits 0
    and shows its own usage (a '[/prefix]' in an option's help once crashed `status --help` as rich markup)."""
    import typer

    def walk(group: Any, path: list[str]) -> list[list[str]]:
        found = [path]
        for name, sub in group.commands.items():
            found += walk(sub, [*path, name]) if hasattr(sub, "commands") else [[*path, name]]
        return found

    commands = walk(typer.main.get_group(app), [])
    assert ["status"] in commands and ["mqtt", "check"] in commands and ["sim", "serve"] in commands
    for words in commands:
        result = CliRunner().invoke(app, [*words, "--help"])
        assert result.exit_code == 0, (words, result.output)
        assert "Usage:" in result.output and " ".join(words) in result.output, words


def test_sim_serve_help_names_every_instrument_that_has_a_simulator() -> None:
    from cellbench.drivers.registry import drivers

    result = CliRunner().invoke(app, ["sim", "serve", "--help"], env={"COLUMNS": "300"})
    said = " ".join(result.output.split())
    served = [name for name, spec in drivers().items() if spec.simulator is not None]
    assert "maccor" in served and "arbin" in served
    assert all(name in said for name in served), (served, said)


def test_runs_leaves_out_runs_whose_database_is_gone_and_prune_forgets_them(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cellbench.bench.ops import runs
    monkeypatch.setenv("CELLBENCH_STATE_DIR", str(tmp_path / "state"))
    kept, gone = tmp_path / "20261207T000000Z-A.sqlite", tmp_path / "20261207T000001Z-B.sqlite"
    kept.write_bytes(b"")
    for db in (kept, gone):
        runs.begin(db, channel="ch1", cell_id=db.stem[-1], bench="b", profile="p", clock="real")

    def listed(*args: str) -> list[str]:
        result = CliRunner().invoke(app, ["runs", "--json", *args])
        assert result.exit_code == 0, result.output
        return sorted(e["cell_id"] for e in json.loads(result.output))

    assert listed() == ["A"] and listed("--all") == ["A", "B"]
    pruned = CliRunner().invoke(app, ["runs", "--prune"])
    assert pruned.exit_code == 0 and "forgot 1 run(s)" in pruned.output
    assert listed("--all") == ["A"] and kept.exists()


def test_an_unreachable_instrument_on_the_visa_backend_is_one_line_too(tmp_path: Path) -> None:
    """`backend: visa` (offered in the example bench file) once turned an unreachable 2450 into a 308-line
    traceback: pyvisa-py lets the socket's own error through. One line and exit 1, as the default backend."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "bench.yaml").write_text(textwrap.dedent(f"""
        name: v
        instruments:
          smu1: {{driver: keithley2450, resource: "TCPIP::127.0.0.1::{port}::SOCKET", backend: visa, timeout: 1 s}}
        cells:
          c: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
        channels:
          ch1: {{cycler: smu1, cell: c}}
    """))
    (tmp_path / "r.yaml").write_text("name: r\nsteps:\n  - rest: 1 min\n")
    done = subprocess.run([sys.executable, "-m", "cellbench", "run", str(tmp_path / "r.yaml"), "--bench",
                           str(tmp_path / "bench.yaml"), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CELLBENCH_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"})
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 1 and len(said) == 1 and said[0].startswith("smu1: "), said


def test_runs_and_status_off_a_terminal_are_not_squeezed_into_80_columns(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Piped to grep or a file, a table keeps each run on one line with its whole database path."""
    from cellbench.bench.ops import runs
    state = tmp_path / "state"
    monkeypatch.setenv("CELLBENCH_STATE_DIR", str(state))
    monkeypatch.delenv("COLUMNS", raising=False)
    db = tmp_path / ("a-long-folder-name-that-a-lab-would-use" * 2) / "20261207T000000Z-P-0142.sqlite"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    runs.end(runs.begin(db, channel="ch1", cell_id="P-0142", bench="b", profile="formation", clock="real"),
             "completed", "completed")
    listed = subprocess.run([sys.executable, "-m", "cellbench", "runs"], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ))
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "P-0142" in line and "formation" in line]
    assert len(rows) == 1, listed.stdout
    (row,) = rows
    assert str(db) in row  # the whole path on the run's own line


def test_status_watch_refreshes_on_the_clock_not_a_blocking_sleep() -> None:
    """`status --watch` refreshes through the clock abstraction: on a virtual clock three refreshes 2 s apart
    take 6 s of its time and no wall time, each at its own moment."""
    from cellbench.bench.faces.cli.watching import watch_status
    from cellbench.bench.runtime.clock import VirtualClock

    clock = VirtualClock()
    seen: list[float] = []

    async def main() -> None:
        start = clock.now()
        await watch_status(clock, 2.0, lambda: seen.append(clock.now() - start), times=3)

    began = time.perf_counter()
    clock.run(main())
    assert seen == pytest.approx([2.0, 4.0, 6.0]) and time.perf_counter() - began < 1.0
