"""Everything a cycler schedule can say, each through the engine, the 2450 driver, TCP and the simulated cell."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from cellbench.bench.faces.simbench import SimulatedBench
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.profiles.parse import InputError, parse_profile
from cellbench.simulators.cell import SolidStateCell
from tests.conftest import dry_run

HALF = SolidStateCell(soc=0.5)


def test_cccv_charges_at_constant_current_then_holds_until_its_own_end_current(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        steps:
          - cccv: {current: C/20, voltage: 4.2 V, until: C/50}
        """, tmp_path)
    assert run.sequence == [("CCCV Charge", "current <= C/50")]
    samples = run.samples
    assert samples[1].current == pytest.approx(3.5e-3 / 20, rel=1e-3)  # CC phase
    assert samples[-1].voltage == pytest.approx(4.2, abs=1e-3)  # CV phase
    assert abs(samples[-1].current) <= 3.5e-3 / 50


def test_constant_power_and_constant_resistance_discharges(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 30 s
        steps:
          - discharge: {power: 0.5 mW, until: [3.7 V, 1 h]}
          - discharge: {resistance: 10 kohm, until: 1 h}
        """, tmp_path, noise=False)
    assert [t for t, _ in run.sequence] == ["CP Discharge", "CR Discharge"]
    for s in run.step_samples(1)[1:]:
        assert s.voltage * s.current == pytest.approx(-0.5e-3, rel=0.01)
    for s in run.step_samples(2)[1:]:
        assert s.current == pytest.approx(-s.voltage / 10e3, rel=0.01)


def test_a_current_ramp_rises_linearly(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        steps:
          - ramp: {current: [0 A, 1 mA], over: 10 min, sample_period: 10 s}
        """, tmp_path, temperature=60.0, noise=False)
    assert run.sequence == [("Current Ramp", "time 600 s")]
    for s in run.samples[1:]:
        # each interval runs at the ramp's value mid-interval: the reading lags by half a period
        assert s.current == pytest.approx(1e-3 * (s.test_time - 5) / 600, abs=2e-6)
    charge = run.samples[-1].charge_ah
    assert charge == pytest.approx(0.5 * 1e-3 * 600 / 3600, rel=0.01)  # the area under the ramp


@pytest.mark.parametrize("interpolation", ["step", "linear"])
def test_a_drive_cycle_from_csv_is_followed(tmp_path: Path, interpolation: str) -> None:
    (tmp_path / "drive.csv").write_text("time_s,current_A\n0,-0.0005\n60,0.0002\n120,-0.001\n180,0\n")
    run = dry_run(
        f"""
        name: t
        steps:
          - drive: {{file: drive.csv, interpolation: {interpolation}, sample_period: 5 s}}
        """, tmp_path, noise=False)
    assert run.sequence == [("Drive Cycle", "time 180 s")]
    samples = run.samples
    if interpolation == "step":
        at = {round(s.test_time, 2): s.current for s in samples}
        assert at[60.0] == pytest.approx(-0.0005)  # just before the edge
        assert at[60.01] == pytest.approx(0.0002)  # and 10 ms after it
        assert at[125.01] == pytest.approx(-0.001)
        charged, discharged = 0.0002 * 60 / 3600, (0.0005 + 0.001) * 60 / 3600
    else:
        charged = 0.5 * 0.0002 * 60 * (0.2 / 0.7 + 0.2 / 1.2) / 3600  # the two triangles above zero
        discharged = (0.5 * 0.0005 * 60 * 5 / 7 + 0.5 * 0.001 * 60 * 10 / 12 + 0.5 * 0.001 * 60) / 3600
    last = samples[-1]
    assert last.charge_ah == pytest.approx(charged, rel=0.03)
    assert last.discharge_ah == pytest.approx(discharged, rel=0.03)


def test_a_pulse_train_samples_both_sides_of_every_edge(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        steps:
          - pulse:
              sample_period: 1 s
              segments:
                - {current: -1 mA, for: 10 s}
                - {current: 0 A, for: 40 s}
                - {current: 0.5 mA, for: 10 s}
        """, tmp_path, noise=False)
    assert run.sequence == [("Pulse", "time 60 s")]
    at = {round(s.test_time, 3): s for s in run.samples}
    before, after = at[10.0], at[10.01]
    assert (before.current, after.current) == (pytest.approx(-1e-3), pytest.approx(0.0))
    dcir_10ms = (after.voltage - before.voltage) / (after.current - before.current)
    # by hand: R0 and each interface's arc charged for 10 ms with its own time constant (R Q)^(1/n)
    r_cat, r_li = HALF.interfacial_parts()
    tau_li, tau_cat = (r_li * 5e-6) ** (1 / 0.9), (r_cat * 5e-4) ** (1 / 0.8)
    charged = r_li * (1 - math.exp(-0.01 / tau_li)) + r_cat * (1 - math.exp(-0.01 / tau_cat))
    assert dcir_10ms == pytest.approx(HALF.ohmic_resistance() + charged, rel=0.02)
    assert at[50.01].current == pytest.approx(0.5e-3)


def test_limits_on_capacity_energy_and_slopes_end_steps_and_are_recorded(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 30 s
        steps:
          - discharge: {current: C/10, until: 0.5 mAh}
          - discharge: {current: C/10, until: 1 mWh}
          - charge: {current: C/20, until: 0.2 mAh}
          - charge: {current: C/20, until: {cycle_capacity: 0.3 mAh}}
          - rest: {for: 10 h, until: {dvdt: "< 1 mV/h"}}
          - hold: {voltage: 3.9 V, until: {didt: "< 0.01 uA/s"}, current_limit: 1 mA}
        """, tmp_path, noise=False, temperature=60.0)
    reasons = [r for _, r in run.sequence]
    assert reasons[:4] == [
        "step_capacity >= 0.5 mAh", "step_energy >= 1 mWh", "step_capacity >= 0.2 mAh", "cycle_capacity >= 0.3 mAh"
    ]
    assert reasons[4].startswith("dvdt <=") and reasons[5].startswith("didt <=")
    first = run.step_samples(1)[-1]
    assert first.discharge_ah == pytest.approx(0.5e-3, rel=0.01)
    second = run.step_samples(2)[-1]
    assert second.discharge_wh - first.discharge_wh == pytest.approx(1e-3, rel=0.01)
    # the fourth step stops once the cycle (which began with the third) has taken 0.3 mAh
    assert run.step_samples(4)[-1].charge_ah == pytest.approx(0.3e-3, rel=0.01)
    rest = run.step_samples(5)
    assert rest[-1].test_time - rest[0].test_time < 120  # the relaxed cell is flat at once


def test_then_goes_to_a_label_out_of_a_loop_or_to_the_end(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        steps:
          - discharge: {current: C/10, until: {time: 10 min, then: skip}}
          - charge: {current: C/10, until: 10 min}
          - rest: {for: 5 min, label: skip}
          - repeat: 5
            steps:
              - discharge: {current: C/10, until: {time: 5 min, then: break}}
              - rest: 5 min
          - charge: {current: C/20, until: {time: 5 min, then: end}}
          - rest: 1 h
        """, tmp_path)
    assert run.sequence == [
        ("CC Discharge", "time 600 s"), ("Rest", "time 300 s"), ("CC Discharge", "time 300 s"),
        ("CC Charge", "time 300 s"),
    ]
    assert run.outcome.completed
    assert [st["step_index"] for st in run.steps] == [1, 3, 4, 6]


def test_nested_loops_explicit_cycles_and_a_loop_time_budget(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        cycle_counting: explicit
        steps:
          - repeat: 2
            steps:
              - rest: {for: 1 min, new_cycle: true}
              - repeat: 3
                steps:
                  - rest: 1 min
          - repeat: 100
            time_limit: 1 h
            steps:
              - discharge: {current: C/20, until: 10 min}
              - rest: 10 min
          - rest: 1 min
        """, tmp_path)
    kinds = [t for t, _ in run.sequence]
    assert kinds[:8] == ["Rest"] * 8
    assert [st["cycle"] for st in run.steps[:8]] == [1, 1, 1, 1, 2, 2, 2, 2]
    budget = run.steps[8:-1]
    assert len(budget) == 6  # 1 h of 10-minute steps
    assert budget[-1]["end_reason"] == "the time limit of the repeat at steps[1] ran out"
    assert run.steps[-1]["step_type"] == "Rest"
    assert run.steps[-1]["start_time"] == pytest.approx(8 * 60 + 3600)


def test_record_rules_keep_a_long_rest_small_and_follow_voltage_changes(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        steps:
          - rest: {for: 10 h, record: {every: 1 h}}
          - discharge: {current: C/10, until: 2 h, record: {voltage: 5 mV}}
        """, tmp_path, noise=False)
    assert [s.test_time for s in run.step_samples(1)] == [3600.0 * k for k in range(11)]
    dis = run.step_samples(2)
    inner = dis[:-1]  # the last sample is the step's end, recorded whatever it changed
    assert all(abs(b.voltage - a.voltage) >= 5e-3 for a, b in itertools.pairwise(inner))
    assert dis[-1].test_time == pytest.approx(12 * 3600)
    assert 5 < len(dis) < 120  # not a sample a minute (120), but every 5 mV


def test_profile_safety_limits_end_the_test_in_the_safe_state(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        safety: {voltage: [3.0 V, 3.9 V], current: [-1 mA, 1 mA]}
        steps:
          - charge: {current: C/10, until: 12 h}  # the profile's own window ends it first
        """, tmp_path, temperature=60.0)
    assert not run.outcome.completed
    assert "outside the profile's safety range 3 to 3.9 V" in run.outcome.reason
    assert [e["kind"] for e in run.events] == ["start", "safety", "end"]
    assert run.bench.sim.tree.values["output"] is False
    assert max(s.voltage for s in run.samples) < 3.91
    fast = dry_run(
        "name: t\nsafety: {current: [-1 mA, 1 mA]}\nsteps:\n  - discharge: {current: 2 mA, until: 1 h}\n", tmp_path
    )
    assert "current -0.002 A is outside the profile's safety range" in fast.outcome.reason


def test_pybamm_strings_and_yaml_record_the_same_run(tmp_path: Path) -> None:
    yaml_run = dry_run(
        """
        name: t
        sample_period: 60 s
        steps:
          - discharge: {current: C/5, until: 3.6 V}
          - rest: 30 min
          - charge: {current: C/20, until: [2 h, 4.1 V]}
          - hold: {voltage: 4.1 V, until: C/50}
          - discharge: {power: 1 mW, until: 10 min, sample_period: 1 min}
        """, tmp_path)
    pybamm_run = dry_run(
        """
        name: t
        sample_period: 60 s
        steps:
          - Discharge at C/5 until 3.6 V
          - Rest for 30 minutes
          - Charge at C/20 for 2 hours or until 4.1 V
          - Hold at 4.1 V until C/50
          - Discharge at 1 mW for 10 minutes (1 minute period)
        """, tmp_path)
    assert yaml_run.sequence == pybamm_run.sequence
    assert [t for t, _ in yaml_run.sequence] == ["CC Discharge", "Rest", "CC Charge", "CV", "CP Discharge"]
    assert yaml_run.samples == pybamm_run.samples
    assert all(s.current < 0 for s in pybamm_run.step_samples(1)[1:])  # PyBaMM's positive discharge, our sign


def test_c_rates_can_follow_the_last_measured_capacity(tmp_path: Path) -> None:
    text = """
        name: t
        sample_period: 60 s
        c_rate_basis: {basis}
        steps:
          - discharge: {{current: C/10, until: 2.5 V}}
          - charge: {{current: C/20, until: 10 min}}
        """
    nominal = dry_run(text.format(basis="nominal"), tmp_path, soc=1.0, capacity_factor=0.8)
    measured = dry_run(text.format(basis="measured"), tmp_path, soc=1.0, capacity_factor=0.8)
    measured_capacity = measured.step_samples(1)[-1].discharge_ah
    assert measured_capacity == pytest.approx(0.8 * 3.5e-3, rel=0.02)
    assert nominal.step_samples(2)[-1].current == pytest.approx(3.5e-3 / 20, rel=1e-3)
    assert measured.step_samples(2)[-1].current == pytest.approx(measured_capacity / 20, rel=1e-3)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("  - rest: {for: 1 h, until: {time: 1 s, then: nowhere}}\n",
         "test.yaml:3: steps[0]: goto 'nowhere': no step has that label (labels: none)"),
        ("  - rest: {for: 1 h, until: {time: 1 s, then: break}}\n",
         "test.yaml:3: steps[0]: 'break' outside any repeat"),
        ("  - rest: {label: a, for: 1 h}\n  - rest: {for: 1 h, label: a}\n",
         "test.yaml:4: steps[1]: label 'a' is used twice"),
        ("  - rest: {label: top, for: 1 min}\n  - charge: {current: C/20, until: {time: 1 h, then: top}}\n",
         "test.yaml:3: steps[0]: a loop that can never end: every way on from this step leads back"),
        ("  - Dischrage at 1C until 2.5 V\n", "test.yaml:3: steps[0]: 'Dischrage at 1C until 2.5 V' is not a PyBaMM"),
    ],
)
def test_impossible_profiles_are_rejected_with_the_reason(steps: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_profile("name: t\nsteps:\n" + steps, "test.yaml")
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_a_profile_asking_more_than_the_cell_takes_is_refused_before_any_instrument_moves(tmp_path: Path) -> None:
    text = "name: t\nsteps:\n  - rest: 1 min\n  - hold: {voltage: 4.5 V, until: C/50}\n"
    profile = parse_profile(text, "t.yaml")
    bench = SimulatedBench()
    clock = VirtualClock()

    async def main() -> None:
        async with bench:
            await bench.run(profile, text, clock, runs_dir=tmp_path, profile_source="t.yaml")

    with pytest.raises(InputError) as info:
        clock.run(main())
    assert info.value.problems == [
        "t.yaml:4: steps[1].hold: voltage 4.5 V is above the cell's maximum 4.3 V (cell 'pellet')"
    ]
    assert bench.sim is not None and bench.sim.tree.values["output"] is False
    assert not list(tmp_path.glob("*.sqlite"))
