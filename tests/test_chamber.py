"""The ESPEC chamber: exact wire traffic, the real wire (TCP and a pty serial line), and its physics."""

from __future__ import annotations

import asyncio

import pytest

from cellbench.bench.runtime.clock import VirtualClock
from cellbench.drivers.chamber import EspecChamber
from cellbench.drivers.errors import InstrumentError
from cellbench.drivers.smu import Keithley2450
from cellbench.drivers.transport import Backend, open_transport
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.espec import EspecChamberSim
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.server import PtySimServer, SimServer
from tests.conftest import scripted

CRLF = {"read_termination": b"\r\n", "write_termination": b"\r\n"}


async def test_setting_the_temperature_sends_the_manuals_command() -> None:
    async with scripted(("TEMP, S60.0", "OK:TEMP, S60.0"), ("MODE, CONSTANT", "OK:MODE, CONSTANT")) as io:
        chamber = EspecChamber(io)
        await chamber.set_temperature(60)
        await chamber.set_mode("constant")


async def test_na_replies_raise_with_the_chambers_words() -> None:
    async with scripted(("TEMP, S500.0", "NA:DATA OUT OF RANGE"), ("1,MODE?", "NA:ADDR ERR")) as io:
        with pytest.raises(InstrumentError, match="NA:DATA OUT OF RANGE"):
            await EspecChamber(io).set_temperature(500)
        with pytest.raises(InstrumentError, match="NA:ADDR ERR"):
            await EspecChamber(io, address=1).mode()


@pytest.mark.parametrize("wire", ["tcp", "pty-native", "pty-visa"])
async def test_the_driver_over_the_real_wire(wire: str) -> None:
    sim = EspecChamberSim(asyncio.get_running_loop().time)
    server = PtySimServer(sim, **CRLF) if wire.startswith("pty") else SimServer(sim, **CRLF)
    async with server:
        backend: Backend = "visa" if wire == "pty-visa" else "native"
        io = await open_transport(
            server.resource, name="chamber", timeout=2.0, read_termination="\r\n", write_termination="\r\n",
            backend=backend, baud_rate=9600,
        )
        try:
            chamber = EspecChamber(io)
            assert await chamber.identify() == "T,S2,160.0"
            await chamber.set_temperature(45.5)
            await chamber.set_alarms(upper=90, lower=-10)
            await chamber.set_mode("CONSTANT")
            status = await chamber.temperature()
            assert (status.setpoint, status.upper_alarm, status.lower_alarm) == (45.5, 90.0, -10.0)
            assert status.measured == pytest.approx(25.0, abs=0.5)
            assert await chamber.mode() == "CONSTANT"
            assert await chamber.alarms() == []
            with pytest.raises(InstrumentError, match="NA:CONT NOT READY"):
                await chamber._ask("HUMI?")  # this chamber has no humidity control
            # the highest setpoint is what TYPE? reports (T,S2,160.0): above it the chamber refuses the setting
            maximum = float((await chamber.identify()).split(",")[2])
            await chamber.set_alarms(upper=maximum, lower=-10)
            await chamber.set_temperature(maximum)
            with pytest.raises(InstrumentError, match="NA:DATA OUT OF RANGE"):
                await chamber.set_temperature(maximum + 10)  # 170 degC on a 160 degC chamber
            with pytest.raises(InstrumentError, match="NA:DATA OUT OF RANGE"):  # with its alarm raised to match
                await chamber._ask(f"TEMP, S{maximum + 10:.1f} H{maximum + 15:.1f}")
            assert (await chamber.temperature()).setpoint == maximum
        finally:
            await io.close()


def test_the_air_follows_the_setpoint_no_faster_than_the_ramp_limit_and_the_cell_lags_it() -> None:
    clock = VirtualClock()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cell = SolidStateCell(soc=0.5)
        chamber = EspecChamberSim(loop.time, [cell], max_ramp_c_per_min=2.0)
        smu = Keithley2450Sim(cell, loop.time)
        smu.surroundings.append(chamber)
        async with SimServer(chamber, **CRLF) as cs, SimServer(smu) as ss:
            cio = await open_transport(cs.resource, read_termination="\r\n", write_termination="\r\n")
            sio = await open_transport(ss.resource)
            ch, k = EspecChamber(cio), Keithley2450(sio)
            await k.setup()
            await k.source_current(-1e-3, voltage_limit=4.3)
            await k.output(True)
            await asyncio.sleep(1)
            cold = await k.measure()
            cold_polarisation = cell.ocv() - cold.voltage
            await ch.set_temperature(60)
            await ch.set_mode("CONSTANT")
            await asyncio.sleep(60)
            after_a_minute = (await ch.temperature()).measured
            assert after_a_minute == pytest.approx(27.0, abs=0.05)  # 2 degC/min, not more
            await asyncio.sleep(3600)
            air = (await ch.temperature()).measured
            assert air == pytest.approx(60.0, abs=0.2)
            await k.measure()  # the cell's physics advances as the cycler talks to it
            assert 35 < cell.temperature_c < air  # the pellet's die lags the air (tau ~ 2000 s)
            await asyncio.sleep(5 * 3600)
            warm = await k.measure()
            assert cell.temperature_c == pytest.approx(60.0, abs=0.2)
            # warmer electrolyte and interfaces: far less polarisation under the same 1 mA discharge
            assert cell.ocv() - warm.voltage < 0.3 * cold_polarisation
            await cio.close()
            await sio.close()

    clock.run(main())


@pytest.mark.parametrize(("sent", "answer"), [
    ("TEMP,S35.0", "OK:TEMP,S35.0"),  # echoed as sent: no space added
    ("TEMP, S35.0", "OK:TEMP, S35.0"),
    ("TEMP,S150.0", "NA:DATA OUT OF RANGE"),  # beyond the upper alarm (140)
    ("TEMP, H20.0", "NA:DATA OUT OF RANGE"),  # an upper alarm below the setpoint (25)
    ("TEMP, S60.0 H70.0", "OK:TEMP, S60.0 H70.0"),  # both in one command, consistent
    ("MODE,CONSTANT", "OK:MODE,CONSTANT"),
    ("HUMI?", "NA:CONT NOT READY-1"),  # a temperature-only chamber
    ("BOGUS?", "NA:CMD ERR"),
])
def test_the_chamber_answers_as_the_controller_writes_it(sent: str, answer: str) -> None:
    assert EspecChamberSim(lambda: 0.0).handle(sent) == answer


def test_power_off_and_on_as_the_controller_reports_them() -> None:
    chamber = EspecChamberSim(lambda: 0.0)
    chamber.handle("MODE, CONSTANT")
    assert chamber.handle("POWER,OFF") == "OK:POWER,OFF"
    assert (chamber.handle("MON?") or "").split(",")[2] == "OFF"  # switched off, it still reports: mode OFF
    assert chamber.handle("TEMP, S40.0") == "NA:CONT NOT READY-1"  # but takes no setting
    assert chamber.handle("POWER, ON") == "OK:POWER, ON"
    assert chamber.handle("MODE?") == "STANDBY"  # powered up: ready, not controlling
