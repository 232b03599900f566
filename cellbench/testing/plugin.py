"""cellbench's pytest plugin (registered through the `pytest11` entry point: installing cellbench is enough).

Fixtures:

- `cellbench_serve(instrument, *, cell, soc, seed, temperature, faults, serial)`: starts a simulated instrument
  (`cellbench sim serve`, its own process, a free loopback port or a pty) and returns its VISA resource string;
  everything started is stopped after the test. `keithley2450`, `espec`, `press`, `load_cell`, `palmsens`,
  `maccor` and `arbin` are one each, with the options of a `@pytest.mark.cellbench(...)` marker.
- `cellbench_bench(bench_file)`: a copy of a bench file whose instruments are simulators started for the test.
- `cellbench_dry_run(profile, *, cell, temperature, soc, seed)`: runs a profile (a file, a library name or
  YAML text) on the simulated bench on the virtual clock and returns a `DryRunResult` with pandas frames and
  the helpers a lab asserts with.

Profiles as tests: `pytest --cellbench-profiles DIR` (or the ini option `cellbench_profiles`) collects every
profile in DIR as a test that checks it (against the ini option `cellbench_bench`, a bench file, when given)
and dry-runs it, failing with the profile's `file:line` message or the simulated run's outcome.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import pandas as pd

    from cellbench.bench.runtime.engine import Outcome

# what `sim serve` announces: the resource string (TCPIP socket or serial line) of what it serves
ANNOUNCED = re.compile(r"((?:TCPIP::\S+::SOCKET)|(?:ASRL\S+::INSTR))")
START_TIMEOUT = 30.0  # s a simulator has to say where it serves


# --- simulated instruments --------------------------------------------------------------------------------
def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("cellbench")
    return dict(marker.kwargs) if marker is not None else {}


class Served:
    """The simulators a test started, stopped when it ends."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self.procs: list[subprocess.Popen[str]] = []

    def __call__(self, instrument: str, *, cell: str | None = None, soc: float | None = None,
                 seed: int | None = None, temperature: float | None = None, faults: tuple[str, ...] | None = None,
                 serial: bool = False) -> str:
        opts = {**self.defaults, **{k: v for k, v in (("cell", cell), ("soc", soc), ("seed", seed),
                                                      ("temperature", temperature), ("faults", faults))
                                    if v is not None}}
        args = [sys.executable, "-m", "cellbench", "sim", "serve", instrument, "--exit-with-parent",
                *(["--serial"] if serial else ["--port", "0"]),
                "--cell", str(opts.get("cell", "pellet")), "--soc", str(opts.get("soc", 0.5)),
                "--seed", str(opts.get("seed", 0)), "--temperature", str(opts.get("temperature", 25.0))]
        for fault in opts.get("faults", ()):
            args += ["--fault", fault]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"})
        self.procs.append(proc)
        lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        listening = threading.Event()
        listening.set()
        # read its output for as long as it runs: a simulator whose log fills an unread pipe would stop answering
        threading.Thread(target=_drain, args=(proc, lines, listening), daemon=True).start()
        said: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # it ended
                break
            said.append(line)
            if m := ANNOUNCED.search(line):
                listening.clear()  # the rest of its log is read and dropped
                return m.group(1)
        raise RuntimeError(f"the simulated {instrument} did not start within {START_TIMEOUT:g} s: "
                           f"{''.join(said)[-1000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(proc: subprocess.Popen[str], lines: queue.SimpleQueue[str | None], listening: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if listening.is_set():
            lines.put(line)
    lines.put(None)


@pytest.fixture
def cellbench_serve(request: pytest.FixtureRequest) -> Iterator[Served]:
    """Start simulated instruments by name; each call returns a VISA resource string."""
    served = Served(_options(request))
    try:
        yield served
    finally:
        served.stop()


def _one(instrument: str) -> Callable[..., Iterator[str]]:
    def fixture(cellbench_serve: Served) -> Iterator[str]:
        yield cellbench_serve(instrument)

    fixture.__doc__ = f"A simulated {instrument} on a free loopback port: its VISA resource string."
    fixture.__name__ = instrument.replace("-", "_")
    return fixture


keithley2450 = pytest.fixture(_one("keithley2450"), name="keithley2450")
espec = pytest.fixture(_one("espec"), name="espec")
press = pytest.fixture(_one("modbus-press"), name="press")
load_cell = pytest.fixture(_one("modbus-load-cell"), name="load_cell")
palmsens = pytest.fixture(_one("palmsens"), name="palmsens")
maccor = pytest.fixture(_one("maccor"), name="maccor")
arbin = pytest.fixture(_one("arbin"), name="arbin")


@pytest.fixture
def cellbench_bench(cellbench_serve: Served, tmp_path: Path) -> Callable[[str | Path], Path]:
    """`cellbench_bench(bench_file)` -> a copy of the bench file whose every instrument is a simulator of its
    driver, started for the test (each with a cell of its own: the protocols are real, the physics of a
    chamber and a cycler sharing one cell is not coupled here; `cellbench_dry_run` couples it)."""
    def make(bench_file: str | Path) -> Path:
        import json

        from cellbench.bench.runner.config import load_bench
        from cellbench.drivers.registry import LoginSettings

        bench = load_bench(bench_file)
        written = bench.as_written()
        written.pop("mqtt", None)  # a test on simulators never publishes to the lab's own broker
        for name, instrument in bench.instruments.items():
            written["instruments"][name]["resource"] = cellbench_serve(instrument.driver)
            # the simulated cycler's own login
            if isinstance(instrument, LoginSettings) and instrument.login_file is not None:
                login = tmp_path / f"{name}.login"
                login.write_text("admin:000000\n")
                written["instruments"][name]["login_file"] = str(login)
        path = tmp_path / f"{Path(bench_file).stem}.simulated.yaml"
        path.write_text(json.dumps(written, indent=1))  # JSON is YAML
        return path

    return make


# --- dry runs ---------------------------------------------------------------------------------------------
@dataclass
class DryRunResult:
    """A simulated run, as a lab asserts on it."""

    outcome: Outcome
    database: Path
    samples: pd.DataFrame
    steps: pd.DataFrame
    events: pd.DataFrame
    cycles: pd.DataFrame

    @property
    def completed(self) -> bool:
        return bool(self.outcome.completed)

    @property
    def last_step(self) -> tuple[str, str]:
        """(step type, why it ended) of the last step."""
        row = self.steps.iloc[-1]
        return str(row["step_type"]), str(row["end_reason"])

    def retention_above(self, fraction: float) -> bool:
        """Whether the last cycle's discharge capacity is above `fraction` of the first's."""
        capacity = self.cycles["discharge_ah"]
        capacity = capacity[capacity > 0]
        return bool(len(capacity) and capacity.iloc[-1] > fraction * capacity.iloc[0])

    def safety_events(self) -> list[str]:
        """The messages of safety trips and shorts, if any."""
        kinds = {"safety", "short"}
        return [str(m) for k, m in zip(self.events["kind"], self.events["message"], strict=True) if k in kinds]


def dry_run(profile: str | Path, *, runs_dir: Path, cell: str = "pellet", temperature: float = 25.0,
            soc: float = 0.0, seed: int = 0) -> DryRunResult:
    """Run a profile on the simulated bench on the virtual clock (works inside a running event loop too)."""
    from cellbench.bench.runtime.extras import need

    pd = need("pandas", "the cellbench_dry_run fixture's tables")

    import cellbench
    from cellbench.bench.ops import runs
    from cellbench.bench.results.analysis import store_table
    from cellbench.bench.runtime.store import open_run

    with runs.registry_in(runs_dir / ".state"):  # a CI's throwaway runs stay out of the machine's registry
        result = cellbench.run(profile, dry_run=True, runs_dir=runs_dir, cell=cell, temperature=temperature,
                               soc=soc, seed=seed)
    with open_run(result.database) as store:
        rows = store_table(store)
    cycles = pd.DataFrame([{"cycle": r.cycle, "charge_ah": r.charge_ah, "discharge_ah": r.discharge_ah,
                            "coulombic_efficiency": r.coulombic_efficiency, "retention": r.retention}
                           for r in rows])
    return DryRunResult(result.outcome, result.database, cellbench.read_samples(result.database),
                        cellbench.read_steps(result.database), cellbench.read_events(result.database), cycles)


@pytest.fixture
def cellbench_dry_run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., DryRunResult]:
    """`cellbench_dry_run(profile, cell=, temperature=, soc=, seed=)` -> DryRunResult (marker options apply)."""
    defaults = _options(request)
    defaults.pop("faults", None)

    def run(profile: str | Path, **options: Any) -> DryRunResult:
        return dry_run(profile, runs_dir=tmp_path / "runs", **{**defaults, **options})

    return run


# --- profiles as tests ------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cellbench")
    group.addoption("--cellbench-profiles", action="append", default=[], metavar="DIR",
                    help="collect every profile (*.yaml) in DIR as a test: checked, then dry-run")
    group.addoption("--cellbench-bench", default=None, metavar="FILE", help="check the profiles against this bench")
    group.addoption("--cellbench-cell", default=None, help="simulated cell preset of the dry runs (default pellet)")
    group.addoption("--cellbench-temperature", default=None, type=float, help="of the dry runs, degC (default 25)")
    parser.addini("cellbench_profiles", "folders whose profiles are collected as tests", type="paths", default=[])
    parser.addini("cellbench_bench", "a bench file the collected profiles are checked against", default="")
    parser.addini("cellbench_cell", "simulated cell preset of the dry runs", default="pellet")
    parser.addini("cellbench_temperature", "temperature of the dry runs, degC", default="25")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cellbench(cell=, soc=, seed=, temperature=, faults=): options of the "
                                       "simulated instruments and dry runs of a test")
    if config.args_source is pytest.Config.ArgsSource.ARGS:
        return  # the user named what to run (a node ID, a file): profiles are collected only if named there
    for folder in _profile_dirs(config):
        if str(folder) not in config.args:
            config.args.append(str(folder))


def _profile_dirs(config: pytest.Config) -> list[Path]:
    given = [Path(d).resolve() for d in config.getoption("cellbench_profiles", default=[]) or []]
    return given + [Path(p).resolve() for p in config.getini("cellbench_profiles")]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    if any(file_path.resolve().is_relative_to(d) for d in _profile_dirs(parent.config)):
        return ProfileFile.from_parent(parent, path=file_path)
    return None


class ProfileFailure(Exception):
    """A profile's own message: shown as it is, without a traceback."""


class ProfileFile(pytest.File):
    def collect(self) -> Iterator[ProfileItem]:
        yield ProfileItem.from_parent(self, name=self.path.name)


class ProfileItem(pytest.Item):
    """One profile: parsed (file:line errors), checked against the bench file when one is named, dry-run."""

    @property
    def shown(self) -> str:
        """The profile's path as CI shows it: relative to the root of the run (not the bare file name)."""
        try:
            return str(self.path.relative_to(self.config.rootpath))
        except ValueError:
            return str(self.path)

    def problems(self) -> list[str]:
        """The profile's parse and bench-check problems, `path:line: ...` each (no dry run)."""
        from cellbench.profiles.parse import InputError, load_profile, locate

        config = self.config
        try:
            prof, text = load_profile(self.path)
        except InputError as exc:
            return [p.replace(self.path.name, self.shown, 1) if p.startswith(self.path.name) else p
                    for p in exc.problems]
        bench_file = config.getoption("cellbench_bench") or config.getini("cellbench_bench")
        if bench_file:
            from cellbench.bench.runner.config import load_bench
            from cellbench.bench.runner.run import profile_problems

            base = Path(config.rootpath)
            bench_path = Path(bench_file) if Path(bench_file).is_absolute() else base / bench_file
            try:
                bench = load_bench(bench_path)
            except InputError as exc:
                return list(exc.problems)
            problems = [p for ch in bench.channels for p in profile_problems(bench, ch, prof)]
            if problems:
                return locate(text, self.shown, problems)
        return []

    def runtest(self) -> None:
        if problems := self.problems():
            raise ProfileFailure("\n".join(problems))
        config = self.config
        cell = config.getoption("cellbench_cell") or config.getini("cellbench_cell")
        temperature = config.getoption("cellbench_temperature")
        if temperature is None:
            temperature = float(config.getini("cellbench_temperature"))
        with tempfile.TemporaryDirectory(prefix="cellbench-") as tmp:
            result = dry_run(self.path, runs_dir=Path(tmp), cell=cell, temperature=temperature)
        if not result.completed:
            raise ProfileFailure(f"{self.shown}: the simulated run on a {cell} cell at {temperature:g} degC "
                                 f"ended early: {result.outcome.reason}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str | Any:
        if isinstance(excinfo.value, ProfileFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        """The profile and the line of its first problem (0-based, as pytest counts), so a CI annotation built
        from the JUnit XML points at the YAML line; line 0 when it has none before its dry run."""
        line = 0
        for problem in self.problems():
            m = re.match(rf"{re.escape(self.shown)}:(\d+):", problem)
            if m:
                line = int(m.group(1)) - 1
                break
        return self.path, line, f"cellbench profile {self.shown}"
