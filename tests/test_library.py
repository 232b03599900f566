"""Every library profile runs on the simulated bench and its recorded data says what the test is for."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellbench.bench.results.analysis import cycle_table
from cellbench.profiles.library import library_path
from cellbench.simulators.parameters import PELLET
from tests.conftest import HALF_CELL_R, dry_run


def library(name: str) -> str:
    return library_path(name).read_text()


def test_formation_at_60_degc(tmp_path: Path) -> None:
    run = dry_run(library("formation"), tmp_path, soc=0.0, temperature=60.0, environment=True)
    assert run.outcome.completed
    rows = cycle_table(run.samples)
    assert [r.cycle for r in rows] == [1, 2]
    assert rows[1].coulombic_efficiency == pytest.approx(1.0, abs=0.005)
    assert rows[1].discharge_ah == pytest.approx(3.5e-3, rel=0.03)


def test_rate_capability_loses_capacity_as_the_rate_rises(tmp_path: Path) -> None:
    run = dry_run(library("rate-capability"), tmp_path, soc=0.0)
    assert run.outcome.completed
    capacities = [r.discharge_ah for r in cycle_table(run.samples)]
    assert len(capacities) == 5  # C/20, C/10, C/5, C/2, 1C
    assert capacities == sorted(capacities, reverse=True)
    # by hand: diffusion leaves rate/3600 s * R^2/(15 D) of the capacity in the bulk (12.6 % at 1C, 0.63 % at C/20),
    # and the cut-off falls on the OCV's steep continuation below SOC 0, (3.024 V - I R - 2.5 V) / (100 V) further
    lead_1c, r = (5.22e-4) ** 2 / 4e-11 / 15 / 3600, HALF_CELL_R[1]

    def by_hand(rate: float) -> float:
        return 1 - lead_1c * rate + (3.024 - rate * 3.5e-3 * r - 2.5) / 100

    assert capacities[-1] / capacities[0] == pytest.approx(by_hand(1.0) / by_hand(0.05), abs=0.01)
    energies = [r.discharge_wh for r in cycle_table(run.samples)]
    assert energies[-1] < 0.97 * energies[0]  # the IR drop costs energy at 1C


def test_cycle_life_ends_at_the_first_reference_test_below_80_percent(tmp_path: Path) -> None:
    fast_ageing = PELLET.model_copy(update={"cycles_to_80pct": 8.0})  # a cell that ages in days, not months
    run = dry_run(library("cycle-life"), tmp_path, soc=0.0, temperature=60.0, params=fast_ageing)
    assert run.outcome.completed
    rpt_steps = [st for st in run.steps if st["step_type"] == "CC Discharge" and st["path"].endswith("steps[3]")]
    capacities = [run.step_samples(st["step_count"])[-1].discharge_ah for st in rpt_steps]
    assert len(capacities) >= 2
    assert capacities[-1] < 0.8 * capacities[0] <= capacities[-2]
    assert run.steps[-1]["end_reason"].endswith("then retention <= 0.8")
    assert run.steps[-1]["step_count"] == rpt_steps[-1]["step_count"]  # nothing ran after it


def test_the_polymer_cell_has_its_own_cycle_life_profile_and_the_sulfide_one_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app
    from cellbench.simulators.parameters import POLYMER

    refused = CliRunner().invoke(app, ["validate", "cycle-life", "--cell", "polymer", "--no-estimate"],
                                 env={"COLUMNS": "200"})
    assert refused.exit_code != 0
    assert "voltage 4.3 V is above the cell's maximum 3.8 V (simulated polymer cell)" in refused.output
    fast_ageing = POLYMER.model_copy(update={"cycles_to_80pct": 20.0})
    run = dry_run(library("cycle-life-polymer"), tmp_path, soc=0.0, temperature=60.0, params=fast_ageing)
    assert run.outcome.completed and run.steps[-1]["end_reason"].endswith("then retention <= 0.8")
    first = cycle_table(run.samples)[1]  # the first reference: the LFP's whole capacity at C/20
    assert first.discharge_ah == pytest.approx(POLYMER.capacity_ah, rel=0.03)
    assert 3.3 < first.discharge_wh / first.discharge_ah < 3.45  # LFP's plateau


def test_hppc_gives_a_dcir_at_every_state_of_charge(tmp_path: Path) -> None:
    run = dry_run(library("hppc"), tmp_path, soc=0.0, noise=False)
    assert run.outcome.completed
    pulses = [st for st in run.steps if st["step_type"] == "Pulse"]
    assert len(pulses) == 9
    r0, r_total = HALF_CELL_R
    for st in pulses:
        at = {round(s.test_time - st["start_time"], 3): s for s in run.step_samples(st["step_count"])}
        before, after = at[10.0], at[10.01]  # the end of the 1C discharge pulse
        dcir = (after.voltage - before.voltage) / (after.current - before.current)
        assert r0 < dcir < r_total
        assert 0.0 not in at and 0.01 in at  # the step's own edge (rest to 1C) is read 10 ms after it too


def test_critical_current_density_is_found_where_the_lithium_shorts(tmp_path: Path) -> None:
    run = dry_run(library("critical-current-density"), tmp_path, soc=0.0)
    assert run.outcome.completed  # the short is the planned end of this test
    last = run.steps[-1]
    assert (last["step_type"], last["end_reason"]) == ("CC Charge", "voltage <= 3.5 V")
    ccd_ma_cm2 = run.step_samples(last["step_count"])[1].current * 1e3 / PELLET.area_cm2
    assert ccd_ma_cm2 == pytest.approx(0.4, rel=1e-4)
    assert ccd_ma_cm2 > PELLET.ccd_ma_cm2  # plating above the model's CCD shorted it, below did not
    assert run.bench.cell.shorted
    (onset,) = [e for e in run.events if e["kind"] == "short"]  # the soft short, flagged before the end
    assert onset["message"].startswith("soft short:") and "at 0.4 mA" in onset["message"]
    assert last["start_time"] < onset["test_time"] < last["end_time"]
