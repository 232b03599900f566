"""The Arbin cycler over CTI: the Battery Data Alliance's pycti-arbin (a client we did not write) against our
simulator served by `cellbench sim serve arbin`, and our driver against it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellbench.drivers.arbin import ArbinCTI
from cellbench.drivers.errors import InstrumentError
from cellbench.simulators.arbin import ArbinServer, ArbinSim
from cellbench.simulators.cell import SolidStateCell
from tests.test_cli import announced


@pytest.fixture
def served_arbin() -> Iterator[int]:
    proc, m = announced("arbin", "--port", "0", "--channels", "8", "--login", "tester:s3cret", "--soc", "0.3",
                        pattern=r"TCPIP::127\.0\.0\.1::(\d+)::SOCKET")
    port = int(m.group(1))
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_pycti_arbin_drives_the_served_cycler(served_arbin: int, tmp_path: Path) -> None:
    from pyctiarbin import ChannelInterface

    env = tmp_path / ".env"
    env.write_text("ARBIN_CTI_USERNAME=tester\nARBIN_CTI_PASSWORD=s3cret\n")
    ch = ChannelInterface({"channel": 2, "test_name": "cellbench-ci", "schedule_name": "Formation_C10.sdx",
                           "ip_address": "127.0.0.1", "port": served_arbin, "timeout_s": 3.0,
                           "msg_buffer_size": 4096}, env_path=str(env))
    assert ch.get_num_channels() == 8
    status = ch.read_channel_status()
    assert status["status"] == "Idle" and 3.6 < status["voltage_v"] < 3.8
    assert ch.start_test()  # assigns the schedule, then starts it
    time.sleep(0.3)
    running = ch.read_channel_status()
    assert running["status"] == "Charge" and running["current_a"] == pytest.approx(0.35e-3, rel=1e-3)
    assert running["schedule"] == "Formation_C10.sdx" and running["testname"] == "cellbench-ci"
    assert running["test_time_s"] > 0 and running["voltage_v"] > status["voltage_v"]
    assert ch.set_meta_variable(mv_num=1, mv_value=2.5)
    assert ch.stop_test()
    assert ch.read_channel_status()["status"] == "Idle"
    assert not ch.set_meta_variable(mv_num=1, mv_value=1.0)  # not running: refused (0x12, as the document says)


def test_a_wrong_login_is_refused(served_arbin: int, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pyctiarbin import ChannelInterface

    env = tmp_path / ".env"
    env.write_text("ARBIN_CTI_USERNAME=tester\nARBIN_CTI_PASSWORD=wrong\n")
    with caplog.at_level(logging.ERROR, logger="pyctiarbin"), pytest.raises(AssertionError):
        # pycti-arbin asserts its login succeeded, after logging the cycler's answer: a refusal, not a timeout (this
        # test once caught any exception: pycti-arbin's own check of channel 0, before it ever connected)
        ChannelInterface({"channel": 1, "ip_address": "127.0.0.1", "port": served_arbin, "timeout_s": 3.0,
                          "msg_buffer_size": 4096}, env_path=str(env))
    assert "Login failed with provided credentials!" in caplog.text

    async def ours() -> None:
        with pytest.raises(InstrumentError, match="login refused"):
            await ArbinCTI.open(f"TCPIP::127.0.0.1::{served_arbin}::SOCKET", name="a1", login="tester:wrong")

    asyncio.run(ours())


async def test_our_driver_runs_a_schedule_and_stops_the_channel() -> None:
    loop = asyncio.get_running_loop()
    sim = ArbinSim([SolidStateCell(soc=0.3) for _ in range(4)], loop.time, username="u", password="p")
    server = await ArbinServer(sim).start()
    cti = await ArbinCTI.open(server.resource, name="a1", login="u:p")
    try:
        assert cti.channels == 4 and "SIM-ARBIN-0001" in await cti.identify()
        with pytest.raises(InstrumentError, match="no schedule assigned"):
            await cti.start(1, "first")
        await cti.assign_schedule(1, "Formation.sdx")
        await cti.start(1, "first")
        await asyncio.sleep(0.2)
        ch = cti.channel(1)
        assert await ch.output_is_on() and (await ch.measure()).current == pytest.approx(0.35e-3)
        await cti.set_meta_variable(1, 5, 4.1)
        assert sim.channels[1].meta == {5: pytest.approx(4.1)}
        with pytest.raises(InstrumentError, match="CTI sets no current"):
            await ch.source_current(1e-3, voltage_limit=4.2)
        await cti.output(False)  # what the guardian does: every running channel stopped
        assert not await cti.output_is_on()
    finally:
        await cti.close()
        await server.close()


ON_BOARD = """
name: formation on the cycler
sample_period: 1 min
steps:
  - schedule: {name: Formation_C10.sdx, variables: {1: 0.00025}}  # MV_UD1: its charge current, A
  - schedule: {name: Formation_C10.sdx, until: 10 min}
"""


def arbin_bench(resource: str, login: Path, channels: int = 2) -> object:
    from cellbench.bench.runner.config import BenchConfig

    return BenchConfig.model_validate({
        "name": "arbin", "instruments": {"a1": {"driver": "arbin", "resource": resource, "login_file": str(login)}},
        "cells": {f"C-{k}": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}
                  for k in range(channels)},
        "channels": {f"ch{k}": {"cycler": "a1", "cycler_channel": k, "cell": f"C-{k}"} for k in range(channels)},
    })


def test_a_profile_runs_the_cyclers_own_schedule_steered_by_a_variable_and_records_it(tmp_path: Path) -> None:
    """On-board steps: cellbench assigns and starts the schedule, sets its variable, samples it like any step,
    ends the step when the schedule finishes, and stops it itself on a limit of its own."""
    from cellbench.bench.runner.run import run_bench
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.parse import parse_profile

    text = ON_BOARD
    login = tmp_path / "arbin.login"
    login.write_text("u:p\n")
    clock = VirtualClock()
    cells = [SolidStateCell(soc=0.3) for _ in range(2)]

    charged_by_sim: list[float] = []  # channel 0's own charge counter as each new schedule starts
    reads = [0]  # channel-info requests for channel 0

    async def main() -> list[object]:
        sim = ArbinSim(cells, asyncio.get_running_loop().time, username="u", password="p")
        answer = sim.answer

        def counting(code: int, body: bytes, logged_in: bool) -> tuple[bytes, bool]:
            if code == 0xBB320004 and int.from_bytes(body[156:158], "little") == 0:
                charged_by_sim.append(sim.channels[0].charge_ah)
            if code == 0xEEAB0003 and int.from_bytes(body[8:10], "little", signed=True) == 0:
                reads[0] += 1
            return answer(code, body, logged_in)

        sim.answer = counting  # type: ignore[method-assign]
        server = await ArbinServer(sim).start()
        try:
            out = await run_bench(arbin_bench(server.resource, login), parse_profile(text), text,  # type: ignore[arg-type]
                                  clock, runs_dir=tmp_path, handle_signals=False)
            assert [ch.status for ch in sim.channels] == [0, 0]  # our limit stopped the second schedule: Idle
            return list(out)
        finally:
            await server.close()

    results = clock.run(main())
    assert [r.outcome.completed for r in results] == [True, True]  # type: ignore[attr-defined]
    with open_run(results[0].database) as store:  # type: ignore[attr-defined]
        steps, events, samples = store.steps(), store.events(), store.samples()
    assert [(s["step_type"], s["end_reason"]) for s in steps] == [
        ("Schedule", "the cycler's schedule 'Formation_C10.sdx' ended"), ("Schedule", "time 600 s")]
    assert any(e["kind"] == "schedule" and "with variables 1 = 0.00025" in e["message"] for e in events)
    first = [s for s in samples if s.step_count == 1]
    assert max(s.current for s in first) == pytest.approx(0.25e-3, rel=1e-3)  # steered: not the C/10 default
    assert {s.step_type for s in first} == {"Schedule"}
    # the charge the record integrates from one-minute samples agrees with the cycler's own counter
    assert charged_by_sim[1] > 2e-3
    assert max(s.charge_ah for s in first) == pytest.approx(charged_by_sim[1], rel=2e-3)
    assert len({round(s.test_time) for s in samples if s.step_count == 2}) >= 10
    # one status request per sample answers both the reading and whether the schedule still runs
    assert reads[0] <= len(samples) + 4, (reads[0], len(samples))


def test_host_driven_steps_on_an_arbin_and_schedules_on_a_2450_are_refused_before_the_run(tmp_path: Path) -> None:
    from cellbench.bench.runner.config import BenchConfig
    from cellbench.bench.runner.run import channel_problems
    from cellbench.profiles.parse import parse_profile

    bench = arbin_bench("TCPIP::127.0.0.1::9031::SOCKET", tmp_path / "none", 1)
    said = channel_problems(bench, "ch0", parse_profile("name: x\nsteps:\n  - charge: {current: C/10, until: 4.2 V}\n"))  # type: ignore[arg-type]
    assert said == [(("steps", 0), "arbin 'a1' runs only its own schedules: name one in a 'schedule' step")]
    smu = BenchConfig.model_validate({
        "name": "s", "instruments": {"smu1": {"driver": "keithley2450", "resource": "TCPIP::127.0.0.1::5025::SOCKET"}},
        "cells": {"c": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}},
        "channels": {"ch1": {"cycler": "smu1", "cell": "c"}}})
    said = channel_problems(smu, "ch1", parse_profile(ON_BOARD))
    assert said[0][1] == "keithley2450 'smu1' runs no schedules of its own: write the steps out"
