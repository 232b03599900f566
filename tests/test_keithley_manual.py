"""The 2450's status registers, reading buffers and SimpleLoop trigger model, command by command as its
reference manual writes them; and PyMeasure's own Keithley2450 class driving the served simulator."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.keithley2450 import Keithley2450Sim
from tests.test_cli import serve


@pytest.fixture
def smu() -> tuple[Keithley2450Sim, list[float]]:
    clock = [0.0]
    return Keithley2450Sim(SolidStateCell(soc=0.5), lambda: clock[0]), clock


def test_ieee_488_2_status_registers(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    sim, _ = smu
    assert sim.handle("*ESR?") == "0" and sim.handle("*STB?") == "0"
    sim.handle(":SOUR:BOGUS 1")  # a command error: -113, bit 5 (CME) of the event register
    assert sim.handle("*STB?") == "4"  # bit 2: an error is in the queue
    sim.handle("*ESE 32")
    sim.handle("*SRE 32")
    assert sim.handle("*STB?") == str(4 | 32 | 64)  # the enabled event summarised (bit 5), a service request
    assert sim.handle("*ESR?") == "32" and sim.handle("*ESR?") == "0"  # reading clears it
    sim.handle(":SOUR:CURR 5")  # an execution error: -222 out of range, bit 4 (EXE)
    assert sim.handle("*ESR?") == "16"
    sim.handle("*OPC")
    assert sim.handle("*ESR?") == "1"  # operation complete
    assert sim.handle("*ESE?") == "32" and sim.handle("*SRE?") == "32"
    assert sim.handle(":STAT:OPER?") == "0" and sim.handle(":STAT:QUES?") == "0"
    assert sim.handle(":FORM:DATA ASC;:FORM:DATA?") == "ASC"


def test_readings_into_a_named_buffer_and_back(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    sim, clock = smu
    sim.handle(':READ? "MyBuffer"')  # a buffer never made: an error, no reading
    assert sim.answer(":SYST:ERR?").startswith("-224,")
    sim.handle(':TRAC:MAKE "MyBuffer", 100')
    sim.handle(':SOUR:FUNC CURR;:SOUR:CURR -1e-3;:SOUR:CURR:VLIM 4.3;:SENS:FUNC "VOLT";:OUTP ON')
    for k in range(3):
        clock[0] = float(k)
        sim.handle(':TRAC:TRIG "MyBuffer"')
    assert sim.handle(':TRAC:ACT? "MyBuffer"') == "3"
    data = sim.answer(':TRAC:DATA? 1, 3, "MyBuffer", SOUR, READ, REL').split(",")
    assert len(data) == 9 and [float(x) for x in data[0::3]] == pytest.approx([-1e-3] * 3)
    assert [float(x) for x in data[2::3]] == [0.0, 1.0, 2.0]
    volts = [float(x) for x in data[1::3]]
    assert 3.6 < volts[2] < volts[0] < 3.9  # discharging
    assert sim.handle(':FETC? "MyBuffer", READ') == data[7]
    sim.handle(':TRAC:DATA? 1, 9, "MyBuffer"')
    assert sim.answer(":SYST:ERR?").startswith("-222,")  # beyond what the buffer holds


def test_a_full_buffer_keeps_its_newest_readings(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    sim, clock = smu
    sim.handle(':TRAC:MAKE "Small", 10')  # the smallest a 2450 makes
    sim.handle(':SOUR:FUNC CURR;:SOUR:CURR -1e-3;:SOUR:CURR:VLIM 4.3;:SENS:FUNC "VOLT";:OUTP ON')
    for k in range(13):
        clock[0] = float(k)
        sim.handle(':TRAC:TRIG "Small"')
    assert sim.handle(':TRAC:ACT? "Small"') == "10"
    relative = [float(x) for x in sim.answer(':TRAC:DATA? 1, 10, "Small", REL').split(",")]
    assert relative == [float(k) for k in range(3, 13)]  # the three oldest dropped
    assert float(sim.answer(':TRAC:DATA? 2, 2, "Small", REL')) == 4.0
    sim.handle(':TRAC:POIN 11, "Small"')  # resized: emptied, and then holds eleven
    for _ in range(12):
        sim.handle(':TRAC:TRIG "Small"')
    assert sim.handle(':TRAC:ACT? "Small"') == "11" and sim.handle(':TRAC:POIN? "Small"') == "11"


def test_buffer_sizes_a_client_may_not_set_and_memory_it_may_not_take(
        smu: tuple[Keithley2450Sim, list[float]]) -> None:
    """A size out of the instrument's range is refused (a buffer of none would divide by zero at its first
    reading); a huge buffer holding one reading takes room for the default buffers' 100,000 at most, and grows
    by doubling as readings come (a hostile client cannot take gigabytes with a few commands)."""
    sim, _ = smu
    for size in ("0", "-5", "9", "5000001"):
        sim.handle(f':TRAC:POIN {size}, "defbuffer1"')
        assert sim.answer(":SYST:ERR?").startswith("-222,"), size
    assert sim.handle(':TRAC:POIN? "defbuffer1"') == "100000"
    sim.handle(':TRAC:MAKE "Huge", 5000000')
    sim.handle(':SOUR:FUNC CURR;:SOUR:CURR -1e-3;:SOUR:CURR:VLIM 4.3;:SENS:FUNC "VOLT";:OUTP ON')
    sim.handle(':TRAC:TRIG "Huge"')
    huge = sim.buffers["Huge"]
    assert len(huge) == 1 and len(huge._data or ()) == 3 * 100_000  # 2.4 MB, not 120 MB
    for k in range(100_001):  # past the room taken: it doubles
        huge.add((float(k), 0.0, 0.0))
    assert len(huge) == 100_002 and len(huge._data or ()) == 3 * 200_000
    assert huge.row(-1)[0] == 100_000.0 and huge.row(1)[0] == 0.0


def test_a_simple_loop_of_readings_and_opc_waiting_for_it(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    sim, clock = smu
    sim.handle(':TRAC:MAKE "log", 10')
    sim.handle(':SOUR:FUNC VOLT;:SOUR:VOLT 3.8;:SOUR:VOLT:ILIM 0.01;:SENS:FUNC "CURR";:OUTP ON')
    sim.handle(':TRIG:LOAD "SimpleLoop", 5, 0.5, "log"')
    sim.handle(":INIT")
    assert sim.answer(":TRIG:STAT?").startswith("RUNNING") and sim.answer(':TRAC:ACT? "log"') == "1"
    clock[0] = 1.2
    assert sim.handle(':TRAC:ACT? "log"') == "3"  # at 0, 0.5 and 1.0 s
    assert not isinstance(sim.handle("*OPC?"), str)  # pending: *OPC? answers when the loop is done
    clock[0] = 2.5
    assert sim.handle("*OPC?") == "1" and sim.handle(':TRAC:ACT? "log"') == "5"
    assert sim.answer(":TRIG:STAT?").startswith("IDLE")
    sim.handle(":INIT")
    sim.handle(":ABOR")
    assert sim.answer(":TRIG:STAT?").startswith("ABORTED")  # p. 6-234: stopped by a user request
    sim.handle(":SENS:COUN 5")
    sim.handle(":READ?")  # five readings into defbuffer1
    assert sim.handle(":TRAC:ACT?") == "5"


def test_the_manuals_counter_example_takes_fifteen_readings(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    """Pages 6-186 and 6-195, as written: five readings, a 1 s delay, three rounds: 15 readings in defbuffer1."""
    sim, clock = smu
    sim.handle(':SOUR:FUNC CURR;:SOUR:CURR 0;:SENS:FUNC "VOLT";:OUTP ON')
    for line in ('TRIG:LOAD "EMPTY"', "TRIG:BLOC:BUFF:CLEAR 1", "TRIG:BLOC:MEAS 2", "TRIG:BLOC:BRAN:COUN 3, 5, 2",
                 "TRIG:BLOC:DEL:CONS 4, 1", "TRIG:BLOC:BRAN:COUN 5, 3, 2"):
        assert sim.handle(line) is None, line
    assert sim.answer(":TRIG:STAT?") == "BUILDING;BUILDING;0"
    sim.handle("INIT")
    assert sim.answer("TRAC:ACT?") == "5" and sim.answer(":TRIG:STAT?").startswith("RUNNING")
    clock[0] = 2.5  # the third round's readings taken at 2 s; its delay ends at 3 s, and so does the model
    assert sim.answer("TRAC:ACT?") == "15" and sim.answer(":TRIG:STAT?").startswith("RUNNING")
    clock[0] = 3.5
    assert sim.answer("TRAC:ACT?") == "15" and sim.answer(":TRIG:STAT?") == "IDLE;IDLE;5"
    assert sim.answer(":SYST:ERR?").startswith("0,")


def test_a_limit_branch_ends_a_discharge_at_the_reading_that_crossed(
        smu: tuple[Keithley2450Sim, list[float]]) -> None:
    """A constant-current discharge built from the manual's blocks: a reading every 10 s, a constant-limit branch
    (p. 6-191) to a source-off block when the voltage is below 3.45 V. The instrument stops at the first reading
    below, with the output off, whenever the client next asks; the readings are stamped at their own moments."""
    sim, clock = smu
    sim.handle(':SOUR:FUNC CURR;:SOUR:CURR -0.004;:SOUR:CURR:VLIM 5;:SENS:FUNC "VOLT"')
    for line in (':TRIG:LOAD "Empty"', ':TRIG:BLOC:BUFF:CLE 1, "defbuffer1"', ":TRIG:BLOC:SOUR:STAT 2, ON",
                 ":TRIG:BLOC:DEL:CONS 3, 10", ':TRIG:BLOC:MEAS 4, "defbuffer1", 1',
                 ":TRIG:BLOC:BRAN:LIM:CONS 5, BEL, 3.45, 0, 8, 4", ":TRIG:BLOC:BRAN:COUN 6, 100000, 3",
                 ":TRIG:BLOC:BRAN:ALW 7, 9", ":TRIG:BLOC:SOUR:STAT 8, OFF", ":TRIG:BLOC:NOP 9", ":INIT"):
        assert sim.handle(line) is None, line
    clock[0] = 30 * 86400.0  # the host asks again a month later: the model stopped long before
    assert sim.answer(":TRIG:STAT?") == "IDLE;IDLE;9" and sim.answer(":OUTP?") == "0"  # off at block 8
    n = int(sim.answer(":TRAC:ACT?"))
    rows = sim.answer(f':TRAC:DATA? 1, {n}, "defbuffer1", READ, REL').split(",")
    volts, times = [float(v) for v in rows[0::2]], [float(t) for t in rows[1::2]]
    assert volts[-1] < 3.45 <= min(volts[:-1]) and n > 10  # the last reading crossed, none before it
    assert times == pytest.approx([10.0 * k for k in range(n)])  # each at its own moment, from the first (REL)
    assert sim.answer(":SYST:ERR?").startswith("0,")


def test_a_trigger_model_refuses_what_the_instrument_refuses(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    sim, _ = smu
    sim.handle(':TRIG:LOAD "Empty";:TRIG:BLOC:MEAS 1;:TRIG:BLOC:MEAS 3;:INIT')  # block 2 missing
    assert sim.answer(":SYST:ERR?").startswith("-224") and sim.answer(":TRIG:STAT?").startswith("BUILDING")
    sim.handle(":TRIG:BLOC:BRAN:LIM:CONS 2, SIDEWAYS, 0, 1, 1")
    assert sim.answer(":SYST:ERR?").startswith("-224")
    sim.handle(":TRIG:BLOC:DEL:CONS 2, 20000")  # beyond 10,000 s
    assert sim.answer(":SYST:ERR?").startswith("-222")
    sim.handle(":TRIG:BLOC:DEL:CONS 2, 1;:INIT;:INIT")  # started twice
    assert sim.answer(":SYST:ERR?").startswith("-200") and sim.answer(":TRIG:STAT?").startswith("RUNNING")


@pytest.fixture
def served_smu() -> Iterator[str]:
    proc, resource = serve("keithley2450", "--port", "0", "--soc", "0.5")
    yield resource
    proc.terminate()
    proc.wait(timeout=10)


def test_pymeasure_drives_the_served_simulator(served_smu: str) -> None:
    """PyMeasure's own Keithley2450 class (not ours) over pyvisa-py, as a lab's script would use it."""
    from pymeasure.instruments.keithley import Keithley2450

    smu = Keithley2450(served_smu, visa_library="@py", read_termination="\n", write_termination="\n", timeout=5000)
    try:
        assert "MODEL 2450" in smu.id
        smu.reset()  # "*RST;:stat:pres;:*CLS;": taken whole, as the instrument takes it
        assert smu.ask(":SYST:ERR:COUN?").strip() == "0"
        smu.apply_current(compliance_voltage=4.3)
        smu.measure_voltage()
        smu.source_current = -1e-3
        smu.enable_source()
        assert 3.6 < smu.voltage < 3.9
        assert smu.source_current == pytest.approx(-1e-3)
        assert smu.compliance_voltage == pytest.approx(4.3)
        smu.trigger()  # *TRG
        smu.disable_source()
        assert smu.ask(":OUTP?").strip() == "0"
        assert smu.ask(":SYST:ERR?").startswith("0,")  # nothing it sent was refused
    finally:
        smu.adapter.close()


def wire(resource: str) -> tuple[Any, Any]:
    """A raw socket to the served 2450, written from the manual (no driver): send lines, read lines."""
    import socket

    _, host, port, _ = resource.split("::")
    conn = socket.create_connection((host, int(port)), timeout=10)
    return conn, conn.makefile("r", encoding="ascii", newline="\n")


def test_trigger_model_readings_are_stamped_when_taken_and_wai_holds_what_follows(served_smu: str) -> None:
    """A SimpleLoop of 5 readings 0.2 s apart: their relative times are 0.2 s apart (they were all stamped with
    the moment they were read back); *WAI holds the query after it until the loop is done; *OPC? and the
    query sent right behind it are answered in the order they came."""
    conn, lines = wire(served_smu)
    try:
        conn.sendall(b':SOUR:FUNC CURR;:SOUR:CURR 0;:SOUR:CURR:VLIM 5;:SENS:FUNC "VOLT";:OUTP ON\n')
        conn.sendall(b':TRIG:LOAD "SimpleLoop", 5, 0.2\n:INIT\n*WAI\n:TRAC:ACT?\n')
        assert lines.readline().strip() == "5"  # held behind *WAI: not the 1 or 2 taken so far
        conn.sendall(b':TRAC:DATA? 1, 5, "defbuffer1", REL\n')
        rel = [float(x) for x in lines.readline().split(",")]
        assert [round(b - a, 3) for a, b in itertools.pairwise(rel)] == [0.2, 0.2, 0.2, 0.2]
        conn.sendall(b':INIT\n*OPC?\n:TRAC:ACT?\n')
        assert lines.readline().strip() == "1" and lines.readline().strip() == "5"
        conn.sendall(b":OUTP OFF\n:SYST:ERR:COUN?\n")
        assert lines.readline().strip() == "0"
    finally:
        conn.close()


def test_the_manuals_short_forms_are_taken(smu: tuple[Keithley2450Sim, list[float]]) -> None:
    """`:OUTP:SMOD HIMP` (the output-off state of the present source function), `COUNT 100` with the optional
    :SENSe node left out."""
    sim, _ = smu
    sim.handle(":SOUR:FUNC CURR")
    sim.handle(":OUTP:SMOD HIMP")
    assert sim.handle(":OUTP:CURR:SMOD?") == "HIMP" and sim.handle(":OUTP:SMOD?") == "HIMP"
    sim.handle("COUNT 100")
    assert sim.handle(":SENS:COUN?") == "1.000000E+02"
    assert sim.handle(":SYST:ERR:COUN?") == "0"
    sim.handle(":OUTP:SMOD SIDEWAYS")
    assert sim.handle(":SYST:ERR:COUN?") == "1"
    # a buffer element the simulator cannot answer in the manual's format is refused, never answered wrong
    assert sim.handle(':READ? "defbuffer1", READ, SOURUNIT') is None
    assert sim.handle(":SYST:ERR:COUN?") == "2"
