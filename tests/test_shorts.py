"""Lithium-metal short detection while charging, on the simulated cell over the real wire (virtual clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellbench.bench.faces.simbench import SimulatedBench
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.parse import parse_profile
from tests.conftest import shorted_run

CHARGE = """
name: slow charge
sample_period: 1 min
{extra}
steps:
  - charge: {{current: C/20, until: [4.2 V, 2 h]}}  # below the CCD: no dendrite of its own
"""
SHORT_AT = 3600 + 30.0


def charge_with_short(tmp_path: Path, ohms: float, extra: str = "", potentiostat: bool = False,
                      supervise: bool | None = None) -> tuple[Any, list[dict[str, Any]]]:
    result = shorted_run(CHARGE.format(extra=extra), tmp_path, at=SHORT_AT, ohms=ohms, soc=0.3, supervise=supervise,
                         potentiostat=potentiostat)
    with open_run(result.database) as store:
        return result, store.events()


def test_a_soft_short_stops_the_charge_and_says_so(tmp_path: Path) -> None:
    result, events = charge_with_short(tmp_path, 3000.0)
    assert result.outcome.reason.startswith("safety stop: soft short: the voltage fell")
    (trip,) = [e for e in events if e["kind"] == "safety"]
    assert SHORT_AT < trip["test_time"] <= SHORT_AT + 60  # at the next sample


def test_the_supervisor_sees_a_short_within_its_period_whatever_the_sample_period(tmp_path: Path) -> None:
    """With 1-min samples the engine alone sees a short up to a minute late; the supervisor's own readings (once a
    second) go through the same signatures, so the charge stops within its period of the short."""
    result, events = charge_with_short(tmp_path, 3000.0, supervise=True)
    assert result.outcome.reason.startswith("safety stop: soft short: the voltage fell")
    (trip,) = [e for e in events if e["kind"] == "safety"]
    assert "(supervisor, reading" in trip["message"]
    assert SHORT_AT <= trip["test_time"] <= SHORT_AT + 1.0 + 1e-6


def test_a_short_the_supervisor_sees_is_flagged_by_the_engine_and_the_test_goes_on(tmp_path: Path) -> None:
    result, events = charge_with_short(tmp_path, 30000.0, "short_detection: {action: flag}", supervise=True)
    assert result.outcome.completed
    (first, *_) = [e for e in events if e["kind"] == "short"]
    assert "soft short" in first["message"] and "flagged" in first["message"]
    assert SHORT_AT <= first["test_time"] <= SHORT_AT + 1.0 + 1e-6  # the engine alone: at its next sample, 30 s on


def test_a_hard_short_is_called_a_short(tmp_path: Path) -> None:
    result, _ = charge_with_short(tmp_path, 20.0)
    assert result.outcome.reason.startswith("safety stop: hard short: the voltage fell")


def test_a_flagged_short_is_recorded_and_the_test_goes_on(tmp_path: Path) -> None:
    result, events = charge_with_short(tmp_path, 30000.0, "short_detection: {action: flag}")  # a slight leak
    assert result.outcome.completed
    shorts = [e for e in events if e["kind"] == "short"]
    assert len(shorts) >= 1 and "soft short" in shorts[0]["message"] and "flagged" in shorts[0]["message"]


def test_a_short_can_be_looked_at_with_a_spectrum_before_the_stop(tmp_path: Path) -> None:
    result, events = charge_with_short(tmp_path, 3000.0, "short_detection: {action: eis}", potentiostat=True)
    assert result.outcome.reason.startswith("safety stop: soft short:")
    assert "; at rest, spectrum of 71 points" in result.outcome.reason
    assert [e["kind"] for e in events].count("handover") == 2  # the cycler let go before the potentiostat
    with open_run(result.database) as store:
        assert len(store.spectra()[1]) == 71  # 1 MHz to 0.1 Hz: 7 decades at 10 points each, and the last


def test_no_false_alarm_over_healthy_cycles(tmp_path: Path) -> None:
    text = """
name: healthy cycling
sample_period: 1 min
steps:
  - repeat: 12
    steps:
      - charge: {current: C/3, until: 4.2 V}
      - hold: {voltage: 4.2 V, until: C/20}
      - rest: 20 min
      - discharge: {current: C/3, until: 2.5 V}
      - rest: 20 min
"""
    clock = VirtualClock()
    bench = SimulatedBench(initial_soc=0.0, temperature_c=60.0)  # at 60 degC C/3 stays below the CCD

    async def main() -> Any:
        async with bench:
            return await bench.run(parse_profile(text), text, clock, runs_dir=tmp_path)

    result = clock.run(main())
    assert result.outcome.completed and result.outcome.cycles == 12
    with open_run(result.database) as store:
        assert not [e for e in store.events() if e["kind"] in ("short", "safety")]
        charges = [st for st in store.steps() if st["step_type"] == "CC Charge"]
    assert len(charges) == 12 and all(st["end_reason"].startswith("voltage") for st in charges)  # watched, all


ABOVE_CCD = """
name: plating above the CCD
sample_period: 10 s
{extra}
steps:
  - charge: {{current: 0.6 mA, until: [4.2 V, 1 h]}}
"""


def plate_above_ccd(tmp_path: Path, extra: str = "") -> tuple[Any, list[dict[str, Any]], SimulatedBench]:
    """The simulated cell's own dendrite (nothing injected): 0.6 mA on 1 cm², twice the CCD at 25 degC."""
    text = ABOVE_CCD.format(extra=extra)
    clock = VirtualClock()
    bench = SimulatedBench(initial_soc=0.3)

    async def main() -> Any:
        async with bench:
            return await bench.run(parse_profile(text), text, clock, runs_dir=tmp_path)

    result = clock.run(main())
    with open_run(result.database) as store:
        return result, store.events(), bench


def test_the_model_dendrite_is_flagged_soft_then_hard(tmp_path: Path) -> None:
    result, events, bench = plate_above_ccd(tmp_path, "short_detection: {action: flag}")
    shorts = [e for e in events if e["kind"] == "short"]
    assert [e["message"].split(":")[0] for e in shorts] == ["soft short", "hard short"]  # once each
    p, excess = bench.cell.params, 0.6 - 0.3  # mA/cm² above the CCD (0.3 at 25 degC and 5 MPa)
    touch = p.soft_short_at * p.dendrite_capacity_mah_cm2 / excess * 3600  # 300 s
    assert touch < shorts[0]["test_time"] <= touch + 20  # within two samples of the filament touching
    assert shorts[1]["test_time"] < p.dendrite_capacity_mah_cm2 / excess * 3600  # collapse before it bridges
    assert result.outcome.reason.startswith("safety stop: cell voltage")  # then the safe window stops it


def test_the_model_dendrite_stops_the_charge_at_its_soft_onset_by_default(tmp_path: Path) -> None:
    result, _, bench = plate_above_ccd(tmp_path)
    assert result.outcome.reason.startswith("safety stop: soft short: the voltage fell")
    assert not bench.cell.hard_shorted  # stopped before the filament bridged the cell


def test_healthy_cells_in_a_shared_chamber_never_trip_while_its_owner_heats_it(tmp_path: Path) -> None:
    """The rehearsal of a shared box: three pellets on one served Maccor box in one oven, charging at C/20
    (below the lithium's critical current density at any temperature the oven reaches) while the oven's owner,
    a 2450 desk channel, heats it from 25 to 40 degC under them (their resistance falls as they warm, and the
    voltage with it). No channel may see a short; the cells charge to their cut-off."""
    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app

    lines = ["name: shared-box", "instruments:",
             '  box: {driver: maccor, resource: "TCPIP::192.0.2.21::57570::SOCKET", binary_port: 57560}',
             '  smu1: {driver: keithley2450, resource: "TCPIP::192.0.2.30::5025::SOCKET"}',
             '  oven: {driver: espec, resource: "TCPIP::192.0.2.31::57732::SOCKET", owner: desk}', "cells:"]
    lines += [f"  P-{i}: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V, area: 1 cm^2}}"
              for i in range(1, 5)]
    lines += ["channels:"] + [f"  ch{i}: {{cycler: box, cycler_channel: {i - 1}, cell: P-{i}, chamber: oven}}"
                              for i in range(1, 4)]
    lines += [f"  desk: {{cycler: smu1, cell: P-4, chamber: oven, profile: {tmp_path / 'owner.yaml'}}}"]
    (tmp_path / "box.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "owner.yaml").write_text("name: owner\nsample_period: 60 s\nsteps:\n  - rest: 10 min\n"
                                         "  - set: {temperature: 40 degC}\n  - rest: 3 h\n")
    (tmp_path / "charge.yaml").write_text("name: charge\nsample_period: 2 s\nsteps:\n"
                                          "  - charge: {current: C/20, until: [4.2 V, 2 h]}\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "charge.yaml"), "--dry-run", "--bench",
                                      str(tmp_path / "box.yaml"), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    for db in (tmp_path / "runs").glob("*.sqlite"):
        with open_run(db) as store:
            kinds = [e["kind"] for e in store.events()]
            samples = store.samples()
        assert "short" not in kinds and "safety" not in kinds, (db.name, kinds)
        if samples[-1].step_type == "CC Charge":  # a box channel: it warmed from 25 to 40 degC while charging
            assert samples[0].ambient_c is not None and samples[0].ambient_c < 26
            assert samples[-1].ambient_c is not None and samples[-1].ambient_c > 39


DISCHARGES = """
name: discharge into a short
sample_period: 1 min
steps:
  - {step}
"""


def discharge_with_short(tmp_path: Path, step: str, ohms: float = 20.0) -> tuple[Any, list[Any], list[Any]]:
    """A discharge on the served 2450 (virtual clock, the supervisor on), the cell shorted 30 s in."""
    result = shorted_run(DISCHARGES.format(step=step), tmp_path, at=30.0, ohms=ohms, soc=0.9, supervise=True)
    with open_run(result.database) as store:
        return result, store.events(), store.samples()


def test_a_voltage_held_at_a_discharges_end_never_charges_a_shorted_cell_for_more_than_a_second(
        tmp_path: Path) -> None:
    """A CCCV discharge holds 3.5 V with the discharge current as the 2450's (symmetric) current limit: a soft
    short that pulls the cell below 3.5 V (but not out of its safe window) is pushed charge into, up to that
    current. The supervisor reads the current's wrong sign within its period and turns the output off."""
    # 200 ohms: the cell's open circuit falls to 3.13 V, inside its safe window, below the 3.5 V held
    result, events, samples = discharge_with_short(tmp_path, "cccv: {current: C/5, voltage: 3.5 V, until: C/50}",
                                                   200.0)
    assert result.outcome.reason.startswith("safety stop: current of the wrong sign: +")
    assert [s.current < 0 for s in samples if s.test_time < 30.0] == [True]  # it discharged until the short
    (trip,) = [e for e in events if e["kind"] == "safety"]
    assert 30.0 <= trip["test_time"] <= 31.0 + 1e-6  # the supervisor's period, not the 1 min sample period
    assert "(supervisor, reading" in trip["message"]
    charge = float(trip["message"].split("wrong sign: ")[1].split(" mA")[0])
    assert 0.05 * 0.7 < charge <= 0.7 + 1e-3  # mA: up to C/5 of the 3.5 mAh pellet, the current limit


def test_a_discharge_held_at_its_cutoff_stops_within_a_second_when_a_short_pulls_the_cell_below_it(
        tmp_path: Path) -> None:
    """A discharge to a cut-off ends as a voltage source at the cut-off (exact cut-offs however steep the knee), its
    current limit the discharge current; a 2450's limit is symmetric, so a short that pulls the cell below the
    cut-off is charged at up to that current until the wrong sign is seen: within the supervisor's period."""
    result, events, samples = discharge_with_short(tmp_path, "discharge: {current: C/5, until: 3.5 V}", 200.0)
    assert result.outcome.reason.startswith("safety stop: current of the wrong sign: +")
    assert [s.current < 0 for s in samples if s.test_time < 30.0] == [True]  # it discharged until the short
    (trip,) = [e for e in events if e["kind"] == "safety"]
    assert 30.0 <= trip["test_time"] <= 31.0 + 1e-6
