"""A flaky instrument does not end a month-long test: lost connections, silence, garbage and a restarted
server are reconnected within the grace time; past it only that channel is made safe and fails.

Real clock, real wire: simulated 2450s served on loopback TCP in this process, faults injected in the
server as a real bench sees them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cellbench.bench.faces.simbench import cell_config
from cellbench.bench.runner.config import BenchConfig, ChannelConfig, instrument
from cellbench.bench.runner.run import ChannelResult, run_bench
from cellbench.bench.runtime.clock import RealClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.parse import parse_profile
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.parameters import PELLET
from cellbench.simulators.server import SimServer

PROFILE = "name: five seconds\nsample_period: 0.25 s\nsteps:\n  - charge: {current: 1 mA, until: [4.25 V, 5 s]}\n"


def bench_of(servers: dict[str, SimServer], grace: str, run_steps: bool = False) -> BenchConfig:
    return BenchConfig(
        instruments={n: instrument(driver="keithley2450", resource=s.resource, timeout="0.4 s",
                                   reconnect_grace=grace, run_steps=run_steps) for n, s in servers.items()},
        cells={"pellet": cell_config(PELLET)},
        channels={f"ch{k}": ChannelConfig(cycler=n, cell="pellet") for k, n in enumerate(servers, 1)},
    )


async def run_with_fault(tmp_path: Path, fault: Callable[[SimServer], object], clear: Callable[[SimServer], object],
                         *, at: float = 1.5, lasts: float = 1.0, grace: str = "10 s",
                         healthy_too: bool = False, run_steps: bool = False,
                         ) -> tuple[list[ChannelResult], dict[str, Keithley2450Sim]]:
    loop = asyncio.get_running_loop()
    names = ["bad", "good"] if healthy_too else ["bad"]
    sims = {n: Keithley2450Sim(SolidStateCell(soc=0.3), loop.time) for n in names}
    servers = {n: await SimServer(sim).start() for n, sim in sims.items()}
    try:
        async def inject() -> None:
            await asyncio.sleep(at)
            fault(servers["bad"])
            await asyncio.sleep(lasts)
            clear(servers["bad"])

        injector = asyncio.ensure_future(inject())
        results = await run_bench(bench_of(servers, grace, run_steps), parse_profile(PROFILE), PROFILE, RealClock(),
                                  runs_dir=tmp_path, handle_signals=False)
        await injector
        return results, sims
    finally:
        for server in servers.values():
            await server.close()


def kinds(result: ChannelResult) -> list[str]:
    with open_run(result.database) as store:
        return [e["kind"] for e in store.events()]


def charge_ah(result: ChannelResult) -> float:
    with open_run(result.database) as store:
        return store.samples()[-1].charge_ah


def set_fault(name: str, value: object) -> Callable[[SimServer], None]:
    return lambda server: setattr(server.faults, name, value)


@pytest.mark.parametrize("fault", ["drop", "silent", "garbage"])
async def test_a_brief_fault_is_reconnected_and_the_step_goes_on(tmp_path: Path, fault: str) -> None:
    began = time.time()
    (result,), sims = await run_with_fault(tmp_path, set_fault(fault, True), set_fault(fault, False))
    ended = time.time()
    assert result.outcome.completed, result.outcome.reason
    with open_run(result.database) as store:  # a reconnect does not move Unix time off the wall clock
        unix = [s.unix_time for s in store.samples()]
        gaps = [(s.unix_time - s.test_time) for s in store.samples()]
    assert began - 0.5 < unix[0] and unix[-1] < ended + 0.5 and unix == sorted(unix)
    assert max(gaps) - min(gaps) < 0.05  # Unix time runs with test time through the gap: no jump
    assert "recovered" in kinds(result) and kinds(result)[-1] == "end"
    # the 2450 kept sourcing through the gap, and the gap was counted at the held current
    assert charge_ah(result) == pytest.approx(1e-3 * 5 / 3600, rel=0.05)
    assert sims["bad"].tree.values["output"] is False


async def test_a_dropped_connection_mid_block_is_reconnected_and_the_step_goes_on(tmp_path: Path) -> None:
    """The step runs on the 2450's trigger model (run_steps): the connection drops while the model runs; the next
    block read finds it gone, the channel reconnects within its grace time and reads the block where it left
    off: none of the instrument's readings is lost (a reading every 0.25 s from the first to the end), and the
    step ends on its time with the charge of 5 s at 1 mA."""
    (result,), sims = await run_with_fault(tmp_path, set_fault("drop", True), set_fault("drop", False),
                                           run_steps=True)
    assert result.outcome.completed, result.outcome.reason
    assert "recovered" in kinds(result) and kinds(result)[-1] == "end"
    with open_run(result.database) as store:
        times = [s.test_time for s in store.samples()]
    assert len(times) >= 20 and max(b - a for a, b in itertools.pairwise(times)) < 0.26
    assert charge_ah(result) == pytest.approx(1e-3 * times[-1] / 3600, rel=0.01)
    assert times[-1] == pytest.approx(5.0, abs=0.3)
    assert sims["bad"].tree.values["output"] is False
    assert sims["bad"].trigger is not None and not sims["bad"].trigger.running


async def run_across_a_restart(tmp_path: Path, meanwhile: Callable[[Keithley2450Sim], object] = lambda sim: None
                               ) -> tuple[ChannelResult, dict[str, Keithley2450Sim]]:
    """A run whose 2450's server goes down and comes back on the same port, `meanwhile` done to it in between."""
    restarted: list[SimServer] = []
    pending: set[asyncio.Future[None]] = set()

    def down(server: SimServer) -> None:
        pending.add(asyncio.ensure_future(server.close()))

    def up(server: SimServer) -> None:
        assert isinstance(server.instrument, Keithley2450Sim)
        meanwhile(server.instrument)

        async def start() -> None:
            restarted.append(await SimServer(server.instrument).start(server.host, server.port))
        pending.add(asyncio.ensure_future(start()))

    try:
        (result,), sims = await run_with_fault(tmp_path, down, up)
    finally:
        await asyncio.gather(*pending)
        for server in restarted:
            await server.close()
    return result, sims


async def test_a_server_restarted_on_the_same_port_is_found_again(tmp_path: Path) -> None:
    result, _ = await run_across_a_restart(tmp_path)
    assert result.outcome.completed, result.outcome.reason
    assert "recovered" in kinds(result)


async def test_a_reconnection_that_finds_the_output_off_reads_the_cell_before_turning_it_on(tmp_path: Path) -> None:
    """The 2450 comes back (its server restarted) with its output off, and the cell shorted meanwhile: the
    reconnection once turned the output on into it. It reads the cell at open circuit first and refuses: a safety
    stop with the reading, the output left off."""
    def power_cycled_onto_a_short(sim: Keithley2450Sim) -> None:
        sim.tree.values["output"] = False  # its output comes back off
        sim.cell.inject_short(20.0)

    result, sims = await run_across_a_restart(tmp_path, power_cycled_onto_a_short)
    assert result.outcome.reason.startswith("safety stop: not turned on again after reconnecting: the cell reads ")
    assert sims["bad"].tree.values["output"] is False


async def test_past_the_grace_time_only_that_channel_fails_safe(tmp_path: Path) -> None:
    results, sims = await run_with_fault(tmp_path, set_fault("silent", True), lambda s: None, lasts=0.0,
                                         grace="1 s", healthy_too=True)
    bad, good = results
    assert not bad.outcome.completed and "not recovered within 1 s" in bad.outcome.reason
    assert good.outcome.completed  # the other channel was neither stopped nor touched
    assert charge_ah(good) == pytest.approx(1e-3 * 5 / 3600, rel=0.02)
    # a silent 2450 still obeys: the failed channel's output went off too
    assert sims["bad"].tree.values["output"] is False and sims["good"].tree.values["output"] is False


async def test_a_fault_is_given_its_whole_grace_time_before_the_channel_gives_up(tmp_path: Path) -> None:
    """The backoff once gave up when its next wait would pass the grace: at 15.8 s of a 20 s grace. The last try
    now comes at the grace's end: given up no sooner than the grace, and within one try (0.4 s timeout) after."""
    results, _ = await run_with_fault(tmp_path, set_fault("silent", True), lambda s: None, lasts=0.0, grace="5 s")
    (bad,) = results
    with open_run(bad.database) as store:
        events = store.events()
    began = next(e["test_time"] for e in events if e["kind"] == "fault")
    ended = next(e["test_time"] for e in events if e["kind"] == "end")
    assert "not recovered within 5 s" in bad.outcome.reason
    assert 5.0 <= ended - began <= 5.0 + 1.5, ended - began


@pytest.mark.parametrize("step", ["charge: {current: 1 mA, until: [4.25 V, 30 s]}",
                                  # a discharge to a cut-off: a voltage source at its current limit, whose voltage is
                                  # what moves (it was never judged, the current being meant to hold)
                                  "discharge: {current: 1 mA, until: [3.0 V, 30 s]}"])
async def test_a_frozen_reading_is_a_fault_not_a_cell(tmp_path: Path, step: str) -> None:
    """A 2450 that keeps answering with its last reading: after 21 identical readings with current flowing
    the channel is made safe and fails (real clock, real wire)."""
    text = f"name: frozen\nsample_period: 0.1 s\nsteps:\n  - {step}\n"
    loop = asyncio.get_running_loop()
    sim = Keithley2450Sim(SolidStateCell(soc=0.3), loop.time, noise_v=20e-6)
    async with SimServer(sim) as server:
        async def freeze() -> None:
            await asyncio.sleep(1.0)
            server.faults.stuck = True

        freezer = asyncio.ensure_future(freeze())
        (result,) = await run_bench(bench_of({"smu1": server}, "10 s"), parse_profile(text), text, RealClock(),
                                    runs_dir=tmp_path, handle_signals=False)
        await freezer
    assert result.outcome.reason.startswith("instrument fault: smu1: its reading has not changed in 21 samples")
    assert result.outcome.test_time < 10
    assert sim.tree.values["output"] is False
