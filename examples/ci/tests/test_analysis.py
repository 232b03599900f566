"""The lab's own analysis and instrument script, tested against cellbench's simulated bench."""

from __future__ import annotations

import pytest
import pyvisa


def capacity_fade_per_cycle(cycles) -> float:  # the lab's own metric (a pandas frame of the per-cycle table)
    capacity = cycles["discharge_ah"][cycles["discharge_ah"] > 0]
    return float((capacity.iloc[0] - capacity.iloc[-1]) / capacity.iloc[0] / (len(capacity) - 1))


@pytest.mark.cellbench(temperature=60.0)
def test_the_formation_fades_little(cellbench_dry_run) -> None:
    run = cellbench_dry_run("profiles/formation.yaml")
    assert run.completed and not run.safety_events()
    assert run.last_step[1] == "time 600 s"
    assert abs(capacity_fade_per_cycle(run.cycles.iloc[1:])) < 0.01


def test_our_ocv_script_reads_a_rested_cell(keithley2450) -> None:
    rm = pyvisa.ResourceManager("@py")
    smu = rm.open_resource(keithley2450, read_termination="\n", write_termination="\n", timeout=5000)
    try:
        smu.write(":SOUR:FUNC CURR")
        smu.write(":SOUR:CURR 0")
        smu.write(":OUTP ON")
        assert 3.5 < float(smu.query(":MEAS:VOLT?")) < 4.2
        smu.write(":OUTP OFF")
    finally:
        smu.close()
        rm.close()
