"""The SCPI grammar of the simulated instruments, as a real 2450 parses it."""

from __future__ import annotations

import pytest

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.keithley2450 import Keithley2450Sim


@pytest.fixture
def smu() -> Keithley2450Sim:
    return Keithley2450Sim(SolidStateCell(soc=0.5), lambda: 0.0)


def errors(smu: Keithley2450Sim) -> list[str]:
    out = []
    while (reply := smu.answer(":SYST:ERR?")) and not reply.startswith("0,"):
        out.append(reply)
    return out


@pytest.mark.parametrize(
    "command",
    [
        ":SOUR:CURR 0.001",
        ":SOURce:CURRent 0.001",
        ":source:current:level 0.001",
        "sour:curr:lev:imm:ampl 0.001",
        ":SOUR1:CURR:LEV 1E-3",
        ":sOuRcE:cUrR 1e-3",
    ],
)
def test_short_long_optional_and_case_all_reach_the_same_setting(smu: Keithley2450Sim, command: str) -> None:
    assert smu.handle(command) is None
    assert smu.handle(":SOUR:CURR?") == "1.000000E-03"
    assert errors(smu) == []


def test_chained_commands_share_the_compound_header_path(smu: Keithley2450Sim) -> None:
    smu.handle(":SOUR:CURR:VLIM 4.2;LEV 0.002")  # LEV is relative to :SOUR:CURR
    assert smu.handle(":SOUR:CURR:VLIM?;:SOUR:CURR?") == "4.200000E+00;2.000000E-03"
    assert errors(smu) == []


def test_common_commands_may_appear_anywhere_in_a_chain(smu: Keithley2450Sim) -> None:
    assert smu.answer(":SOUR:FUNC CURR;*IDN?;:SOUR:FUNC?").split(";") == [smu.idn, "CURR"]


def test_strings_in_either_quote_are_accepted_and_answered_quoted(smu: Keithley2450Sim) -> None:
    smu.handle(":SENS:FUNC 'VOLT'")
    assert smu.handle(":SENS:FUNC?") == '"VOLT:DC"'
    smu.handle(':SENS:FUNC "CURRent:DC"')
    assert smu.handle(":SENS:FUNC?") == '"CURR:DC"'


def test_undefined_header_and_out_of_range_go_to_the_error_queue(smu: Keithley2450Sim) -> None:
    assert smu.handle(":SOUR:BANANA 3") is None
    assert smu.handle(":SOUR:CURR 2.5") is None  # beyond ±1.05 A
    assert smu.handle(":SOUR:CURR?") == "0.000000E+00"  # the bad value was not applied
    assert errors(smu) == ['-113,"Undefined header;1;0 0"', '-222,"Data out of range;1;0 0"']
    assert smu.handle(":SYST:ERR?") == '0,"No error;0;0 0"'


def test_an_unknown_query_sends_no_reply_at_all(smu: Keithley2450Sim) -> None:
    assert smu.handle("FOO?") is None
    assert errors(smu) == ['-113,"Undefined header;1;0 0"']


def test_settings_the_model_ignores_are_remembered(smu: Keithley2450Sim) -> None:
    smu.handle(":SENS:VOLT:NPLC 2;:SENS:VOLT:RANG:AUTO 1;:SOUR:CURR:RANG:AUTO 0;:SOUR:CURR:DEL 0.05")
    smu.handle(":ROUT:TERM REAR;:SYST:BEEP 1000, 0.2;:STAT:PRES")
    reply = smu.handle(":SENS:VOLT:NPLC?;:SENS:VOLT:RANG:AUTO?;:SOUR:CURR:RANG:AUTO?;:SOUR:CURR:DEL?;:ROUT:TERM?")
    assert reply == "2.000000E+00;1;0;5.000000E-02;REAR"
    assert errors(smu) == []


def test_rst_restores_defaults_and_cls_clears_errors(smu: Keithley2450Sim) -> None:
    smu.handle(":SOUR:FUNC CURR;:OUTP ON;:BAD")
    smu.handle("*RST")
    assert smu.handle(":SOUR:FUNC?;:OUTP?") == "VOLT;0"
    smu.handle("*CLS")
    assert errors(smu) == []


def test_missing_and_wrong_type_parameters(smu: Keithley2450Sim) -> None:
    smu.handle(":SOUR:CURR")
    smu.handle(":SOUR:CURR abc")
    smu.handle(":OUTP MAYBE")
    assert [e.split(",")[0] for e in errors(smu)] == ["-109", "-104", "-224"]
