"""The 2450 driver: exact wire traffic against a script, and real behaviour over real wires."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cellbench.drivers.errors import InstrumentError, ProtocolError
from cellbench.drivers.smu import Keithley2450
from cellbench.drivers.transport import Backend, open_transport
from cellbench.roles import BlockLimit, BlockPlan, BlockReading
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.server import SimServer
from tests.conftest import scripted

NO_ERROR = '0,"No error;0;0 0"'


async def test_source_current_arms_the_voltage_limit_before_the_level() -> None:
    async with scripted(
        (':SOUR:FUNC CURR;:SOUR:CURR:VLIM 4.3;:SOUR:CURR 0.001;:SENS:FUNC "VOLT"', None),
        (":SYST:ERR?", NO_ERROR),
    ) as io:
        await Keithley2450(io).source_current(0.001, voltage_limit=4.3)


async def test_source_voltage_arms_the_current_limit_before_the_level() -> None:
    async with scripted(
        (':SOUR:FUNC VOLT;:SOUR:VOLT:ILIM 0.0005;:SOUR:VOLT 4.2;:SENS:FUNC "CURR"', None),
        (":SYST:ERR?", NO_ERROR),
    ) as io:
        await Keithley2450(io).source_voltage(4.2, current_limit=5e-4)


async def test_configuring_raises_the_instruments_own_error_text() -> None:
    async with scripted(
        (":OUTP ON", None),
        (":SYST:ERR?", '-222,"Data out of range;1;2026/01/01 00:00:00.000"'),
        (":SYST:ERR?", NO_ERROR),
    ) as io:
        with pytest.raises(InstrumentError, match="-222: Data out of range") as info:
            await Keithley2450(io).output(True)
    assert info.value.command == ":OUTP ON"


async def test_setup_refuses_an_instrument_in_tsp_mode() -> None:
    async with scripted(("*LANG?", "TSP")) as io:
        with pytest.raises(InstrumentError, match="switch the instrument to SCPI"):
            await Keithley2450(io).setup()


async def test_a_reading_that_does_not_parse_names_the_reply() -> None:
    async with scripted((":OUTP?", "1"), (":SOUR:FUNC?", "CURR"),
                        (':READ? "defbuffer1", READ, SOUR', "3.9,oops")) as io:
        with pytest.raises(ProtocolError, match=r"3\.9,oops"):
            await Keithley2450(io).measure()


async def test_a_new_connection_asks_the_source_function_before_it_parses_a_reading() -> None:
    """A new connection (a reconnect) to a 2450 that kept sourcing a current: a reading is (measured, sourced), so
    its meaning depends on the source function, which a fresh driver once guessed as voltage (3.76 V at 1 mA read
    as 1 mV at 3.76 A, a safety stop). It asks."""
    async with scripted((":OUTP?", "1"), (":SOUR:FUNC?", "CURR"),
                        (':READ? "defbuffer1", READ, SOUR', "3.764318E+00,1.000000E-03")) as io:
        reading = await Keithley2450(io).measure()
    assert (reading.voltage, reading.current) == (3.764318, 1e-3)


async def test_manual_page_2_83_the_open_circuit_voltage_is_read_as_a_0_a_source_never_with_the_relay_open() -> None:
    """The output off in the high-impedance state opens its relay: the manual says nothing can be measured there.
    The first reading of a run (the output off) is taken as the manual allows: on as a 0 A current source under
    a voltage limit, one reading, off again."""
    async with scripted(
        (":OUTP?", "0"),
        (':SOUR:FUNC CURR;:SOUR:CURR:VLIM 21;:SOUR:CURR 0;:SENS:FUNC "VOLT";:OUTP ON', None),
        (":SYST:ERR?", NO_ERROR),
        (':READ? "defbuffer1", READ', "3.8123"),
        (":OUTP OFF", None),
        (":SYST:ERR?", NO_ERROR),
    ) as io:
        reading = await Keithley2450(io).measure()
    assert (reading.voltage, reading.current) == (3.8123, 0.0)


async def test_an_open_circuit_reading_leaves_the_steps_source_as_it_was_set() -> None:
    """A step sets its source with the output still off (the first step of a run); a reading taken then (the
    supervisor's) must not leave its 0 A / 21 V set-up behind: the step's own is sent again after it."""
    step = ':SOUR:FUNC CURR;:SOUR:CURR:VLIM 4.2;:SOUR:CURR 0.001;:SENS:FUNC "VOLT"'
    async with scripted(
        (":OUTP OFF", None), (":SYST:ERR?", NO_ERROR),
        (step, None), (":SYST:ERR?", NO_ERROR),
        (':SOUR:FUNC CURR;:SOUR:CURR:VLIM 21;:SOUR:CURR 0;:SENS:FUNC "VOLT";:OUTP ON', None),
        (":SYST:ERR?", NO_ERROR),
        (':READ? "defbuffer1", READ', "3.8"),
        (":OUTP OFF", None), (":SYST:ERR?", NO_ERROR),
        (step, None), (":SYST:ERR?", NO_ERROR),  # the step's set-up again
        (":OUTP ON", None), (":SYST:ERR?", NO_ERROR),
    ) as io:
        smu = Keithley2450(io)
        await smu.output(False)
        await smu.source_current(1e-3, voltage_limit=4.2)
        assert (await smu.measure()).voltage == 3.8
        await smu.output(True)


async def test_over_the_wire_the_relay_open_reads_nothing_and_the_driver_reads_the_cell(smu_sim: SimServer) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=2.0)
    smu = Keithley2450(io)
    try:
        await smu.setup()  # HIMP off states, output off
        assert float((await io.query(':READ? "defbuffer1", READ')).split(",")[0]) == pytest.approx(9.9e37)
        cell = smu_sim.instrument.cell  # type: ignore[attr-defined]
        reading = await smu.measure()
        assert reading.voltage == pytest.approx(cell.ocv(), abs=2e-3) and reading.current == 0.0
        assert not await smu.output_is_on()
    finally:
        await io.close()


@pytest.mark.parametrize("backend", ["native", "visa"])
async def test_cc_charge_over_the_wire_turns_into_cv_at_the_voltage_limit(
    smu_sim: SimServer, backend: Backend
) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=2.0, backend=backend)
    smu = Keithley2450(io)
    try:
        assert (await smu.setup()).startswith("KEITHLEY INSTRUMENTS,MODEL 2450,")
        cell = smu_sim.instrument.cell  # type: ignore[attr-defined]
        ocv = cell.ocv()
        # 1 mA into the half-charged pellet: V = OCV + I·R, well below the limit
        await smu.source_current(1e-3, voltage_limit=4.3)
        await smu.output(True)
        await asyncio.sleep(0.2)  # the interfacial RC (20 ms) settles
        r = await smu.measure()
        assert r.current == pytest.approx(1e-3)
        assert r.voltage == pytest.approx(ocv + 1e-3 * cell.dc_resistance(), abs=2e-3)
        # a voltage limit just above OCV: the source stops at it and the current falls
        await smu.source_current(1e-3, voltage_limit=round(ocv + 0.02, 3))
        await asyncio.sleep(0.2)  # the interfacial RC (20 ms) settles
        r = await smu.measure()
        assert r.voltage == pytest.approx(round(ocv + 0.02, 3), abs=1e-6)
        assert 0 < r.current < 1e-3
        assert await io.query(":SOUR:CURR:VLIM:TRIP?") == "1"
        await smu.output(False)
        assert not await smu.output_is_on()
    finally:
        await io.close()


async def test_voltage_source_stops_at_its_current_limit(smu_sim: SimServer) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=2.0)
    smu = Keithley2450(io)
    try:
        await smu.setup()
        await smu.source_voltage(2.8, current_limit=2e-4)  # far below OCV: would sink a lot
        await smu.output(True)
        await asyncio.sleep(0.2)  # the interfacial RC (20 ms) settles
        r = await smu.measure()
        assert r.current == pytest.approx(-2e-4)
        assert r.voltage > 2.8
        assert await smu.measure_current() == pytest.approx(-2e-4)
    finally:
        await io.close()


async def test_a_raw_socket_client_gets_scpi_replies(smu_sim: SimServer) -> None:
    reader, writer = await asyncio.open_connection(smu_sim.host, smu_sim.port)
    writer.write(b"*idn?;:syst:err?\n")
    line = await asyncio.wait_for(reader.readline(), 2)
    writer.close()
    assert line.decode().strip() == 'KEITHLEY INSTRUMENTS,MODEL 2450,SIM0001,1.7.12b;0,"No error;0;0 0"'


async def _block_to_its_end(smu: Keithley2450) -> list[BlockReading]:
    readings: list[BlockReading] = []
    for _ in range(400):
        got, ended = await smu.block_readings()
        readings += got
        if ended:
            return readings
        await asyncio.sleep(0.05)
    raise AssertionError("the block did not end")


async def test_a_step_run_on_the_instrument_ends_at_the_reading_that_crossed(smu_sim: SimServer) -> None:
    """Over the wire, on the real clock: a constant-current discharge built as the 2450's trigger model. The
    instrument judges the cut-off at each of its readings and turns its output off there: the recorded end is the
    first reading below the cut-off (every earlier one above it), the readings 20 ms apart by the instrument's
    own times whatever the host's polling; meanwhile a supervisor's reading is the buffer's newest (a :READ?
    would be refused). The safety window ends a charge the same way, and an abort stops a block mid-way."""
    io = await open_transport(smu_sim.resource, name="smu", timeout=2.0)
    smu = Keithley2450(io)
    try:
        await smu.setup()
        cell = smu_sim.instrument.cell  # type: ignore[attr-defined]
        # a constant voltage 50 mV above the resting cell ends when its current tapers to what the cell's
        # resistance over 1 s lets through (inside +-that)
        hold, tapered = cell.ocv() + 0.05, 0.05 / cell.thevenin(1.0)[1]
        taper = BlockLimit("inside", -tapered, tapered)
        await smu.start_block(BlockPlan("voltage", hold, 0.1, period=0.02, count=10_000, stop=taper))
        readings = await _block_to_its_end(smu)
        assert abs(readings[-1].current) < tapered <= min(abs(r.current) for r in readings[:-1])
        assert all(r.voltage == pytest.approx(hold) for r in readings) and not await smu.output_is_on()
        loaded = cell.ocv() - 20e-3 * cell.dc_resistance()  # the voltage at once under 20 mA
        cut_off = round(loaded - 0.02, 4)
        plan = BlockPlan("current", -20e-3, 5.0, period=0.02, count=10_000, stop=BlockLimit("below", cut_off),
                         window=(2.0, 4.5))
        await smu.start_block(plan)
        await asyncio.sleep(0.1)
        mid = await smu.measure()  # the supervisor's read while the block runs: from the buffer
        assert mid.current == pytest.approx(-20e-3) and mid.voltage > cut_off
        readings = await _block_to_its_end(smu)
        volts = [r.voltage for r in readings]
        assert volts[-1] < cut_off <= min(volts[:-1]) and len(readings) > 5
        assert [round(b.t - a.t, 6) for a, b in itertools.pairwise(readings)] == [0.02] * (len(readings) - 1)
        assert not await smu.output_is_on()  # the instrument turned it off at the crossing
        assert await smu.errors() == []
        # the safety window (OUTSide) alone ends the same discharge at its lower edge, the output off
        floor = round(cell.ocv() - 20e-3 * cell.dc_resistance() - 0.02, 4)
        await smu.start_block(BlockPlan("current", -20e-3, 5.0, period=0.02, count=10_000, window=(floor, 4.5)))
        readings = await _block_to_its_end(smu)
        assert readings[-1].voltage < floor <= min(r.voltage for r in readings[:-1])
        assert not await smu.output_is_on()
        # an abort mid-block: the model stops, then the output goes off as asked
        await smu.start_block(BlockPlan("current", -1e-3, 5.0, period=0.02, count=10_000))
        await asyncio.sleep(0.1)
        await smu.output(False)
        assert (await io.query(":TRIG:STAT?")).startswith("ABORTED") and not await smu.output_is_on()
        assert await smu.errors() == []
    finally:
        await io.close()


async def test_a_new_connection_stops_a_step_a_dead_controller_left_running_and_turns_it_off(
        smu_sim: SimServer) -> None:
    """A controller killed while the 2450 ran a step on its trigger model: the guardian's new connection (setup,
    then output off, as it does) stops the model and turns the output off; the blind off does the same."""
    for off in ("connection", "blind"):
        io = await open_transport(smu_sim.resource, name="smu", timeout=2.0)
        smu = Keithley2450(io)
        await smu.setup()
        await smu.start_block(BlockPlan("current", 1e-3, 5.0, period=0.05, count=10_000))
        await io.close()  # the controller dies: its connection goes, the model runs on
        sim = smu_sim.instrument
        assert isinstance(sim, Keithley2450Sim) and sim.trigger is not None
        assert sim.trigger.running and sim.tree.values["output"] is True
        if off == "connection":
            io = await open_transport(smu_sim.resource, name="guardian", timeout=2.0)
            guardian = Keithley2450(io)
            await guardian.setup()
            await guardian.output(False)
            assert await guardian.errors() == []
            await io.close()
        else:
            from cellbench.drivers.registry import OpenRequest
            from cellbench.drivers.smu import _blind_off
            await _blind_off(OpenRequest(name="smu", resource=smu_sim.resource, timeout=2.0))
            await asyncio.sleep(0.1)
        assert not sim.trigger.running and sim.tree.values["output"] is False, off
