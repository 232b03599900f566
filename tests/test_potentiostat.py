"""The MethodSCRIPT potentiostat: the package parser, errors, the driver over a real serial line, aborts."""

from __future__ import annotations

import asyncio
import math

import pytest

from drivers.errors import InstrumentError, InstrumentTimeout
from drivers.methodscript import MethodScriptError, PalmSens, check_error, decode_value, parse_package, si
from drivers.transport import open_transport
from simulators.cell import SolidStateCell
from simulators.palmsens import PalmSensSim, encode
from simulators.server import PtySimServer


def test_the_published_example_package_decodes() -> None:
    f, zr, zi = parse_package("PdcDF5DFF4u;cc896D904m,10,287;cd82DB1A8u,10,287")
    assert (f.var_type, zr.var_type, zi.var_type) == ("dc", "cc", "cd")
    assert f.value == pytest.approx(99.9997, abs=1e-4)
    assert zr.value == pytest.approx(9885.956, abs=1e-3)
    assert zi.value == pytest.approx(2.9946, abs=1e-4)
    assert zr.current_range == 0x87 and zr.status == 0


def test_status_bits_nan_and_integers() -> None:
    v = decode_value("ba8000000 ,16,205")
    assert v.value == 0.0 and v.flags == ["overload", "underload"] and v.current_range == 5
    assert math.isnan(decode_value("ab     nan").value)
    assert decode_value("eb8000010i").value == 16


@pytest.mark.parametrize("bad", ["Pxx123", "PdcDF5DF", "PdcDF5DFF4q", "Q", "P"])
def test_garbage_and_truncated_packages_are_clear_errors(bad: str) -> None:
    with pytest.raises(ValueError, match=r"MethodSCRIPT value|data package"):
        parse_package(bad)


def test_errors_are_found_after_other_text() -> None:
    assert check_error("!0006") == "0006"
    assert check_error("Z!0006") == "0006"
    assert check_error("P...") is None


def test_si_and_encode_round_trip() -> None:
    assert [si(x) for x in (15e-3, 200e3, 0.0, 1e6, 0.1)] == ["15m", "200k", "0", "1M", "100m"]
    for value in (9885.956, -2.5e-9, 0.0, 4.3, 1.0e6):
        assert decode_value(encode("cc", value)).value == pytest.approx(value, rel=1e-6, abs=1e-15)


@pytest.fixture
async def pstat_server():
    sim = PalmSensSim(SolidStateCell(soc=0.5), asyncio.get_running_loop().time, noise=0.0)
    async with PtySimServer(sim) as server:
        yield server


@pytest.mark.parametrize("backend", ["native", "visa"])
async def test_eis_over_the_serial_line_matches_the_cells_impedance(pstat_server: PtySimServer, backend: str) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, backend=backend, baud_rate=230400)
    try:
        pstat = PalmSens(io)
        assert "MethodSCRIPT" in await pstat.identify()
        points = await pstat.impedance(f_start=100e3, f_end=10, n_points=5, amplitude=10e-3)
        cell = pstat_server.instrument.cell  # type: ignore[attr-defined]
        assert [round(p.frequency) for p in points] == [100000, 10000, 1000, 100, 10]
        for p in points:
            z = cell.impedance(p.frequency)
            assert (p.z_real, p.z_imag) == (pytest.approx(z.real, rel=1e-5), pytest.approx(z.imag, rel=1e-5))
        potentials = await pstat.open_circuit_potential(interval=0.05, duration=0.2)
        assert potentials and all(p == pytest.approx(cell.ocv(), abs=1e-3) for p in potentials)
    finally:
        await io.close()


async def test_an_unknown_script_command_is_an_instrument_error(pstat_server: PtySimServer) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, baud_rate=230400)
    try:
        with pytest.raises(InstrumentError, match="!4003"):
            await PalmSens(io).run(["var f", "frobnicate f"])
    finally:
        await io.close()


async def test_garbage_on_the_line_is_reported_with_the_line(pstat_server: PtySimServer) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, baud_rate=230400)
    try:
        pstat_server.faults.garbage = True
        with pytest.raises(MethodScriptError, match="garbage"):
            await PalmSens(io).run(["var f", "cell_on", "cell_off"])
    finally:
        await io.close()


async def test_an_abort_mid_measurement_stops_the_sweep(pstat_server: PtySimServer) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=30, baud_rate=230400)
    pstat = PalmSens(io)
    try:
        sweep = asyncio.ensure_future(pstat.impedance(f_start=10e3, f_end=0.1, n_points=21, amplitude=10e-3))
        await asyncio.sleep(0.5)  # a few high-frequency points are done; the slow ones take seconds each
        await pstat.abort()
        points = await asyncio.wait_for(sweep, 5)
        assert 0 < len(points) < 21
        assert pstat_server.instrument.cell_on is False  # type: ignore[attr-defined]
        with pytest.raises(InstrumentTimeout):  # and nothing is left running: Z now answers Z!0006
            await io.query_lines("Z", lambda line: line == "never", timeout=0.3)
    finally:
        await io.close()
