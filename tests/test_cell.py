"""Physical invariants of the simulated solid-state cell."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.parameters import PELLET, POUCH


def settle(cell: SolidStateCell, current: float, seconds: float, dt: float = 1.0) -> float:
    v = cell.state.voltage
    for _ in range(int(seconds / dt)):
        v = cell.apply_current(current, dt)
    return v


@given(
    current_ma=st.floats(min_value=-1.0, max_value=1.0).filter(lambda x: abs(x) > 1e-3),
    seconds=st.integers(min_value=1, max_value=3600),
)
@settings(max_examples=50, deadline=None)
def test_charge_passed_equals_soc_change_times_capacity(current_ma: float, seconds: int) -> None:
    cell = SolidStateCell(PELLET, soc=0.5, temperature_c=60.0)  # warm: no dendrite at these currents
    cell.state.formation_left_ah = 0.0  # a formed cell: no charge goes to interphases any more
    cap0 = cell.capacity_ah
    settle(cell, current_ma * 1e-3, seconds)
    passed_ah = current_ma * 1e-3 * seconds / 3600
    # capacity fades a little with throughput; SOC is relative to the capacity of the moment
    assert (cell.soc - 0.5) * cap0 == pytest.approx(passed_ah, rel=2e-3)
    assert cell.state.charged_ah - cell.state.discharged_ah == pytest.approx(passed_ah, rel=1e-9)


@pytest.mark.parametrize("current", [0.35e-3, -0.35e-3, -1e-3])
def test_steady_state_voltage_is_ocv_plus_current_times_resistance(current: float) -> None:
    cell = SolidStateCell(PELLET, soc=0.5)
    v = settle(cell, current, 2.0, dt=0.1)  # the interfacial RC settles in milliseconds
    # (the OCV moves by a few µV within the last 0.1 s step)
    assert v == pytest.approx(cell.ocv() + current * cell.dc_resistance(), abs=1e-5)
    # current positive on charge: charging lifts the voltage above OCV, discharging lowers it
    assert (v > cell.ocv()) == (current > 0)


def test_warmer_cell_has_lower_resistance() -> None:
    cold, warm = SolidStateCell(PELLET, temperature_c=0.0), SolidStateCell(PELLET, temperature_c=60.0)
    room = SolidStateCell(PELLET, temperature_c=25.0)
    assert cold.dc_resistance() > room.dc_resistance() > warm.dc_resistance()
    # electrolyte Ea 0.35 eV: about ×4 more conductive at 60 degC than at 25 degC
    r_se_room = PELLET.r_se_ohm_cm2
    assert warm.ohmic_resistance() < room.ohmic_resistance() - 0.7 * r_se_room


def test_higher_stack_pressure_lowers_resistance_and_contact_loss_raises_it() -> None:
    resistances = [SolidStateCell(PELLET, pressure_mpa=p).dc_resistance() for p in (0.1, 1, 5, 10, 25)]
    assert resistances == sorted(resistances, reverse=True)
    # interfaces follow P^-0.5: 5 -> 1 MPa multiplies them by sqrt(5)
    low, ref = SolidStateCell(PELLET, pressure_mpa=1.0), SolidStateCell(PELLET, pressure_mpa=5.0)
    assert low.interfacial_resistance() / ref.interfacial_resistance() == pytest.approx(5**0.5)


def test_ocv_follows_the_sourced_table() -> None:
    cell = SolidStateCell(PELLET, soc=0.5)
    assert cell.ocv() == pytest.approx(3.810)
    cell.state.soc = 1.0
    assert cell.ocv() == pytest.approx(4.300)


def test_pouch_cell_resistance_matches_the_design_check() -> None:
    # cell-parameters.md: about 46 mOhm at 25 degC for the 5 Ah pouch
    assert SolidStateCell(POUCH).dc_resistance() == pytest.approx(0.046, rel=0.05)


def test_plating_above_the_critical_current_density_shorts_the_cell() -> None:
    cell = SolidStateCell(PELLET, soc=0.2)
    settle(cell, 0.2e-3, 3600)  # 0.2 mA/cm², below the 0.3 mA/cm² CCD at 25 degC
    assert not cell.shorted
    settle(cell, 1.0e-3, 3600)  # 1 mA/cm²: well above
    assert cell.shorted


def test_a_dendrite_shorts_soft_first_then_hard() -> None:
    p = PELLET
    cell = SolidStateCell(p, soc=0.3)
    excess = 0.6 - cell.critical_current_density()  # mA/cm² plated above the CCD at 0.6 mA on 1 cm²
    touch = p.soft_short_at * p.dendrite_capacity_mah_cm2 / excess * 3600  # s until the filament touches
    bridge = p.dendrite_capacity_mah_cm2 / excess * 3600
    settle(cell, 0.6e-3, touch - 1)
    assert not cell.shorted
    settle(cell, 0.6e-3, 2)
    assert cell.shorted and not cell.hard_shorted
    assert cell.state.short_ohm == pytest.approx(p.soft_short_ohm_cm2 / p.area_cm2, rel=0.05)  # just touched
    v = cell.state.voltage
    settle(cell, 0.6e-3, (bridge - touch) / 2)  # half-way: the geometric mean of soft and hard
    assert cell.state.short_ohm == pytest.approx((p.soft_short_ohm_cm2 * p.short_ohm_cm2) ** 0.5, rel=0.05)
    assert cell.state.voltage < v  # charge flows in but the voltage falls: the leak outgrows the current
    settle(cell, 0.6e-3, (bridge - touch) / 2 + 1)
    assert cell.hard_shorted and cell.state.short_ohm == pytest.approx(p.short_ohm_cm2 / p.area_cm2)
    before = cell.soc
    rest_voltage = cell.apply_current(0.0, 600)
    assert cell.soc < before  # the short drains the cell even with no external current
    assert rest_voltage < PELLET.v_min  # and its voltage collapses below the cut-off


def test_same_inputs_give_the_same_trajectory() -> None:
    a, b = SolidStateCell(PELLET, soc=0.3), SolidStateCell(PELLET, soc=0.3)
    va = [a.apply_current(-0.5e-3, 5) for _ in range(500)]
    vb = [b.apply_current(-0.5e-3, 5) for _ in range(500)]
    assert va == vb


def test_the_first_charge_of_a_fresh_cell_builds_interphases() -> None:
    cell = SolidStateCell(PELLET, soc=0.0, temperature_c=60.0)
    settle(cell, PELLET.capacity_ah / 10, 36000, dt=10.0)  # C/10 for 10 h: one capacity of charge
    lost = PELLET.formation_loss_fraction * PELLET.capacity_ah
    assert cell.state.formation_left_ah == pytest.approx(0.0, abs=1e-12)
    assert cell.soc * cell.capacity_ah == pytest.approx(PELLET.capacity_ah - lost, rel=2e-3)
