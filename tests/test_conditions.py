"""Pressure and temperature in profiles: the track alongside the steps, waits, limits, safety, and the coupling."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cellbench.bench.faces.simbench import cell_config
from cellbench.bench.runner.config import BenchConfig, ChannelConfig, instrument
from cellbench.bench.runner.run import run_bench
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.library import library_path
from cellbench.profiles.parse import InputError, parse_profile
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.espec import EspecChamberSim
from cellbench.simulators.keithley2450 import Keithley2450Sim
from cellbench.simulators.parameters import PELLET
from cellbench.simulators.press import PressServer, PressSim
from cellbench.simulators.server import SimServer
from tests.conftest import dry_run


def test_steps_wait_for_the_track_and_samples_carry_temperature_and_pressure(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        conditions:
          - set: {temperature: 45 degC, pressure: 10 MPa}
          - wait stable: {temperature: 0.5 degC, pressure: 0.1 MPa, for: 30 min, timeout: 6 h}
        steps:
          - wait: {temperature: 45 degC, pressure: 10 MPa, for: 30 min, timeout: 6 h}
          - discharge: {current: C/10, until: 1 h}
        """, tmp_path, soc=0.8, environment=True)
    assert run.outcome.completed, run.outcome.reason
    assert run.sequence == [("Rest", "stable for 30 min"), ("CC Discharge", "time 3600 s")]
    wait_end = run.steps[1]["start_time"]
    assert 1.5 * 3600 < wait_end < 4 * 3600  # the pellet's die takes hours to follow a 20 K step
    messages = [e["message"] for e in run.events if e["kind"] == "conditions"]
    assert messages == ["set 45 degC and 10 MPa", "stable at 45 degC and 10 MPa for 30 min"]
    for s in run.step_samples(2):
        assert s.ambient_c == pytest.approx(45.0, abs=0.1)
        assert s.t1_c == pytest.approx(45.0, abs=0.5)
        assert s.pressure_pa == pytest.approx(10e6, rel=0.01)
        assert s.displacement_um is not None
    # on discharge lithium strips: the stack shrinks
    dis = run.step_samples(2)
    assert dis[-1].displacement_um < dis[0].displacement_um


def test_a_stabilisation_that_never_comes_fails_the_test_with_the_reason(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        conditions:
          - set: {temperature: 80 degC}
          - wait stable: {temperature: 0.5 degC, for: 10 min, timeout: 1 h}
        steps:
          - rest: 10 h
        """, tmp_path, environment=True)
    assert not run.outcome.completed
    assert run.outcome.reason.startswith("failed: conditions not stable after 1 h: cell T1 (press platen) temperature ")
    assert "not within 0.5 degC of 80 degC" in run.outcome.reason
    assert [e["kind"] for e in run.events][-2:] == ["failed", "end"]
    assert run.bench.sim.tree.values["output"] is False
    assert run.samples[-1].test_time == pytest.approx(3600, abs=61)

    waited = dry_run(
        "name: t\nsteps:\n  - set: {temperature: 60 degC}\n"
        "  - wait: {temperature: 60 degC, for: 1 min, timeout: 30 min}\n",
        tmp_path, environment=True)
    # the cell lags by hours
    assert waited.outcome.reason.startswith("failed: waited 30 min: cell T1 (press platen) temperature ")
    assert "not within 0.5 degC of 60 degC" in waited.outcome.reason


def test_temperature_and_pressure_limits_end_steps(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        conditions:
          - set: {temperature: 60 degC}
          - hold: 1 h
          - ramp: {pressure: 20 MPa, rate: 1 MPa/min}
        steps:
          - rest: {for: 10 h, until: {temperature: "> 40 degC"}}
          - rest: {for: 10 h, until: {pressure: "> 15 MPa"}}
        """, tmp_path, environment=True)
    assert run.sequence == [("Rest", "temperature >= 40 degC"), ("Rest", "pressure >= 15 MPa")]
    ramp_start = 3600.0
    assert run.steps[1]["end_time"] == pytest.approx(ramp_start + 10 * 60, abs=130)  # 5 -> 15 MPa at 1 MPa/min


def test_a_temperature_ramp_in_the_track_moves_the_setpoint_at_its_rate(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        conditions:
          - ramp: {temperature: 35 degC, rate: 0.5 degC/min}
        steps:
          - rest: 40 min
        """, tmp_path, environment=True)
    ambient = {round(s.test_time): s.ambient_c for s in run.samples}
    assert ambient[600] < 30.0  # 0.5 degC/min: about 5 degC in 10 min, with the air's lag
    assert ambient[2400] == pytest.approx(35.0, abs=0.5)
    assert all(b - a <= 0.5 * 1.01 for a, b in zip(list(ambient.values()), list(ambient.values())[1:], strict=False))


def test_profile_temperature_and_pressure_safety_ranges(tmp_path: Path) -> None:
    run = dry_run(
        """
        name: t
        sample_period: 60 s
        safety: {temperature: [0 degC, 50 degC]}
        conditions:
          - set: {temperature: 70 degC}
        steps:
          - rest: 10 h
        """, tmp_path, environment=True)
    assert "temperature 50." in run.outcome.reason and "safety range 0 to 50 degC" in run.outcome.reason


def test_a_profile_needing_a_chamber_is_refused_on_a_channel_without_one(tmp_path: Path) -> None:
    text = "name: t\nsteps:\n  - rest: {for: 1 h, until: {temperature: '> 40 degC'}}\n  - set: {pressure: 5 MPa}\n"
    with pytest.raises(InputError) as info:
        dry_run(text, tmp_path, environment=False)
    assert info.value.problems == [
        "test.yaml:3: steps[0]: needs a temperature reading, but the channel has no chamber (channel 'ch1')",
        "test.yaml:4: steps[1]: needs a pressure reading, but the channel has no press (channel 'ch1')",
    ]


def test_stack_pressure_sweep_polarisation_falls_as_pressure_rises(tmp_path: Path) -> None:
    run = dry_run(library_path("pressure-sweep").read_text(), tmp_path, soc=0.0, environment=True)
    assert run.outcome.completed, run.outcome.reason
    polarisation = {}
    for st in run.steps:
        if st["step_type"] == "CC Discharge":
            rest = run.step_samples(st["step_count"] - 1)[-1]
            settled = run.step_samples(st["step_count"])[1]  # once the interfaces have charged
            polarisation[round(settled.pressure_pa / 1e6)] = rest.voltage - settled.voltage
    assert list(polarisation) == [1, 2, 5, 10, 20]
    values = list(polarisation.values())
    assert values == sorted(values, reverse=True)
    # contact loss at 1 MPa, by hand: the same C/10 through the resistance at 1 MPa instead of 5 MPa (diffusion,
    # which the pressure does not touch, adds the same to both)
    from cellbench.simulators.cell import SolidStateCell

    def resistance(mpa: float) -> float:
        return SolidStateCell(pressure_mpa=mpa).dc_resistance()

    assert values[0] - values[2] == pytest.approx(0.35e-3 * (resistance(1.0) - resistance(5.0)), rel=0.1)


def test_warm_pressing_formation_forms_warm_then_cools_under_pressure(tmp_path: Path) -> None:
    run = dry_run(library_path("warm-pressing-formation").read_text(), tmp_path, soc=0.0, environment=True)
    assert run.outcome.completed, run.outcome.reason
    charge = next(st for st in run.steps if st["step_type"] == "CC Charge")
    assert all(s.t1_c == pytest.approx(60, abs=1.0) for s in run.step_samples(charge["step_count"]))
    last = run.step_samples(run.steps[-1]["step_count"])
    assert all(s.t1_c == pytest.approx(25, abs=1.0) and s.pressure_pa == pytest.approx(10e6, rel=0.01) for s in last)


def test_one_chamber_and_one_press_shared_by_two_channels(tmp_path: Path) -> None:
    """The owner's profile sets the shared chamber and press; the other channel's waits on them and reads them.
    The press holds both cells side by side: it converts pressure to force over their summed area."""
    from cellbench.bench.runner.run import ProfileFile

    text = (
        "name: shared\nsample_period: 60 s\nsteps:\n  - set: {temperature: 40 degC, pressure: 8 MPa}\n"
        "  - wait: {temperature: 40 degC, pressure: 8 MPa, for: 10 min, timeout: 6 h}\n"
        "  - discharge: {current: C/10, until: 30 min}\n"
    )
    reader = (
        "name: reader\nsample_period: 60 s\nsteps:\n"
        "  - wait: {temperature: 40 degC, pressure: 8 MPa, for: 10 min, timeout: 6 h}\n"
        "  - discharge: {current: C/10, until: 30 min}\n"
    )
    profile = parse_profile(text, "shared.yaml")
    clock = VirtualClock()
    area = 2 * PELLET.area_cm2
    forces: list[float] = []

    def bench_at(resources: list[str], owner: str | None) -> BenchConfig:
        return BenchConfig(
            instruments={
                "smu1": instrument(driver="keithley2450", resource=resources[0]),
                "smu2": instrument(driver="keithley2450", resource=resources[1]),
                "oven": instrument(driver="espec", resource=resources[2], owner=owner),
                "press": instrument(driver="modbus-press", resource=resources[3], owner=owner),
            },
            cells={"a": cell_config(PELLET), "b": cell_config(PELLET)},
            channels={
                "ch1": ChannelConfig(cycler="smu1", cell="a", chamber="oven", press="press"),
                "ch2": ChannelConfig(cycler="smu2", cell="b", chamber="oven", press="press"),
            },
        )

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        cells = [SolidStateCell(soc=0.5), SolidStateCell(soc=0.6)]
        chamber = EspecChamberSim(loop.time, cells)
        press = PressSim(loop.time, cells, area_cm2=area, holding_mpa=5.0)
        smus = [Keithley2450Sim(c, loop.time) for c in cells]
        for smu in smus:
            smu.surroundings += [chamber, press]
        servers = [await SimServer(s).start() for s in smus]
        cs = await SimServer(chamber, read_termination=b"\r\n", write_termination=b"\r\n").start()
        ps = await PressServer(press).start_tcp()
        resources = [servers[0].resource, servers[1].resource, cs.resource, ps.resource]
        try:
            # both profiles set the shared instruments and none owns them: refused before anything moves
            with pytest.raises(InputError) as refused:
                await run_bench(bench_at(resources, None), profile, text, clock, runs_dir=tmp_path,
                                profile_source="shared.yaml")
            assert "shared.yaml:4: steps[0]: sets a temperature, but 'oven' is shared by ch1, ch2 and names no " \
                   "owner" in refused.value.problems[0]
            return await run_bench(bench_at(resources, "ch1"), profile, text, clock, runs_dir=tmp_path,
                                   channel_profiles={"ch2": ProfileFile(parse_profile(reader), reader, "reader.yaml")})
        finally:
            forces.append(press.force_kn)
            closing: list[SimServer | PressServer] = [*servers, cs, ps]
            for s in closing:
                await s.close()

    results = clock.run(main())
    assert [r.outcome.completed for r in results] == [True, True]
    assert forces[0] == pytest.approx(8.0 * area / 10.0, rel=0.01)  # kN: 8 MPa over both cells
    for r in results:
        with open_run(r.database) as store:
            last = store.samples()[-1]
            assert set(store.metadata()["instruments"]) == {"smu1" if r.channel == "ch1" else "smu2", "oven", "press"}
        assert last.ambient_c == pytest.approx(40, abs=0.2) and last.pressure_pa == pytest.approx(8e6, rel=0.01)


def test_a_channel_that_does_not_own_a_shared_instrument_may_not_set_it() -> None:
    from cellbench.bench.runner.run import channel_problems

    spec = {
        "name": "b", "instruments": {
            "smu1": {"driver": "keithley2450", "resource": "TCPIP::127.0.0.1::1::SOCKET"},
            "smu2": {"driver": "keithley2450", "resource": "TCPIP::127.0.0.1::2::SOCKET"},
            "oven": {"driver": "espec", "resource": "TCPIP::127.0.0.1::3::SOCKET", "owner": "ch1"}},
        "cells": {"a": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}},
        "channels": {"ch1": {"cycler": "smu1", "cell": "a", "chamber": "oven"},
                     "ch2": {"cycler": "smu2", "cell": "a", "chamber": "oven"}}}
    bench = BenchConfig.model_validate(spec)
    assert bench.reference_problems() == []
    hot = parse_profile("name: hot\nsteps:\n  - set: {temperature: 60 degC}\n  - rest: 1 h\n")
    assert channel_problems(bench, "ch1", hot) == []
    assert channel_problems(bench, "ch2", hot) == [
        (("steps", 0), "sets a temperature, but 'oven' is shared by ch1, ch2 and set by its owner, channel 'ch1'")]
    spec["instruments"]["oven"]["owner"] = "ch9"  # type: ignore[index]
    assert BenchConfig.model_validate(spec).reference_problems() == [
        (("instruments", "oven", "owner"), "'ch9' is not a channel using 'oven' (ch1, ch2)")]


def test_simulated_bench_without_environment_records_no_conditions(tmp_path: Path) -> None:
    run = dry_run("name: t\nsteps:\n  - rest: 2 min\n", tmp_path)
    assert run.samples and all(s.ambient_c is None and s.pressure_pa is None for s in run.samples)
    assert run.bench.chamber is None and run.bench.press is None


def shared_oven(tmp_path: Path, profiles: dict[str, str], owner: str | None = "ch1") -> list[Any]:
    """Two pellets in one ESPEC chamber and one press, each on its own 2450, every instrument served over
    loopback TCP on the virtual clock; each channel runs its profile text. The runs' results."""
    from cellbench.bench.runner.run import ProfileFile

    clock = VirtualClock()

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        cells = [SolidStateCell(soc=0.5), SolidStateCell(soc=0.6)]
        chamber = EspecChamberSim(loop.time, cells)
        press = PressSim(loop.time, cells, area_cm2=2 * PELLET.area_cm2, holding_mpa=5.0)
        smus = [Keithley2450Sim(c, loop.time) for c in cells]
        for smu in smus:
            smu.surroundings += [chamber, press]
        servers = [await SimServer(s).start() for s in smus]
        cs = await SimServer(chamber, read_termination=b"\r\n", write_termination=b"\r\n").start()
        ps = await PressServer(press).start_tcp()
        bench = BenchConfig(
            instruments={
                "smu1": instrument(driver="keithley2450", resource=servers[0].resource),
                "smu2": instrument(driver="keithley2450", resource=servers[1].resource),
                "oven": instrument(driver="espec", resource=cs.resource, owner=owner),
                "press": instrument(driver="modbus-press", resource=ps.resource, owner=owner)},
            cells={"a": cell_config(PELLET), "b": cell_config(PELLET)},
            channels={"ch1": ChannelConfig(cycler="smu1", cell="a", chamber="oven", press="press"),
                      "ch2": ChannelConfig(cycler="smu2", cell="b", chamber="oven", press="press")})
        own = {name: ProfileFile(parse_profile(text, f"{name}.yaml"), text, f"{name}.yaml")
               for name, text in profiles.items()}
        try:
            return await run_bench(bench, None, "", clock, runs_dir=tmp_path, channel_profiles=own)
        finally:
            closing: list[SimServer | PressServer] = [*servers, cs, ps]
            for s in closing:
                await s.close()

    return clock.run(main())


def test_one_profile_sets_a_shared_chamber_where_its_channel_owns_it_and_waits_for_it_elsewhere(
        tmp_path: Path) -> None:
    """'Require 40 °C' written once: `set: if owner` makes the owner's run set the chamber and the press, the
    other channel's run wait for them; both read the sensor they name."""
    text = ("name: require 40\nsample_period: 60 s\nsteps:\n"
            "  - wait: {temperature: 40 degC, pressure: 8 MPa, sensor: chamber, set: if owner, for: 10 min, "
            "timeout: 6 h}\n  - discharge: {current: C/10, until: 30 min}\n")
    results = shared_oven(tmp_path, {"ch1": text, "ch2": text})
    assert [r.outcome.completed for r in results] == [True, True], [r.outcome.reason for r in results]
    said = {}
    for r in results:
        with open_run(r.database) as store:
            said[r.channel] = [e["message"] for e in store.events() if e["kind"] == "conditions"]
            assert store.samples()[-1].ambient_c == pytest.approx(40, abs=0.2)
    assert "set temperature 40 degC, pressure 8 MPa" in said["ch1"]
    assert "waits for temperature 40 degC, pressure 8 MPa set by the instrument's owner" in said["ch2"]


def test_a_wait_and_a_safety_range_read_the_sensor_they_name_and_say_it(tmp_path: Path) -> None:
    """A wait on the chamber air that never comes names the chamber air in its failure; a safety range on the
    chamber air trips on the air's temperature and says so."""
    never = ("name: never\nsample_period: 60 s\nsteps:\n"
             "  - wait: {temperature: 45 degC, sensor: chamber, for: 1 min, timeout: 10 min}\n")
    hot = ("name: hot\nsample_period: 60 s\nsafety: {temperature: [10 degC, 30 degC], temperature_sensor: chamber}\n"
           "steps:\n  - set: {temperature: 40 degC}\n  - rest: 6 h\n")
    results = shared_oven(tmp_path, {"ch1": hot, "ch2": never})
    reasons = {r.channel: r.outcome.reason for r in results}
    assert reasons["ch2"].startswith("failed: waited 10 min: chamber air temperature ")
    assert "not within 0.5 degC of 45 degC" in reasons["ch2"]
    assert reasons["ch1"].startswith("safety stop: chamber air temperature 3")  # past 30 degC
    assert "outside the profile's safety range 10 to 30 degC" in reasons["ch1"]


def test_a_named_sensor_the_channel_cannot_read_is_refused() -> None:
    from cellbench.profiles.checks import instrument_problems

    wait = parse_profile("name: w\nsteps:\n  - wait: {temperature: 40 degC, sensor: cell, timeout: 1 h}\n")
    assert instrument_problems(wait, has_chamber=True, has_press=False) == [
        (("steps", 0), "reads the cell's T1 (sensor: cell, the press platen's thermocouple), but the channel has "
                       "no press")]
    assert instrument_problems(wait, has_chamber=False, has_press=True) == []
    safe = parse_profile("name: s\nsafety: {temperature: [0 degC, 60 degC], temperature_sensor: chamber}\n"
                         "steps:\n  - rest: 1 h\n")
    assert instrument_problems(safe, has_chamber=False, has_press=True) == [(
        ("safety", "temperature_sensor"), "reads the chamber air's temperature (sensor: chamber), but the channel "
                                          "has no chamber")]
