"""The MethodSCRIPT potentiostat: the package parser, errors, the driver over a real serial line, aborts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cellbench.drivers.errors import InstrumentError, InstrumentTimeout
from cellbench.drivers.methodscript import (
    MethodScriptError,
    PalmSens,
    check_error,
    cp_script,
    decode_value,
    eis_script,
    ocp_script,
    parse_package,
    si,
)
from cellbench.drivers.transport import Backend, open_transport
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.palmsens import PalmSensSim, encode
from cellbench.simulators.server import PtySimServer, SimServer


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
async def pstat_server() -> AsyncIterator[SimServer]:
    sim = PalmSensSim(SolidStateCell(soc=0.5), asyncio.get_running_loop().time, noise=0.0)
    async with PtySimServer(sim) as server:
        yield server


@pytest.mark.parametrize("backend", ["native", "visa"])
async def test_eis_over_the_serial_line_matches_the_cells_impedance(pstat_server: SimServer,
                                                                   backend: Backend) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, backend=backend, baud_rate=230400)
    try:
        pstat = PalmSens(io)
        assert "MethodSCRIPT" in await pstat.identify()
        points = await pstat.impedance(f_start=100e3, f_end=10, n_points=5, amplitude=10e-3)
        cell = pstat_server.instrument.cell  # type: ignore[attr-defined]
        assert [round(p.frequency) for p in points] == [100000, 10000, 1000, 100, 10]
        for p in points:
            z = cell.impedance(p.frequency)
            assert p.z_real == pytest.approx(z.real, rel=1e-5) and p.z_imag == pytest.approx(z.imag, rel=1e-5)
        galvanostatic = await pstat.galvanostatic_impedance(f_start=1e3, f_end=100, n_points=2, amplitude=1e-5)
        assert galvanostatic[0].z_real == pytest.approx(cell.impedance(1e3).real, rel=1e-5)
        under_current = await pstat.chronopotentiometry(current=-1e-3, interval=0.05, duration=0.2)
        e, r = cell.thevenin(0.05)
        assert under_current and all(v == pytest.approx(e - 1e-3 * r, abs=1e-3) for v in under_current)
        potentials = await pstat.open_circuit_potential(interval=0.05, duration=0.2)
        assert potentials and all(p == pytest.approx(cell.ocv(), abs=1e-3) for p in potentials)
    finally:
        await io.close()


async def test_an_unknown_script_command_is_refused_before_any_line_of_the_script_runs(
        pstat_server: PtySimServer) -> None:
    """The firmware reads a script whole first: an unknown command (the 4001 family) or a literal beyond 32 bits
    refuses it, and no line before it ran (the cell never went on)."""
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, baud_rate=230400)
    sim = pstat_server.instrument
    try:
        with pytest.raises(InstrumentError, match="!4001"):
            await PalmSens(io).run(["var f", "set_e 3800m", "cell_on", "frobnicate f", "cell_off"])
        assert sim.e_at_cell_on is None  # type: ignore[attr-defined]
        with pytest.raises(InstrumentError, match="beyond a 32-bit integer"):
            await PalmSens(io).run(["set_e 3807353500n", "cell_on"])  # what our driver once wrote at 3.81 V
        assert sim.e_at_cell_on is None  # type: ignore[attr-defined]
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


def test_an_eis_step_hands_the_cell_over_and_its_fit_finds_the_cells_resistances(tmp_path: Path) -> None:
    from tests.conftest import dry_run

    run = dry_run(
        """
        name: t
        sample_period: 60 s
        steps:
          - charge: {current: C/20, until: 1 h}
          - eis: {from: 1 MHz, to: 0.1 Hz, points_per_decade: 8, amplitude: 10 mV}
          - discharge: {current: C/20, until: 1 h}
        """, tmp_path, soc=0.5, noise=False)
    assert run.outcome.completed, run.outcome.reason
    assert [t for t, _ in run.sequence] == ["CC Charge", "EIS", "CC Discharge"]
    kinds = [(e["kind"], e["message"].split(";")[0]) for e in run.events]
    assert kinds[1:3] == [
        ("handover", "smu1 output off and confirmed"), ("handover", "pstat1 cell off (its script ended)")
    ]
    from cellbench.bench.runtime.store import open_run

    dbs = sorted(tmp_path.glob("runs-*/*.sqlite"))
    with open_run(dbs[-1]) as store:
        spectra, fits = store.spectra(), store.fits()
    (points,) = spectra.values()
    assert len(points) == 57  # 7 decades at 8 points a decade
    cell = run.bench.cell
    fit = fits[0]
    assert fit["r_ohmic"] == pytest.approx(cell.ohmic_resistance(), rel=0.02)
    assert fit["r_interfacial"] == pytest.approx(cell.interfacial_resistance(), rel=0.02)
    assert fit["rel_rmse"] < 0.01
    # the cycler went back to work after the spectrum
    assert run.step_samples(3)[-1].current == pytest.approx(-3.5e-3 / 20, rel=1e-3)


def test_eis_versus_stack_pressure_shows_the_interfaces_closing(tmp_path: Path) -> None:
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.library import library_path
    from tests.conftest import dry_run

    dry_run(library_path("eis-vs-pressure").read_text(), tmp_path, soc=0.5, environment=True)
    (db,) = tmp_path.glob("runs-*/*.sqlite")
    with open_run(db) as store:
        r_int = [f["r_interfacial"] for f in store.fits()]
    assert len(r_int) == 5
    assert r_int == sorted(r_int, reverse=True)
    assert r_int[0] / r_int[-1] == pytest.approx((20 / 1) ** 0.5, rel=0.05)  # the P^-0.5 law


def test_cycle_life_with_impedance_sees_the_interphase_grow(tmp_path: Path) -> None:
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.library import library_path
    from cellbench.simulators.parameters import PELLET
    from tests.conftest import dry_run

    fast_ageing = PELLET.model_copy(update={"cycles_to_80pct": 48.0})  # ~12 at 60 degC and C/3
    run = dry_run(library_path("cycle-life-eis").read_text(), tmp_path, soc=0.0, temperature=60.0,
                  params=fast_ageing, noise=False)
    assert run.outcome.completed, run.outcome.reason
    assert run.steps[-1]["end_reason"].endswith("then retention <= 0.8")
    (db,) = tmp_path.glob("runs-*/*.sqlite")
    with open_run(db) as store:
        r_int = [f["r_interfacial"] for f in store.fits()]
    assert len(r_int) >= 2
    assert r_int == sorted(r_int) and r_int[-1] > 1.3 * r_int[0]


async def test_host_commands_echo_as_the_firmware_does(pstat_server: PtySimServer) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, baud_rate=230400)
    try:
        lines = await io.query_lines("t", lambda line: line.endswith("*"))
        assert lines[0].startswith("t") and lines[-1].endswith("*") and "espbl" not in " ".join(lines)
        assert (await io.query("i")).startswith("i")  # the echo, then the serial number
        ident = await PalmSens(io).identify()
        assert ident.startswith("ES4SIM") and ident.endswith("serial ES4SIM0001")
    finally:
        await io.close()


async def test_an_open_circuit_measurement_with_the_cell_on_is_refused(pstat_server: PtySimServer) -> None:
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, baud_rate=230400)
    try:
        with pytest.raises(InstrumentError, match="!0014"):
            await PalmSens(io).run(["var e", "cell_on", "meas_loop_ocp e 100m 300m", "  pck_start",
                                    "  pck_add e", "  pck_end", "endloop", "on_finished:", "cell_off"])
        assert pstat_server.instrument.cell_on is False  # type: ignore[attr-defined]  # on_finished ran
        # the driver's own OCP measures with the cell off, and its EIS sets the DC level before cell_on
        pstat = PalmSens(io)
        ocp = await pstat.open_circuit_potential(interval=0.05, duration=0.2)
        assert all(3.7 < e < 3.9 for e in ocp)
        await pstat.impedance(f_start=1e3, f_end=100, n_points=2, amplitude=10e-3, e_dc=ocp[-1])
        assert pstat_server.instrument.e_at_cell_on == pytest.approx(ocp[-1], abs=1e-3)  # type: ignore[attr-defined]
    finally:
        await io.close()


async def test_palmsens_own_style_of_script_runs(pstat_server: PtySimServer) -> None:
    """Variables, store_var/add_var, set_e with a variable, OCP then the cell on: as in PalmSens' examples."""
    io = await open_transport(pstat_server.resource, name="pstat", timeout=10, baud_rate=230400)
    try:
        packages = await PalmSens(io).run([
            "var o", "var d", "var e", "var i", "set_pgstat_chan 0", "set_pgstat_mode 3", "cell_off",
            "set_range ab 4200m", "set_autoranging ab 4200m 4200m", "meas_loop_ocp o 100m 200m", "  pck_start",
            "  pck_add o", "  pck_end", "endloop", "store_var d 10m ab", "add_var d o", "set_e d", "cell_on",
            "set_pgstat_mode 6", "set_range db 2m", "set_autoranging db 2m 2m",  # the galvanostat, as PalmSens' CP
            "meas_loop_cp e i -1m 100m 200m  # the manual's form: E and I variables", "  pck_start",
            "  pck_add e", "  pck_add i", "  pck_end", "endloop", "on_finished:", "cell_off"])
        ocp, cp = packages[:2], packages[2:]
        assert [v.var_type for v in ocp[0]] == ["ab"] and [v.var_type for v in cp[0]] == ["ab", "ba"]
        assert cp[0][1].value == pytest.approx(-1e-3) and cp[0][0].value < ocp[-1][0].value  # discharging
        assert pstat_server.instrument.e_at_cell_on == pytest.approx(ocp[-1][0].value + 0.01, abs=1e-6)  # type: ignore[attr-defined]
    finally:
        await io.close()


def palmsens_grammar() -> object:
    """PalmSens' own MethodSCRIPT grammar (pypalmsens' ANTLR parser), without the instrument part of the
    package (which loads the .NET SDK): the judge of every script our driver sends."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("pypalmsens")
    assert spec is not None and spec.submodule_search_locations is not None
    if "pypalmsens" not in sys.modules:
        package = types.ModuleType("pypalmsens")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["pypalmsens"] = package
    return importlib.import_module("pypalmsens._methodscript.validate").validate


@pytest.mark.parametrize("script", [
    eis_script(f_start=1e5, f_end=0.1, n_points=51, amplitude=0.01, e_dc=3.81, current_range=3.5e-3),
    eis_script(f_start=1e3, f_end=1, n_points=5, amplitude=1e-5, galvanostatic=True, i_dc=0.0),
    ocp_script(interval=0.1, duration=1.0),
    cp_script(current=-1e-3, interval=0.1, duration=1.0),
], ids=["eis", "geis", "ocp", "cp"])
def test_palmsens_own_grammar_accepts_every_script_the_driver_sends(script: list[str]) -> None:
    validate = palmsens_grammar()
    validate("\n".join(script) + "\n")  # type: ignore[operator]  # raises SyntaxError on a bad script
    with pytest.raises(SyntaxError):  # and the judge does judge: a misspelt command is refused
        validate("\n".join(script).replace("pck_end", "pck_ned") + "\n")  # type: ignore[operator]


async def script_lines(sim: PalmSensSim, script: list[str], *, abort_after: float | None = None) -> list[str]:
    """Every line the simulated firmware answers a script with (its own wire format, not the driver's reading)."""
    assert sim.handle("e") is None
    for line in script:
        assert sim.handle(line) is None
    stream = sim.handle("")
    assert stream is not None and not isinstance(stream, str)
    out: list[str] = []

    async def read() -> None:
        async for line in stream:
            out.append(line)

    reading = asyncio.ensure_future(read())
    if abort_after is not None:
        await asyncio.sleep(abort_after)
        assert sim.handle("Z") is None  # the running script answers the abort itself
    await asyncio.wait_for(reading, 10)
    return out


async def test_galvanostatic_scripts_run_in_the_galvanostat_mode_as_palmsens_examples_do() -> None:
    """PalmSens' CP and GEIS examples: set_pgstat_mode 6, the applied current's range `db`, the potential's `ab`;
    the simulator refuses a galvanostatic loop in the potentiostat mode our driver once sent it in."""
    for script in (cp_script(current=-1e-3, interval=0.1, duration=0.3),
                   eis_script(f_start=1e3, f_end=100, n_points=3, amplitude=1e-5, galvanostatic=True)):
        assert "set_pgstat_mode 6" in script and "set_pgstat_mode 3" not in script
        assert any(line.startswith("set_range db ") for line in script)
        assert not any(line.startswith("set_range ba ") for line in script)
    sim = PalmSensSim(SolidStateCell(soc=0.5), asyncio.get_running_loop().time, noise=0.0)
    lines = await script_lines(sim, cp_script(current=-1e-3, interval=0.1, duration=0.3))
    assert not [line for line in lines if line.startswith("!")] and len([x for x in lines if x[:1] == "P"]) == 3
    old = [line.replace("set_pgstat_mode 6", "set_pgstat_mode 3") for line in
           cp_script(current=-1e-3, interval=0.1, duration=0.3)]
    assert any("galvanostat mode" in line for line in await script_lines(sim, old))


async def test_eis_at_a_measured_open_circuit_voltage_writes_literals_the_firmware_takes() -> None:
    """3.8073535 V was written 3807353500n (beyond a 32-bit integer); it is 3807354u now, and the simulated
    firmware, which refuses the former, runs it."""
    assert si(3.8073535) == "3807354u" and si(0.015) == "15m" and si(200e3) == "200k"
    script = eis_script(f_start=1e3, f_end=100, n_points=3, amplitude=0.01, e_dc=3.8073535)
    assert "set_e 3807354u" in script
    sim = PalmSensSim(SolidStateCell(soc=0.5), asyncio.get_running_loop().time, noise=0.0)
    lines = await script_lines(sim, script)
    assert lines[:2] == ["e", "M000D"] and lines[-2:] == ["*", ""]  # the manual's EIS loop marker
    assert sim.e_at_cell_on == pytest.approx(3.807354)


async def test_the_firmwares_loop_markers_timer_variables_counts_and_abort() -> None:
    """OCP is announced M000B; `timer_get t` in a loop body puts the time in each package; 300 ms at 100 ms are
    three points; an abort is answered Z wherever the script stands (a wait too), and on_finished still runs."""
    sim = PalmSensSim(SolidStateCell(soc=0.5), asyncio.get_running_loop().time, noise=0.0)
    lines = await script_lines(sim, ["var p", "var t", "cell_off", "timer_start", "meas_loop_ocp p 100m 300m",
                                     "  timer_get t", "  pck_start", "  pck_add t", "  pck_add p", "  pck_end",
                                     "endloop"])
    assert lines[1] == "M000B"
    packages = [parse_package(line) for line in lines if line.startswith("P")]
    assert len(packages) == 3 and all([v.var_type for v in pkg] == ["eb", "ab"] for pkg in packages)
    times = [pkg[0].value for pkg in packages]
    assert times == pytest.approx([0.1, 0.2, 0.3], abs=0.02)
    aborted = await script_lines(sim, ["var p", "cell_on", "wait 5", "on_finished:", "cell_off"], abort_after=0.2)
    assert aborted == ["e", "Z", ""] and not sim.cell_on


async def test_currents_carry_the_status_and_range_metadata_palmsens_parsers_read() -> None:
    """`,1X` status and `,2XX` range after each current (PalmSens' example parsers; the EmStat4's ranges are
    decades from 100 pA, code 0, three codes apart). By hand: a CP at -1 mA sets a fixed 2 mA range, which the
    instrument holds in its 10 mA decade, code 24 = 0x18; 5 mA in a fixed 1 mA range (code 21 = 0x15) is an
    overload, status 2; an EIS current of 10 mV over |Z| autoranges within 1 uA..1 mA."""
    sim = PalmSensSim(SolidStateCell(soc=0.5), asyncio.get_running_loop().time, noise=0.0)
    lines = await script_lines(sim, cp_script(current=-1e-3, interval=0.1, duration=0.2))
    currents = [line.split(";")[1] for line in lines if line.startswith("P")]
    assert currents and all(c.endswith(",10,218") for c in currents)
    clipped = ["var e", "var i", "set_pgstat_mode 6", "set_range db 1m", "set_autoranging db 1m 1m", "set_i 5m",
               "cell_on", "meas_loop_cp e i 5m 100m 100m", "  pck_start", "  pck_add e", "  pck_add i", "  pck_end",
               "endloop", "on_finished:", "cell_off"]
    (package,) = [parse_package(line) for line in await script_lines(sim, clipped) if line.startswith("P")]
    assert package[1].flags == ["overload"] and package[1].current_range == 21
    lines = await script_lines(sim, eis_script(f_start=1e3, f_end=1e3, n_points=1, amplitude=10e-3,
                                               current_range=1e-3))
    (f, zr, zi) = parse_package(next(line for line in lines if line.startswith("P")))
    ac = 10e-3 / abs(sim.cell.impedance(1e3))
    decade = next(k for k in range(10) if ac <= 100e-12 * 10**k)  # by hand: the smallest decade holding it
    assert f.metadata == () and zr.status == zi.status == 0
    assert zr.current_range == zi.current_range == 3 * min(max(decade, 4), 7)  # within 1 uA (12)..1 mA (21)


async def test_a_clipped_current_is_refused_by_the_driver_over_the_serial_line(pstat_server: PtySimServer) -> None:
    """An EIS in a 1 uA range on a cell of tens of ohms overloads at every point: the driver says so in one line
    instead of returning impedances about a clipped current."""
    io = await open_transport(pstat_server.resource, name="pstat", timeout=5, baud_rate=230400)
    try:
        with pytest.raises(InstrumentError, match=r"overloaded its range \(range code 12\)"):
            await PalmSens(io).impedance(f_start=1e3, f_end=100, n_points=2, amplitude=10e-3, current_range=1e-6)
    finally:
        await io.close()
