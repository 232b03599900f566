"""The simulated bench: simulated instruments on real wires around a simulated cell, for the demo, dry runs,
estimates and tests. A face of the project: the real run path (`cellbench.bench.runner.run`) never imports it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellbench.bench.ops import runs
from cellbench.bench.runner.config import BenchConfig, ChannelConfig, instrument
from cellbench.bench.runner.run import ChannelResult, ProfileFile, ProgressCallback, run_bench
from cellbench.bench.runtime.cells import CellConfig
from cellbench.bench.runtime.clock import Clock
from cellbench.bench.runtime.engine import Progress
from cellbench.drivers.registry import InstrumentSettings, driver, rehearsal
from cellbench.profiles.checks import instrument_problems
from cellbench.profiles.schema import Profile
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.espec import EspecChamberSim
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.palmsens import PalmSensSim
from cellbench.simulators.parameters import PELLET, CellParameters
from cellbench.simulators.press import PressServer, PressSim
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.server import SimServer


def cell_config(params: CellParameters) -> CellConfig:
    """The bench's view of a simulated cell (what a technician would type into bench.yaml)."""
    return CellConfig(
        chemistry=params.chemistry,
        capacity=f"{params.capacity_ah} Ah",
        voltage_min=f"{params.v_min} V",
        voltage_max=f"{params.v_max} V",
        area=f"{params.area_cm2} cm^2",
        dimensions=tuple(f"{d} mm" for d in params.dimensions_mm),
    )


def simulated_config(params: CellParameters) -> BenchConfig:
    """The simulated bench of a dry run as a bench file (a 2450 and the preset cell), for the checks made
    before anything is served."""
    return BenchConfig(
        name="simulated",
        instruments={"smu1": instrument(driver="keithley2450", resource="TCPIP::127.0.0.1::5025::SOCKET")},
        cells={params.name: cell_config(params)},
        channels={"ch1": ChannelConfig(cycler="smu1", cell=params.name)},
    )


class SimulatedBench:
    """A bench of simulated instruments on real wires: a 2450 simulator (TCP) with a simulated cell,
    and, when asked for, an ESPEC chamber (TCP) around it and a Modbus press (TCP) holding its stack.

    Everything goes through the real wire, so the run is the same code path as on real hardware.
    """

    def __init__(
        self,
        params: CellParameters = PELLET,
        *,
        initial_soc: float = 0.0,
        seed: int = 0,
        noise: bool = True,
        temperature_c: float = 25.0,
        pressure_mpa: float | None = None,
        chamber: bool = False,
        press: bool = False,
        potentiostat: bool = False,
        run_steps: bool = False,
    ) -> None:
        self.params = params
        self.run_steps = run_steps  # steps the 2450 can run itself run on its trigger model
        self.initial_soc = initial_soc
        self.seed = seed
        self.pressure_mpa = params.p_ref_mpa if pressure_mpa is None else pressure_mpa
        self.cell = SolidStateCell(params, soc=initial_soc, temperature_c=temperature_c, pressure_mpa=self.pressure_mpa)
        self.noise = noise
        self.with_chamber, self.with_press, self.with_potentiostat = chamber, press, potentiostat
        self.potentiostat: PalmSensSim | None = None
        self.potentiostat_server: SimServer | None = None
        self.sim: Keithley2450Sim | None = None
        self.chamber: EspecChamberSim | None = None
        self.press: PressSim | None = None
        self.server: SimServer | None = None
        self.chamber_server: SimServer | None = None
        self.press_server: PressServer | None = None

    async def __aenter__(self) -> SimulatedBench:
        loop = asyncio.get_running_loop()
        self.sim = Keithley2450Sim(
            self.cell, loop.time, noise_v=20e-6 if self.noise else 0.0, noise_i=2e-9 if self.noise else 0.0,
            seed=self.seed,
        )
        self.server = await SimServer(self.sim).start()
        if self.with_chamber:
            t = self.cell.temperature_c
            self.chamber = EspecChamberSim(loop.time, [self.cell], room_c=t)
            self.chamber.mode, self.chamber.setpoint_c = "CONSTANT", t
            self.sim.surroundings.append(self.chamber)
            self.chamber_server = await SimServer(self.chamber, read_termination=b"\r\n",
                                                  write_termination=b"\r\n").start()
        if self.with_potentiostat:
            # On loopback TCP even though the real instrument is on a serial line: a pty's bytes
            # cross through a kernel work queue, later than the fast-forwarding virtual clock can
            # wait for. The serial line itself is exercised on the real clock (tests, sim serve).
            self.potentiostat = PalmSensSim(self.cell, loop.time, seed=self.seed, noise=0.002 if self.noise else 0.0)
            self.potentiostat_server = await SimServer(self.potentiostat).start()
        if self.with_press:
            self.press = PressSim(loop.time, [self.cell], area_cm2=self.params.area_cm2,
                                  holding_mpa=self.pressure_mpa)
            self.sim.surroundings.append(self.press)
            self.press_server = await PressServer(self.press).start_tcp()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in (self.server, self.chamber_server, self.press_server, self.potentiostat_server):
            if server is not None:
                await server.close()

    @property
    def config(self) -> BenchConfig:
        """The bench as a bench file would name it: the simulated instruments at their served resources."""
        assert self.server is not None, "use the bench inside 'async with'"
        instruments = {"smu1": instrument(driver="keithley2450", resource=self.server.resource,
                                          run_steps=self.run_steps)}
        channel: dict[str, str] = {"cycler": "smu1", "cell": self.params.name}
        if self.chamber_server is not None:
            instruments["chamber1"] = instrument(driver="espec", resource=self.chamber_server.resource)
            channel["chamber"] = "chamber1"
        if self.potentiostat_server is not None:
            instruments["pstat1"] = instrument(driver="palmsens", resource=self.potentiostat_server.resource)
            channel["potentiostat"] = "pstat1"
        if self.press_server is not None:
            instruments["press1"] = instrument(driver="modbus-press", resource=self.press_server.resource)
            channel["press"] = "press1"
        return BenchConfig(
            name="simulated",
            instruments=instruments,
            cells={self.params.name: cell_config(self.params)},
            channels={"ch1": ChannelConfig(**channel)},
        )

    async def run(
        self,
        profile: Profile,
        profile_text: str,
        clock: Clock,
        *,
        runs_dir: Path = Path("runs"),
        on_progress: ProgressCallback | None = None,
        profile_source: str = "<profile>",
        base_dir: Path = Path("."),
        supervise: bool | None = None,
        extra_metadata: dict[str, object] | None = None,
        on_start: Callable[[str, Path], None] | None = None,
    ) -> ChannelResult:
        simulation = {
            "seed": self.seed, "initial_soc": self.initial_soc, "temperature_c": self.cell.temperature_c,
            "cell": self.params.model_dump(),
        }
        results = await run_bench(
            self.config, profile, profile_text, clock, runs_dir=runs_dir, on_progress=on_progress,
            extra_metadata={"simulation": simulation, **(extra_metadata or {})}, profile_source=profile_source,
            base_dir=base_dir,
            supervise=supervise, on_start=on_start,
        )
        return results[0]


async def run_simulated(
    profile: Profile,
    profile_text: str,
    clock: Clock,
    *,
    params: CellParameters = PELLET,
    initial_soc: float = 0.0,
    seed: int = 0,
    noise: bool = True,
    temperature_c: float = 25.0,
    runs_dir: Path = Path("runs"),
    on_progress: ProgressCallback | None = None,
    profile_source: str = "<profile>",
    base_dir: Path = Path("."),
    environment: bool = False,
    extra_metadata: dict[str, object] | None = None,
    on_start: Callable[[str, Path], None] | None = None,
    run_steps: bool = False,
) -> tuple[ChannelResult, SolidStateCell]:
    """Run a profile on a fresh simulated bench; return the result and the simulated cell (`run_steps`: the steps
    the 2450 can run itself run on its trigger model).

    The bench has a chamber and a press when the profile reads or sets temperature or pressure,
    or when `environment` asks for them.
    """
    env = environment or needs_environment(profile)
    bench = SimulatedBench(params, initial_soc=initial_soc, seed=seed, noise=noise, temperature_c=temperature_c,
                           chamber=env, press=env, potentiostat=environment or needs_potentiostat(profile),
                           run_steps=run_steps)
    async with bench:
        result = await bench.run(
            profile, profile_text, clock, runs_dir=runs_dir, on_progress=on_progress,
            profile_source=profile_source, base_dir=base_dir, extra_metadata=extra_metadata, on_start=on_start,
        )
    return result, bench.cell


def rehearsal_params(cell: CellConfig, base: CellParameters = PELLET) -> CellParameters:
    """A simulated cell like a bench file's: the preset's chemistry and areal physics, the bench cell's
    capacity, area and voltage window."""
    return base.model_copy(update={"capacity_ah": cell.capacity, "area_cm2": cell.area,
                                   "v_min": cell.voltage_min, "v_max": cell.voltage_max})


async def rehearse(
    bench: BenchConfig,
    profile: Profile | None,
    profile_text: str,
    clock: Clock,
    *,
    base: CellParameters = PELLET,
    initial_soc: float = 0.0,
    seed: int = 0,
    temperature_c: float = 25.0,
    runs_dir: Path = Path("runs"),
    on_progress: ProgressCallback | None = None,
    profile_source: str = "<profile>",
    base_dir: Path = Path("."),
    extra_metadata: dict[str, object] | None = None,
    on_start: Callable[[str, Path], None] | None = None,
    channel_profiles: dict[str, ProfileFile] | None = None,
) -> list[ChannelResult]:
    """A dry run of a bench file: every channel with its own simulated cell (its capacity, area and window), every
    instrument of the bench simulated once under its own name, on the virtual clock. A shared chamber holds the
    cells of every channel naming it, a shared press presses all of them (over their summed area), a multi-channel
    cycler box has a cell on each channel the bench uses."""
    loop = asyncio.get_running_loop()
    cells = {}
    for name, ch in bench.channels.items():
        params = rehearsal_params(bench.cells[ch.cell], base)
        cells[name] = SolidStateCell(params, soc=initial_soc, temperature_c=temperature_c,
                                     pressure_mpa=params.p_ref_mpa)
    async with contextlib.AsyncExitStack() as stack:
        served: dict[str, InstrumentSettings] = {}
        hosts: dict[str, Any] = {}  # each cycler simulator by instrument name: what chambers and presses join
        for k, (ref, cfg) in enumerate(bench.instruments.items()):
            users = bench.sharing(ref)
            if not users:
                continue
            spec = driver(cfg.driver)
            held = [cells[u] for u in users]
            if "cycler" in cfg.roles and spec.multi_channel:  # a box: a cell on each of its channels the bench uses
                on = {bench.channels[u].cycler_channel: cells[u] for u in users}
                count = max((c for c in on if c is not None), default=0) + 1
                held = [on.get(c) or SolidStateCell(base, soc=initial_soc, temperature_c=temperature_c)
                        for c in range(count)]
            area = bench.held_area(ref) if "press" in cfg.roles else 1.0
            done: Rehearsed = await rehearsal(spec)(Rehearsal(held, loop.time, stack, seed=seed + k,
                                                              temperature_c=temperature_c, area_cm2=area))
            served[ref] = cfg.model_copy(update={"resource": done.resource, **done.settings})
            if done.host is not None:
                hosts[ref] = done.host
            if done.part is not None:
                _surround(bench, users, hosts, done.part)
        config = BenchConfig(name=f"{bench.name} (rehearsal)", operator=bench.operator, comment=bench.comment,
                             instruments=served, cells=bench.cells, channels=bench.channels)
        # time passes for every cell, asked about or not (a box whose channels have finished, in a warm chamber)
        ticking = asyncio.ensure_future(_tick(list(hosts.values())))
        stack.push_async_callback(_cancel, ticking)
        return await run_bench(config, profile, profile_text, clock, runs_dir=runs_dir, on_progress=on_progress,
                               extra_metadata={"rehearsal_of": bench.name, **(extra_metadata or {})},
                               profile_source=profile_source, base_dir=base_dir, on_start=on_start,
                               channel_profiles=channel_profiles)


async def _tick(sims: list[Any], every: float = 60.0) -> None:
    while True:
        await asyncio.sleep(every)
        for sim in sims:
            sim.advance()


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _surround(bench: BenchConfig, users: list[str], hosts: dict[str, Any], part: Any) -> None:
    """A chamber or a press joins the physics of the cyclers of the channels it acts on (each once)."""
    for cycler in dict.fromkeys(bench.channels[u].cycler for u in users):
        if cycler in hosts:
            hosts[cycler].surroundings.append(part)


def needs_environment(profile: Profile) -> bool:
    """Whether a profile reads or sets temperature or pressure."""
    return bool(instrument_problems(profile, has_chamber=False, has_press=False))


def needs_potentiostat(profile: Profile) -> bool:
    """Whether a profile has impedance steps."""
    return bool(instrument_problems(profile, has_chamber=True, has_press=True, has_potentiostat=False))


class _OutOfTime(Exception):
    pass


ESTIMATE_LIMIT = 1000 * 3600.0  # s of simulated test time an estimate runs at most
ESTIMATE_SAMPLES = 2_000_000  # samples an estimate takes at most (a runaway loop, a tiny sample period)


@dataclass(frozen=True)
class Estimate:
    """How long a profile runs on the simulated cell: deterministic, bounded by simulated time and samples."""

    seconds: float
    complete: bool  # False: the bound was reached first, `seconds` is a lower bound
    completed: bool = True  # the dry run reached the end of the profile
    reason: str = ""  # why it ended, when it ended early
    advice: str = ""  # what the lab could change, when the cell shorted

    def describe(self, cell: str, temperature_c: float) -> str:
        where = f"on a simulated {cell} cell at {temperature_c:g} degC"
        if not self.complete:
            return (f"estimated duration {where}: more than {self.seconds / 3600:.1f} h "
                    f"(the estimate stops at {ESTIMATE_LIMIT / 3600:g} h or {ESTIMATE_SAMPLES:,} samples)")
        if self.completed:
            return f"estimated duration {where}: {self.seconds / 3600:.1f} h"
        return (f"the simulated run {where} ends early, at {self.seconds / 3600:.1f} h: {self.reason}"
                + (f". {self.advice}" if self.advice else ""))


def estimate_duration(
    profile: Profile,
    profile_text: str,
    *,
    params: CellParameters = PELLET,
    temperature_c: float = 25.0,
    base_dir: Path = Path("."),
    limit: float = ESTIMATE_LIMIT,
    max_samples: int = ESTIMATE_SAMPLES,
    on_progress: Callable[[float], None] | None = None,
) -> Estimate:
    """Run the profile on the simulated cell (no noise, the virtual clock) until its end, a safety stop, or
    `limit` seconds of test time or `max_samples` samples, whichever comes first: the same answer on any
    machine under any load. `on_progress` is told the test time reached at every sample."""

    from cellbench.bench.runtime.clock import VirtualClock

    reached = [0.0, 0]

    def watch(channel: str, p: Progress) -> None:
        reached[0] = p.test_time
        reached[1] += 1
        if on_progress is not None:
            on_progress(p.test_time)
        if p.test_time > limit or reached[1] > max_samples:
            raise _OutOfTime

    clock = VirtualClock()
    with tempfile.TemporaryDirectory() as tmp, runs.registry_in(Path(tmp) / "state"):  # not the lab's registry
        try:
            result, cell = clock.run(
                run_simulated(profile, profile_text, clock, params=params, temperature_c=temperature_c,
                              noise=False, runs_dir=Path(tmp), on_progress=watch, base_dir=base_dir)
            )
        except _OutOfTime:
            return Estimate(reached[0], False)
    outcome = result.outcome
    if outcome.completed:
        return Estimate(outcome.test_time, True)
    return Estimate(outcome.test_time, True, False, outcome.reason, short_advice(outcome.reason, cell))


NICE_RATES = ((1.0, "1C"), (0.5, "C/2"), (1 / 3, "C/3"), (0.2, "C/5"), (0.1, "C/10"), (0.05, "C/20"),
              (0.02, "C/50"), (0.01, "C/100"))


def short_advice(reason: str, cell: SolidStateCell) -> str:
    """Why a simulated lithium-metal cell shorted, from the charging current in the stop's reason, and what
    would not short it: a temperature whose critical current density is above that current, or a lower rate."""
    m = re.search(r"short.*charging at ([0-9.eE+-]+) mA", reason)
    if not m:
        return ""
    p = cell.params
    j = float(m.group(1)) / p.area_cm2  # mA/cm²
    ambient = cell.ambient_c
    cell.temperature_c = ambient
    ccd = cell.critical_current_density()
    text = (f"charging at {j:.3g} mA/cm² is above the simulated cell's critical current density "
            f"({ccd:.3g} mA/cm² at {ambient:g} degC and {cell.pressure_mpa:g} MPa)")
    options = []
    for t in range(int(ambient // 5 * 5) + 5, 81, 5):  # sulfide cells are tested up to about 80 degC
        cell.temperature_c = t
        if cell.critical_current_density() >= 1.2 * j:
            options.append(f"{t} degC")
            break
    cell.temperature_c = ambient
    safe = [name for rate, name in NICE_RATES if rate * p.capacity_ah * 1e3 / p.area_cm2 <= 0.8 * ccd]
    if safe:
        options.append(safe[0])
    return f"The simulated {p.name} shorts: {text}" + (f"; try {' or '.join(options)}" if options else "")
