"""Physical invariants of the simulated solid-state cell."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.parameters import LI3N_FILM, PELLET, PELLET_PROTECTED, POLYMER, POUCH


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
    # capacity fades a little with throughput (cathode material lost, the lithium kept): the charge stored,
    # SOC times the capacity of the moment, moves by exactly the charge passed
    assert cell.soc * cell.capacity_ah - 0.5 * cap0 == pytest.approx(passed_ah, rel=1e-9)
    assert cell.state.charged_ah - cell.state.discharged_ah == pytest.approx(passed_ah, rel=1e-9)


@pytest.mark.parametrize("current", [0.35e-3, -0.35e-3, -1e-3])
def test_steady_state_voltage_is_ocv_plus_current_times_resistance(current: float) -> None:
    cell = SolidStateCell(PELLET, soc=0.5)
    v = settle(cell, current, 2.0, dt=0.1)  # the interfaces settle in milliseconds, diffusion in minutes
    # by hand: the surface runs ahead of the bulk by dSOC/dt * R^2/(15 D) * (1 - exp(-t/tau)), tau = R^2/(20.19 D),
    # on the OCV table's segment above (0.50-0.55: 0.044 V) or below (0.45-0.50: 0.032 V) SOC 0.5
    r2_d = (5.22e-4) ** 2 / 4e-11
    lead = current / (PELLET.capacity_ah * 3600) * r2_d / 15 * (1 - math.exp(-2.0 / (r2_d / 4.4934**2)))
    diffusion = ((3.854 - 3.810) if current > 0 else (3.810 - 3.778)) / 0.05 * lead
    # (the OCV moves by a few µV within the last 0.1 s step)
    assert v == pytest.approx(cell.ocv() + current * cell.dc_resistance() + diffusion, abs=1e-5)
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


def _capacity_to_cut_off(params: object, c_rate: float) -> float:
    """Fraction of the capacity a full, formed cell gives at 60 degC down to its cut-off at this rate."""
    cell = SolidStateCell(params, soc=1.0, temperature_c=60.0)  # type: ignore[arg-type]
    cell.state.formation_left_ah = 0.0
    capacity = cell.capacity_ah
    current, passed = -capacity * c_rate, 0.0
    while cell.apply_current(current, 1.0) > cell.params.v_min:
        passed -= current / 3600
    return passed / capacity


def test_diffusion_leaves_lithium_in_the_bulk_at_high_rate() -> None:
    # by hand: a steady current leads the surface by c_rate/3600 * R^2/(15 D) in SOC: 0.126 at 1C, 0.0063 at C/20;
    # the cut-off comes when the surface's OCV less the resistive drop reaches 2.5 V, (3.024 - 2.5 - I R) / 100
    # below SOC 0 on the table's steep continuation
    lead_1c = (5.22e-4) ** 2 / 4e-11 / 15 / 3600
    r_60 = SolidStateCell(PELLET, temperature_c=60.0).dc_resistance()

    def by_hand(c_rate: float) -> float:
        return 1.0 - lead_1c * c_rate + (3.024 - 2.5 - c_rate * PELLET.capacity_ah * r_60) / 100

    slow, fast = _capacity_to_cut_off(PELLET, 0.05), _capacity_to_cut_off(PELLET, 1.0)
    assert slow == pytest.approx(by_hand(0.05), abs=0.002)  # (fade during the discharge, the cut-off's sample)
    assert fast == pytest.approx(by_hand(1.0), abs=0.002)
    assert 0.85 < fast / slow < 0.9  # rate capability of a thick NMC811 pellet cathode


def test_relaxation_follows_the_impedance_time_constants() -> None:
    cell = SolidStateCell(PELLET, soc=0.5)
    tau_li, tau_cat, tau_diff = cell.time_constants()
    # the arcs' own (R Q)^(1/n): 10 Ohm x 5 uF, n 0.9 and 30 Ohm x 0.5 mF, n 0.8; diffusion R^2/(20.19 D)
    assert tau_li == pytest.approx((10 * 5e-6) ** (1 / 0.9), rel=1e-9)
    assert tau_cat == pytest.approx((30 * 5e-4) ** (1 / 0.8), rel=1e-9)
    assert tau_diff == pytest.approx((5.22e-4) ** 2 / 4e-11 / 4.4934**2, rel=1e-9)
    ocv = cell.ocv()
    at_10ms = cell.apply_current(-1e-3, 0.01)
    at_2s = settle(cell, -1e-3, 1.99, dt=0.01)
    dcir_10ms, dcir_2s = (ocv - at_10ms) / 1e-3, (ocv - at_2s) / 1e-3
    assert dcir_10ms == pytest.approx(27 + 10 * (1 - math.exp(-0.01 / tau_li)) + 30 * (1 - math.exp(-0.01 / tau_cat)),
                                      rel=1e-3)
    assert dcir_2s > dcir_10ms + 4  # the cathode arc has settled: 2 s sees its full 30 Ohm
    # after the pulse the cell is still relaxing seconds and minutes later (diffusion), not settled at 1 s
    rest = [cell.apply_current(0.0, 1.0) for _ in range(600)]
    assert rest[0] < rest[9] < rest[59] < rest[299] < rest[599] < cell.ocv()
    assert cell.ocv() - rest[0] > 3 * (cell.ocv() - rest[599])


def test_the_spectrum_has_the_diffusion_tail_of_the_time_domain() -> None:
    cell = SolidStateCell(PELLET, soc=0.5)
    r_d = (3.854 - 3.810) / 0.05 * (5.22e-4) ** 2 / 4e-11 / 15 / (PELLET.capacity_ah * 3600)
    assert cell.diffusion_resistance() == pytest.approx(r_d)
    low = cell.impedance(1e-5)  # far below the slowest mode: the branch is a plain resistance
    assert low.real == pytest.approx(cell.dc_resistance() + r_d, rel=1e-3)
    mid = cell.impedance(0.01)  # a Warburg line at 45 degrees, coefficient R_d / sqrt(2 T)
    sigma = r_d / math.sqrt(2 * cell.time_constants()[2] * math.pi**2 / 4)
    assert -mid.imag == pytest.approx(sigma / math.sqrt(2 * math.pi * 0.01), rel=0.05)
    assert 0.4 < sigma < 4  # cell-parameters.md: 0.4-4 Ohm cm2 s^-1/2


def test_fade_is_faster_warm_and_at_high_rate() -> None:
    def lost(temperature: float, c_rate: float) -> float:
        cell = SolidStateCell(PELLET, soc=0.5, temperature_c=temperature)
        cell.state.formation_left_ah = 0.0
        before = cell.capacity_ah
        cell._age(1e-3, c_rate * PELLET.capacity_ah)
        return before - cell.capacity_ah

    reference = lost(25.0, 0.1)
    assert reference == pytest.approx(0.1 / 150 * 1e-3, rel=1e-9)  # 150 cycles to 80 % at the reference
    warm = math.exp(0.3 / 8.617333262e-5 * (1 / 298.15 - 1 / 333.15))  # Ea 0.3 eV, 25 -> 60 degC: x3.3
    assert lost(60.0, 0.1) / reference == pytest.approx(warm, rel=1e-6)
    assert lost(25.0, 1.0) / reference == pytest.approx((1 + 1.0) / (1 + 0.1), rel=1e-6)
    low = SolidStateCell(PELLET, soc=0.5, pressure_mpa=1.0)
    assert low.fade_stress(PELLET.capacity_ah * 0.1) == pytest.approx(5**0.5)  # lost contact: (1/5)^-0.5


def test_the_critical_current_keeps_rising_above_the_reference_pressure() -> None:
    ccd = [SolidStateCell(PELLET, pressure_mpa=p).critical_current_density() for p in (1, 5, 10, 20)]
    assert ccd[0] == pytest.approx(0.3 / 5)  # proportional to P below 5 MPa
    assert ccd[1] == pytest.approx(0.3)
    assert ccd[2] == pytest.approx(0.3 * 2**0.5) and ccd[3] == pytest.approx(0.6)


def test_lithium_creeps_into_the_electrolyte_and_shorts_at_high_pressure() -> None:
    safe = SolidStateCell(PELLET, soc=0.5, pressure_mpa=15.0)
    crushed = SolidStateCell(PELLET, soc=0.5, pressure_mpa=25.0)
    # by hand: 2e-4 mAh/cm2/h per MPa above 20 MPa -> 1e-3 mAh/cm2/h at 25 MPa; the soft short at 0.025 mAh/cm2: 25 h
    settle(safe, 0.0, 24 * 3600, dt=60.0)
    settle(crushed, 0.0, 24 * 3600, dt=60.0)
    assert not safe.shorted and not crushed.shorted
    settle(safe, 0.0, 2 * 3600, dt=60.0)
    settle(crushed, 0.0, 2 * 3600, dt=60.0)
    assert not safe.shorted and crushed.shorted and not crushed.hard_shorted


def test_a_protective_film_acts_on_the_lithium_interface() -> None:
    bare, film = SolidStateCell(PELLET), SolidStateCell(PELLET_PROTECTED)
    _, bare_li = bare.interfacial_parts()
    _, film_li = film.interfacial_parts()
    assert film_li == pytest.approx(bare_li * LI3N_FILM.r_ct_li_factor)
    assert film.critical_current_density() == pytest.approx(bare.critical_current_density() * LI3N_FILM.ccd_factor)
    # fade: 3/4 of the bare cell's is at the Li|SE interface, cut to a tenth: 1 / (0.25 + 0.075) = 3.1x the life
    i = PELLET.capacity_ah / 10
    assert bare.fade_stress(i) / film.fade_stress(i) == pytest.approx(1 / 0.325)
    # above the bare CCD only the bare cell grows a filament
    settle(bare, 0.6e-3, 4 * 3600, dt=10.0)
    film.state.soc = 0.0
    settle(film, 0.6e-3, 4 * 3600, dt=10.0)
    assert bare.shorted and not film.shorted


def test_the_polymer_cell_works_warm_and_its_lfp_plateau_is_flat() -> None:
    warm, room = SolidStateCell(POLYMER, soc=0.5, temperature_c=60.0), SolidStateCell(POLYMER, soc=0.5)
    assert warm.ohmic_resistance() == pytest.approx(26 + 2 * (1 / 0.2) ** 0 * (POLYMER.p_ref_mpa / 0.2) ** -0.2)
    assert room.ohmic_resistance() > 5 * warm.ohmic_resistance()  # PEO at room temperature: Ea 0.5 eV
    assert warm.ocv() == pytest.approx(3.3976, abs=1e-3)  # LFP's two-phase plateau (Afshar 2017)
    assert _capacity_to_cut_off(POLYMER, 0.2) > 0.97
