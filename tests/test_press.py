"""The stack-pressure press: its Modbus register map over TCP and over an RTU serial line, and its mechanics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cellbench.bench.runtime.clock import VirtualClock
from cellbench.drivers.errors import InstrumentError
from cellbench.drivers.press import StackPress
from cellbench.drivers.smu import Keithley2450
from cellbench.drivers.transport import open_transport
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.press import PressServer, PressSim
from cellbench.simulators.serial_link import NullModem
from cellbench.simulators.server import SimServer


@pytest.mark.parametrize("wire", ["tcp", "rtu"])
async def test_the_press_holds_a_pressure_over_the_real_wire(wire: str) -> None:
    loop = asyncio.get_running_loop()
    cell = SolidStateCell(soc=0.5)
    press = PressSim(loop.time, [cell], area_cm2=1.0, lag_s=0.05)
    async with NullModem() as cable:
        server = PressServer(press)
        if wire == "tcp":
            await server.start_tcp()
            resource = server.resource
        else:
            await server.start_rtu(cable.ends[0])
            resource = f"ASRL{cable.ends[1]}::INSTR"
        driver = await StackPress.open(resource, name="press", area_cm2=1.0)
        try:
            await driver.set_force_limit(2.0)
            await driver.set_pressure(5e6, ramp_pa_per_s=50e6)  # 0.5 kN at 5 kN/s on 1 cm²
            await asyncio.sleep(0.6)
            assert await driver.pressure() == pytest.approx(5e6, rel=0.02)
            assert cell.pressure_mpa == pytest.approx(5.0, rel=0.02)
            status = await driver.status()
            assert status.enabled and status.at_setpoint and not status.fault
            with pytest.raises(InstrumentError, match="illegal data address"):
                await driver._write_float(2, 1.0)  # the measured force is read-only
            with pytest.raises(InstrumentError, match="illegal data value"):
                await driver._write_word(8, 7)  # no mode 7
            snap = await driver.snapshot()
            assert snap.pressure_pa == pytest.approx(5e6, rel=0.02) and snap.platen_c == pytest.approx(25.0)
            await driver.stop()
            await asyncio.sleep(0.3)
            assert not (await driver.status()).enabled and await driver.pressure() < 1e6
            # over-force: the press faults, unloads, and refuses to start until the fault is cleared
            await driver.set_pressure(5e6, ramp_pa_per_s=50e6)
            await driver.set_force_limit(0.3)
            await asyncio.sleep(0.3)
            status = await driver.status()
            assert status.fault and status.over_force and not status.enabled
            with pytest.raises(InstrumentError, match="device failure"):
                await driver.set_pressure(2e6)
            await asyncio.sleep(0.3)  # unloading at its ramp rate
            assert await driver.force() < 0.3
            await driver.clear_fault()
            await driver.set_pressure(2e6)
            assert (await driver.status()).enabled
        finally:
            await driver.close()
            await server.close()


def test_stack_pressure_changes_polarisation_and_swelling_shows_as_displacement() -> None:
    clock = VirtualClock()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cell = SolidStateCell(soc=0.2, temperature_c=60.0)
        cell.state.formation_left_ah = 0.0  # a formed cell: all the charge plates lithium
        press = PressSim(loop.time, [cell], area_cm2=1.0)
        smu = Keithley2450Sim(cell, loop.time)
        smu.surroundings.append(press)
        server = await PressServer(press).start_tcp()
        async with SimServer(smu) as ss:
            driver = await StackPress.open(server.resource, name="press", area_cm2=1.0)
            k = Keithley2450(await open_transport(ss.resource))
            await k.setup()
            polarisation = {}
            for mpa in (1.0, 5.0, 20.0):
                await driver.set_pressure(mpa * 1e6, ramp_pa_per_s=1e6)
                await asyncio.sleep(120)
                await k.source_current(-0.5e-3, voltage_limit=4.3)
                await k.output(True)
                await asyncio.sleep(5)
                reading = await k.measure()
                polarisation[mpa] = cell.ocv() - reading.voltage
                await k.output(False)
                assert await driver.pressure() == pytest.approx(mpa * 1e6, rel=0.02)
            assert polarisation[1.0] > polarisation[5.0] > polarisation[20.0]
            await driver.tare()
            await k.source_current(1e-3, voltage_limit=4.3)  # charge: lithium plates, the stack swells
            await k.output(True)
            await asyncio.sleep(3600)
            await k.measure()
            swelling = await driver.displacement_um()
            assert swelling == pytest.approx(1.0 * (4.85 - 0.4), rel=0.02)  # 1 mAh/cm² plated
            await driver.close()
        await server.close()

    clock.run(main())


def crc16(frame: bytes) -> bytes:
    """Modbus RTU's CRC-16 (polynomial 0xA001, initial 0xFFFF), low byte first."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes([crc & 0xFF, crc >> 8])


async def test_the_press_answers_a_modbus_client_as_the_spec_says() -> None:
    """pymodbus' own client over TCP."""
    from pymodbus.client import AsyncModbusTcpClient

    press = PressSim(asyncio.get_running_loop().time, [SolidStateCell(soc=0.5)], area_cm2=1.0)
    server = await PressServer(press).start_tcp()
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port)
    try:
        assert await client.connect()
        echo = await client.write_register(9, 3, device_id=1)  # command 3: tare; the command register reads 0
        assert not echo.isError() and echo.registers == [3]  # the reply echoes the value written
        assert (await client.read_holding_registers(9, count=1, device_id=1)).registers == [0]  # reads 0
    finally:
        client.close()
        await server.close()


async def test_on_a_shared_rs485_line_the_press_answers_only_its_own_unit() -> None:
    import os

    press = PressSim(asyncio.get_running_loop().time, [SolidStateCell(soc=0.5)], area_cm2=1.0)
    async with NullModem() as cable:
        server = await PressServer(press, device_id=1).start_rtu(cable.ends[0])
        fd = os.open(cable.ends[1], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            async def ask(frame: bytes, wait: float = 0.5) -> bytes:
                os.write(fd, frame + crc16(frame))
                await asyncio.sleep(wait)
                try:
                    return os.read(fd, 256)
                except BlockingIOError:
                    return b""

            assert (await ask(bytes([1, 3, 0, 8, 0, 1])))[:3] == bytes([1, 3, 2])  # unit 1: answered
            assert await ask(bytes([2, 3, 0, 8, 0, 1])) == b""  # unit 2's request: silence
            assert await ask(bytes([0, 6, 0, 8, 0, 2])) == b""  # a broadcast: carried out, not answered
            assert press.mode == 2
        finally:
            os.close(fd)
            await server.close()


def test_position_hold_keeps_the_platen_still_and_the_force_follows_the_swelling() -> None:
    t = [0.0]
    cell = SolidStateCell(soc=0.2)
    press = PressSim(lambda: t[0], [cell], area_cm2=1.0, lag_s=0.05)
    press.position_setpoint_mm = 10.0 + press.displacement_um() / 1000.0 - 0.5 / press.stiffness  # 0.5 kN there
    press.mode, press.enabled, press.ramp_kn_s = 2, True, 10.0
    t[0] = 5.0
    press.advance()
    assert press.force_kn == pytest.approx(0.5, rel=0.01)  # held, not unloaded
    cell.state.soc = 0.8  # lithium plates: the stack swells against the held platen
    t[0] = 10.0
    press.advance()
    swell_mm = (cell.thickness_change_um() - SolidStateCell(soc=0.2).thickness_change_um()) / 1000.0
    assert press.force_kn == pytest.approx(0.5 + swell_mm * press.stiffness, rel=0.01)


async def test_a_load_cell_under_a_spring_fixture_reads_the_stack_and_cannot_set_it() -> None:
    from cellbench.drivers.press import LoadCell
    from cellbench.simulators.press import LoadCellSim

    cell = SolidStateCell(soc=0.2)
    sensor = LoadCellSim(asyncio.get_running_loop().time, [cell], preload_kn=0.5, spring_kn_per_mm=5.0,
                         capacity_kn=1.0, area_cm2=1.0)
    server = await PressServer(sensor).start_tcp()
    driver = await LoadCell.open(server.resource, name="lc", area_cm2=1.0)
    try:
        assert await driver.capacity_kn() == pytest.approx(1.0)
        snap = await driver.snapshot()
        assert snap.pressure_pa == pytest.approx(5e6)  # 0.5 kN on 1 cm²
        assert snap.platen_c != snap.platen_c  # NaN: a load cell has no thermocouple
        cell.state.soc = 0.8  # the stack swells against the spring
        swell_mm = (cell.thickness_change_um() - SolidStateCell(soc=0.2).thickness_change_um()) / 1000.0
        assert await driver.force() == pytest.approx(0.5 + 5.0 * swell_mm, rel=1e-5)
        await driver.tare()
        assert await driver.force() == pytest.approx(0.0, abs=1e-6)
        with pytest.raises(InstrumentError, match=r"cannot set a pressure \(5 MPa asked\)"):
            await driver.set_pressure(5e6)
        sensor.preload_kn = 2.0  # somebody over-tightens the fixture: beyond the cell's 1 kN
        assert (await driver.status()).over_force
        sensor.preload_kn = 0.5
        assert (await driver.status()).over_force  # latched
        await driver.clear_fault()
        assert not (await driver.status()).over_force
    finally:
        await driver.close()
        await server.close()


def test_a_profile_that_sets_a_pressure_is_refused_on_a_load_cell_channel(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app

    bench = tmp_path / "bench.yaml"
    bench.write_text(
        "name: fixture\ninstruments:\n  smu1: {driver: keithley2450, resource: \"TCPIP::127.0.0.1::5025::SOCKET\"}\n"
        "  lc: {driver: modbus-load-cell, resource: \"TCPIP::127.0.0.1::502::SOCKET\"}\n"
        "cells:\n  c: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}\n"
        "channels:\n  ch1: {cycler: smu1, cell: c, press: lc}\n")
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\nsteps:\n  - set: {pressure: 5 MPa}\n  - rest: 1 min\n")
    result = CliRunner().invoke(app, ["run", str(profile), "--bench", str(bench), "--runs-dir", str(tmp_path)],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "p.yaml:3: steps[0]: sets a pressure, but the channel's press only reads (a load cell)" in result.output


@pytest.mark.xdist_group("fixed-ports")  # the simulators' default ports: never two such tests at once
def test_the_press_is_served_on_the_port_its_document_names() -> None:
    """docs/protocols/press.md: a real PLC on Modbus TCP's 502, the simulator on 5502 by default (502 needs root);
    a pymodbus client reads the measured force there."""
    import re
    import socket as sockets

    from pymodbus.client import ModbusTcpClient

    from tests.test_cli import serve

    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "protocols" / "press.md").read_text().split())
    port = int(re.search(r"listens on (\d+) by default", doc).group(1))  # type: ignore[union-attr]
    with sockets.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.skip(f"port {port} is taken on this machine")
    proc, resource = serve("press")
    try:
        assert resource == f"TCPIP::127.0.0.1::{port}::SOCKET" and port == 5502
        client = ModbusTcpClient("127.0.0.1", port=port)
        assert client.connect()  # type: ignore[no-untyped-call]
        reply = client.read_holding_registers(2, count=2, device_id=1)
        assert not reply.isError() and len(reply.registers) == 2
        client.close()  # type: ignore[no-untyped-call]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
