"""The Arbin cycler over CTI: the Battery Data Alliance's pycti-arbin (a client we did not write) against our
simulator served by `cellbench sim serve arbin`, and our driver against it."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellbench.drivers.arbin import ArbinCTI
from cellbench.drivers.errors import InstrumentError
from cellbench.simulators.arbin import ArbinServer, ArbinSim
from cellbench.simulators.cell import SolidStateCell


@pytest.fixture
def served_arbin() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellbench.bench.cli", "sim", "serve", "arbin", "--port", "0", "--channels", "8",
         "--login", "tester:s3cret", "--soc", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"})
    assert proc.stdout is not None
    port, deadline = None, time.monotonic() + 30
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.search(r"TCPIP::127\.0\.0\.1::(\d+)::SOCKET", line):
            port = int(m.group(1))
    if port is None:
        proc.kill()
        raise AssertionError("sim serve arbin did not announce its port")
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
    assert not ch.set_meta_variable(mv_num=1, mv_value=1.0)  # not running: refused (result 17)


def test_a_wrong_login_is_refused(served_arbin: int, tmp_path: Path) -> None:
    from pyctiarbin import ChannelInterface

    env = tmp_path / ".env"
    env.write_text("ARBIN_CTI_USERNAME=tester\nARBIN_CTI_PASSWORD=wrong\n")
    with pytest.raises(Exception):  # noqa: B017  (pycti-arbin asserts its login succeeded)
        ChannelInterface({"channel": 0, "ip_address": "127.0.0.1", "port": served_arbin, "timeout_s": 3.0,
                          "msg_buffer_size": 4096}, env_path=str(env))

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
