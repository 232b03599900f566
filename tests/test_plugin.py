"""The pytest plugin as a lab's CI meets it: a separate pytest run (pytester, in a subprocess) with the plugin
loaded from the installed entry point, simulated instruments behind plain pyvisa, dry runs, profiles as tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import cast

import pytest
from pyvisa.resources import MessageBasedResource

pytest_plugins = ["pytester"]


def test_fixtures_serve_simulated_instruments_to_a_labs_own_pyvisa_code(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lab=textwrap.dedent("""
        import pytest
        import pyvisa

        def query(resource, command, timeout=3000, settings=()):
            rm = pyvisa.ResourceManager("@py")
            inst = rm.open_resource(resource, read_termination="\\n", write_termination="\\n", timeout=timeout)
            try:
                for setting in settings:
                    inst.write(setting)
                return inst.query(command)
            finally:
                inst.close()
                rm.close()

        def test_identifies(keithley2450):
            assert "2450" in query(keithley2450, "*IDN?")

        @pytest.mark.cellbench(soc=0.95)
        def test_a_charged_cell(cellbench_serve):
            resource = cellbench_serve("keithley2450")
            volts = query(resource, ":MEAS:VOLT?", settings=(":SOUR:FUNC CURR", ":SOUR:CURR 0", ":OUTP ON"))
            assert float(volts) > 4.15

        def test_pymeasure_drives_it_too(keithley2450):
            from pymeasure.instruments.keithley import Keithley2450

            smu = Keithley2450(keithley2450, visa_library="@py", read_termination="\\n", write_termination="\\n")
            try:
                assert "MODEL 2450" in smu.id
            finally:
                smu.adapter.close()

        @pytest.mark.cellbench(faults=("silent",))
        def test_a_silent_instrument_times_out(keithley2450):
            with pytest.raises(pyvisa.errors.VisaIOError):
                query(keithley2450, "*IDN?", timeout=500)
    """))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_dry_run_fixture_gives_frames_and_helpers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_dry=textwrap.dedent("""
        import pytest

        PROFILE = '''
        name: two cycles
        sample_period: 5 min
        steps:
          - repeat: 2
            steps:
              - charge: {current: C/5, until: 4.3 V}
              - discharge: {current: C/5, until: 2.5 V}
        '''

        @pytest.mark.cellbench(temperature=60.0)
        def test_cycles(cellbench_dry_run):
            run = cellbench_dry_run(PROFILE)
            assert run.completed and run.safety_events() == []
            assert list(run.cycles["cycle"]) == [1, 2]
            assert run.retention_above(0.95) and not run.retention_above(1.01)
            assert run.last_step == ("CC Discharge", "voltage <= 2.5 V")
            assert {"Voltage / V", "Current / A"} <= set(run.samples.columns)

        async def test_inside_a_running_loop(cellbench_dry_run):
            assert cellbench_dry_run("formation", temperature=60.0).completed
    """))
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_profiles_are_collected_as_tests_with_file_line_failures(pytester: pytest.Pytester) -> None:
    profiles = pytester.mkdir("profiles")
    (profiles / "good.yaml").write_text("name: good\nsample_period: 1 min\nsteps:\n"
                                        "  - discharge: {current: C/10, until: [2.5 V, 30 min]}\n")
    (profiles / "typo.yaml").write_text("name: typo\nsample_period: 1 min\nsteps:\n"
                                        "  - dischrage: {current: C/10, until: 2.5 V}\n")
    (profiles / "too-high.yaml").write_text("name: high\nsample_period: 1 min\nsteps:\n"
                                            "  - charge: {current: 1 mA, until: 4.5 V}\n")
    # 1 mA/cm2 at 25 degC is above the lithium's critical current density: the simulated cell shorts
    (profiles / "shorts.yaml").write_text("name: shorts\nsample_period: 1 min\n"
                                          "steps:\n  - charge: {current: 1 mA, until: [4.3 V, 10 h]}\n")
    pytester.makefile(".yaml", bench=textwrap.dedent("""
        name: lab
        instruments:
          smu1: {driver: keithley2450, resource: "TCPIP::127.0.0.1::5025::SOCKET"}
        cells:
          pellet: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}
        channels:
          ch1: {cycler: smu1, cell: pellet}
    """))
    pytester.makeini("[pytest]\ncellbench_bench = bench.yaml\n")
    result = pytester.runpytest_subprocess("--cellbench-profiles", "profiles", "-p", "no:cacheprovider",
                                           "--junitxml", "report.xml", "-o", "junit_family=xunit1", "-rf")
    result.assert_outcomes(passed=1, failed=3)
    text = result.stdout.str()
    assert "profiles/typo.yaml:4: steps[0]" in text and "dischrage" in text  # the path CI shows, not the name
    assert "too-high.yaml:4:" in text and "above the cell's maximum 4.3 V" in text
    assert "shorts.yaml: the simulated run on a pellet cell at 25 degC ended early" in text
    assert "Traceback" not in text
    junit = (pytester.path / "report.xml").read_text()
    assert junit.count("<testcase") == 4
    # each case names its file and the YAML line of its first problem (0-based, as pytest gives lines)
    assert re.search(r'<testcase[^>]*file="profiles/typo.yaml"[^>]*line="3"', junit), junit
    assert re.search(r'<testcase[^>]*file="profiles/too-high.yaml"[^>]*line="3"', junit), junit


def test_a_named_test_runs_alone_and_dry_runs_stay_out_of_the_machines_registry(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pytest tests/test_lab.py::test_one` runs that test, not every profile too; the plugin's dry runs
    (profiles and the fixture) register nowhere the lab's `cellbench runs` looks."""
    profiles = pytester.mkdir("profiles")
    (profiles / "rest.yaml").write_text("name: rest\nsample_period: 1 min\nsteps:\n  - rest: 10 min\n")
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_lab.py").write_text(textwrap.dedent("""
        def test_one():
            assert True

        def test_a_dry_run(cellbench_dry_run):
            assert cellbench_dry_run("name: r\\nsteps:\\n  - rest: 1 min\\n").completed
    """))
    pytester.makeini("[pytest]\ncellbench_profiles = profiles\n")
    state = pytester.path / "state"
    monkeypatch.setenv("CELLBENCH_STATE_DIR", str(state))
    named = pytester.runpytest_subprocess("tests/test_lab.py::test_one", "-p", "no:cacheprovider")
    named.assert_outcomes(passed=1)
    everything = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    everything.assert_outcomes(passed=3)  # both tests and the profile
    assert not list(state.rglob("*.json")), list(state.rglob("*"))


@pytest.mark.parametrize(("version", "releases"), [("3.11", "lowest"), ("3.13", "highest")])
def test_the_example_lab_repository_passes_with_only_the_built_wheel_installed(tmp_path: Path, version: str,
                                                                               releases: str) -> None:
    """Build the wheel, install it with its analysis extra and pytest in a fresh virtual environment (nothing of
    this checkout on its path), run examples/ci there as a lab's CI would, then a report and a Parquet export:
    on Python 3.11 with the lowest analysis releases we support (pandas 2.0), on 3.13 with the newest."""
    from tests.test_package import find_python, fresh_venv

    python_found = find_python(version)
    if python_found is None:
        pytest.skip(f"no working python{version} on this machine")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(root), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("cellbench-*.whl")
    bin_ = fresh_venv(python_found, tmp_path / "venv")
    python = str(bin_ / "python")
    lowest = ["-c", str(root / "tests" / "analysis-lowest.txt")] if releases == "lowest" else []
    installed = subprocess.run([python, "-m", "pip", "install", "-q", *lowest, f"{wheel}[analysis]", "pytest",
                                "pytest-asyncio"], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-2000:]
    pandas = subprocess.run([python, "-c", "import pandas; print(pandas.__version__)"], capture_output=True,
                            text=True, timeout=120).stdout.strip()
    print(f"Python {version}, {releases} releases: pandas {pandas}")
    assert pandas.startswith("2.0.") if releases == "lowest" else int(pandas.split(".")[0]) >= 2
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "CELLBENCH_STATE_DIR": str(tmp_path / "state")}
    lab = tmp_path / "lab"
    shutil.copytree(root / "examples" / "ci", lab)
    result = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--junitxml", "junit.xml"],
                            cwd=lab, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout
    junit = (lab / "junit.xml").read_text()
    assert 'name="formation.yaml"' in junit and 'name="pulse-check.yaml"' in junit
    # the desk's work with these releases: a run, its report and its Parquet export, read back by this pandas
    cellbench = str(bin_ / "cellbench")
    steps = "name: two\nsample_period: 1 min\nsteps:\n  - repeat: 2\n    steps:\n" \
            "      - charge: {current: C/10, until: 4.2 V}\n      - discharge: {current: C/10, until: 3.0 V}\n"
    (tmp_path / "two.yaml").write_text(steps)

    def run(*command: str) -> None:
        done = subprocess.run([cellbench, *command], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=env)
        assert done.returncode == 0, f"{command}: {done.stdout[-1500:]}{done.stderr[-1500:]}"

    run("run", "two.yaml", "--dry-run", "--temperature", "60", "--runs-dir", "runs")
    (db,) = (tmp_path / "runs").glob("*.sqlite")
    run("report", str(db))
    run("export", str(db), "--out", "out")
    assert list((tmp_path / "runs").glob("*/index.html"))
    (parquet,) = (tmp_path / "out").glob("*.bdf.parquet")
    read = subprocess.run([python, "-c", f"import pandas; f = pandas.read_parquet({str(parquet)!r}); "
                           "print(len(f), round(f['Discharging Capacity / Ah'].max() * 1000, 3))"],
                          capture_output=True, text=True, timeout=120)
    rows, mah = read.stdout.split()
    assert int(rows) > 100 and 2.0 < float(mah) < 4.0, read.stdout + read.stderr


def test_a_whole_bench_file_is_served_by_simulators_and_a_real_time_run_goes_through_it(
        pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", bench=textwrap.dedent("""
        name: lab
        instruments:
          smu1: {driver: keithley2450, resource: "TCPIP::10.0.0.5::5025::SOCKET", timeout: 2 s}
          oven: {driver: espec, resource: "TCPIP::10.0.0.6::57732::SOCKET", timeout: 2 s}
        cells:
          pellet: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}
        channels:
          ch1: {cycler: smu1, chamber: oven, cell: pellet}
        mqtt: {host: broker.lab.invalid, username: bench-07}
    """))
    pytester.makepyfile(test_bench=textwrap.dedent("""
        import cellbench

        PROFILE = "name: short\\nsample_period: 0.5 s\\nsteps:\\n  - discharge: {current: 0.1 mA, until: 2 s}\\n"

        def test_the_labs_bench_file_on_simulators(cellbench_bench, tmp_path):
            bench = cellbench_bench("bench.yaml")
            assert "10.0.0.5" not in bench.read_text()
            assert "broker.lab.invalid" not in bench.read_text()  # never the lab's own broker from a test
            result = cellbench.run(PROFILE, bench=bench, runs_dir=tmp_path / "runs")
            assert result.completed, result.outcome.reason
            samples = cellbench.read_samples(result.database)
            assert len(samples) >= 3 and (samples["Ambient Temperature / degC"].notna()).all()
    """))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_simulator_that_cannot_start_is_said_with_its_own_words() -> None:
    from cellbench.testing.plugin import Served

    served = Served({})
    try:
        with pytest.raises(RuntimeError, match=r"did not start.*unknown instrument 'thermostat'"):
            served("thermostat")
        resource = served("keithley2450", faults=("delay=0.01",))  # and one that does, with its options
        assert resource.startswith("TCPIP::127.0.0.1::")
    finally:
        served.stop()
    assert all(proc.poll() is not None for proc in served.procs)


def test_the_temperature_option_reaches_the_simulated_cell() -> None:
    """`sim serve --temperature`: the same 1 mA discharge drops less voltage in a warm cell (its electrolyte
    and interfaces conduct better), as a lab's script sees it over the wire."""
    import pyvisa

    from cellbench.testing.plugin import Served

    served = Served({"soc": 0.5})
    volts = {}
    try:
        for temperature in (25.0, 60.0):
            rm = pyvisa.ResourceManager("@py")
            smu = cast(MessageBasedResource, rm.open_resource(
                served("keithley2450", temperature=temperature), read_termination="\n", write_termination="\n",
                timeout=5000))
            for setting in (":SOUR:FUNC CURR", ":SOUR:CURR -0.001", ":SOUR:CURR:VLIM 4.3", ":OUTP ON"):
                smu.write(setting)
            time.sleep(0.3)
            volts[temperature] = float(smu.query(":MEAS:VOLT?"))
            smu.write(":OUTP OFF")
            smu.close()
            rm.close()
    finally:
        served.stop()
    # by hand, from the model: 1 mA through about 67 ohm at 25 degC and about 14 ohm at 60 degC
    from cellbench.simulators.cell import SolidStateCell

    drop = {t: 1e-3 * SolidStateCell(soc=0.5, temperature_c=t).dc_resistance() for t in (25.0, 60.0)}
    assert volts[60.0] - volts[25.0] == pytest.approx(drop[25.0] - drop[60.0], abs=0.01)


def test_the_readmes_ci_blocks_run_as_written(pytester: pytest.Pytester) -> None:
    """The README's pytest.ini and test file, copied as a lab would copy them (with the example lab's bench file
    and profiles), pass: an inline comment in the ini was once read as a path, the test lacked its imports."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Testing your profiles in CI"):readme.index("## Unattended runs")]
    ini = re.search(r"```ini\n(.*?)```", section, re.S)
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert ini is not None and code is not None
    (pytester.path / "pytest.ini").write_text(ini.group(1))
    shutil.copy(root / "examples" / "ci" / "bench.yaml", pytester.path / "bench.yaml")
    shutil.copytree(root / "examples" / "ci" / "profiles", pytester.path / "profiles")
    (pytester.path / "test_lab.py").write_text(code.group(1))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-3000:]
    assert outcomes.get("passed", 0) == 2 + len(list((root / "examples" / "ci" / "profiles").glob("*.yaml")))


def test_the_readmes_example_profile_completes_on_the_default_simulated_cell(tmp_path: Path) -> None:
    """The first profile a newcomer reads in the README, run as it is written on the default simulated pellet at
    25 degC: it once charged at C/3, above the lithium's critical current density, and ended in a soft-short
    safety stop at 33.6 h."""
    from tests.conftest import dry_run

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```yaml\nname: formation and cycling")
    text = readme[start + len("```yaml\n"):readme.index("```", start + 7)]
    run = dry_run(text, tmp_path)
    assert run.outcome.completed, run.outcome.reason
    assert not [e for e in run.events if e["kind"] in ("safety", "short")]
