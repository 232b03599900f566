"""Checks that need more than one field: flow, files a profile names, and the cell it will run on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellbench.profiles.controls import load_series
from cellbench.profiles.program import _path_key, compile_profile, flow_problems
from cellbench.profiles.schema import Profile, body_of
from cellbench.profiles.units import CurrentSpec

Problem = tuple[tuple[str | int, ...], str]
NEEDS = {"temperature": "chamber", "pressure": "press"}


def profile_checks(base_dir: Path) -> Callable[[Profile], list[Problem]]:
    """The checks of a profile file read from base_dir (drive files are relative to it)."""

    def check(profile: Profile) -> list[Problem]:
        problems = flow_problems(profile) + sign_problems(profile) + safety_problems(profile)
        for ins in compile_profile(profile).instrs:
            if ins.op != "step":
                continue
            where = _path_key(ins.path)
            body = body_of(ins.node)
            if ins.node.kind == "drive":
                try:
                    load_series((base_dir / body.file).resolve())
                except (OSError, ValueError) as exc:
                    problems.append(((*where, "drive", "file"), f"cannot use drive file: {exc}"))
        return problems

    return check


def sign_problems(profile: Profile) -> list[Problem]:
    """Negative currents or powers in a charge or a discharge step, whose kind gives the sign."""
    problems: list[Problem] = []
    for ins in compile_profile(profile).instrs:
        if ins.op != "step" or ins.node.kind not in ("charge", "discharge", "cccv"):
            continue
        body = body_of(ins.node)
        for name in ("current", "power"):
            value = getattr(body, name, None)
            magnitude = value.amps if isinstance(value, CurrentSpec) and value.amps is not None else (
                value.c_rate if isinstance(value, CurrentSpec) else value)
            if isinstance(magnitude, float) and magnitude < 0:
                shown = str(value) if isinstance(value, CurrentSpec) else f"{value:g} W"
                problems.append(((*_path_key(ins.path), ins.node.kind, name),
                                 f"{name} {shown} is negative, but a {ins.node.kind} step gives the sign itself: "
                                 "write it without '-'"))
    return problems


def safety_problems(profile: Profile) -> list[Problem]:
    """Voltages the profile asks for beyond its own safety window."""
    if profile.safety is None or profile.safety.voltage is None:
        return []
    low, high = profile.safety.voltage
    return cell_problems(profile, low, high, whose="the profile's safety")


def currents_asked(body: Any) -> list[tuple[str, CurrentSpec]]:
    """Every current a step body names: its setpoint(s), current limit, pulse segments."""
    out: list[tuple[str, CurrentSpec]] = []
    for name in ("current", "current_limit"):
        value = getattr(body, name, None)
        values = value if isinstance(value, tuple) else (value,)
        out.extend((name, v) for v in values if isinstance(v, CurrentSpec))
    for segment in getattr(body, "segments", None) or ():
        if isinstance(segment.current, CurrentSpec):
            out.append(("segment current", segment.current))
    return out


def range_problems(profile: Profile, capacity_ah: float, max_amps: float, instrument: str) -> list[Problem]:
    """Currents the profile asks of a cell of this capacity that the instrument cannot source."""
    problems: list[Problem] = []
    for ins in compile_profile(profile).instrs:
        if ins.op != "step":
            continue
        for name, spec in currents_asked(body_of(ins.node)):
            amps = abs(spec.resolve(capacity_ah))
            if amps > max_amps * (1 + 1e-9):
                asked = f"{spec}" if spec.c_rate is None else f"{spec} ({amps:.4g} A)"
                problems.append(((*_path_key(ins.path), ins.node.kind),
                                 f"{name} {asked} is beyond the {max_amps:g} A the {instrument} can source"))
    return problems


CHARGING_KINDS = ("charge", "cc", "cccv", "pulse")  # steps whose setpoint may plate lithium (a positive current)


def density_problems(profile: Profile, capacity_ah: float, area_cm2: float, limit_a_cm2: float,
                     cell: str) -> list[Problem]:
    """Charging currents (lithium plated on the anode) denser than the cell's limit: a short waiting to happen."""
    problems: list[Problem] = []
    for ins in compile_profile(profile).instrs:
        if ins.op != "step" or ins.node.kind not in CHARGING_KINDS:
            continue
        for name, spec in currents_asked(body_of(ins.node)):
            amps = spec.resolve(capacity_ah)
            if name == "current_limit" or (amps <= 0 and ins.node.kind != "charge"):
                continue
            density = abs(amps) / area_cm2
            if density > limit_a_cm2 * (1 + 1e-9):
                problems.append(((*_path_key(ins.path), ins.node.kind),
                                 f"{name} {spec} charges at {density * 1e3:.3g} mA/cm² on {area_cm2:g} cm², above "
                                 f"the {limit_a_cm2 * 1e3:.3g} mA/cm² that cell '{cell}' takes "
                                 "(max_charge_current_density): plating lithium this fast shorts it; to do it all "
                                 "the same, say so with --allow-current-density (recorded in the run)"))
    return problems


def loop_warnings(profile: Profile) -> list[Problem]:
    """Jumps back to an earlier step that no time budget bounds: if their condition keeps coming true the
    test never ends (a counted repeat does not bound them: a goto does not count its iterations)."""
    program = compile_profile(profile)
    warnings: list[Problem] = []
    for pc, ins in enumerate(program.instrs):
        if ins.op != "step":
            continue
        body = body_of(ins.node)
        for then in {lim.then for lim in body.until} | {c.then for c in body.check}:
            target = program.labels.get(then)
            if target is None or target > pc:
                continue
            timed = [lp for lp in ins.enclosing if program.instrs[lp].node.time_limit is not None
                     and lp < target <= program.instrs[lp].loop_end]
            if not timed:
                warnings.append((_path_key(ins.path), f"goto '{then}' jumps back with no time limit around it: if "
                                 "its condition keeps coming true the test never ends (put these steps in a repeat "
                                 "with a time_limit)"))
    return warnings


def settings(profile: Profile, quantity: str, why: str) -> list[Problem]:
    """Where the profile sets a `quantity` ("temperature" or "pressure": a conditions entry or a `set` step),
    each said with `why` it may not."""
    problems: list[Problem] = []
    for i, cond in enumerate(profile.conditions):
        (kind, body), = cond.model_dump(by_alias=True).items()
        if kind != "wait stable" and isinstance(body, dict) and body.get(quantity) is not None:  # a wait only reads
            problems.append((("conditions", i), f"sets a {quantity}, but {why}"))
    for ins in compile_profile(profile).instrs:
        if ins.op == "step" and ins.node.kind == "set" and getattr(body_of(ins.node), quantity, None) is not None:
            problems.append((_path_key(ins.path), f"sets a {quantity}, but {why}"))
    return problems


def pressure_settings(profile: Profile) -> list[Problem]:
    """Where the profile sets a stack pressure: refused on a press that only reads."""
    return settings(profile, "pressure", "the channel's press only reads (a load cell): set the fixture by hand "
                                         "and wait for the pressure instead")


def cell_problems(profile: Profile, v_min: float, v_max: float, whose: str = "the cell's") -> list[Problem]:
    """Voltages the profile asks for that the cell must never see."""
    problems: list[Problem] = []
    for ins in compile_profile(profile).instrs:
        if ins.op != "step":
            continue
        where = (*_path_key(ins.path), ins.node.kind)
        body = body_of(ins.node)
        asked: list[tuple[str, Any]] = []
        for name in ("voltage", "voltage_limit"):
            value = getattr(body, name, None)
            if isinstance(value, float):
                asked.append((name, value))
            elif isinstance(value, tuple):
                asked.extend((name, v) for v in value)
        asked.extend(("until voltage", lim.value) for lim in body.until if lim.kind == "voltage")
        for name, volts in asked:
            if volts > v_max + 1e-9:
                problems.append((where, f"{name} {volts:g} V is above {whose} maximum {v_max:g} V"))
            elif volts < v_min - 1e-9:
                problems.append((where, f"{name} {volts:g} V is below {whose} minimum {v_min:g} V"))
    return problems


HOST_FREE = ("schedule", "set", "eis")  # steps that set no current or voltage from the host


def _sensor_missing(sensor: str | None, has_chamber: bool, has_press: bool) -> str | None:
    """Why the channel cannot read the temperature sensor a profile names, or None."""
    if sensor == "chamber" and not has_chamber:
        return "reads the chamber air's temperature (sensor: chamber), but the channel has no chamber"
    if sensor == "cell" and not has_press:
        return ("reads the cell's T1 (sensor: cell, the press platen's thermocouple), but the channel has no "
                "press")
    return None


def instrument_problems(
    profile: Profile, *, has_chamber: bool, has_press: bool, has_potentiostat: bool = True,
    runs_schedules: bool = True, host_driven: bool = True, cycler: str = "the cycler",
) -> list[Problem]:
    """What the profile reads or sets that the channel has no instrument for, or its cycler cannot do."""
    have = {"temperature": has_chamber, "pressure": has_press}
    problems: list[Problem] = []
    for ins in compile_profile(profile).instrs:
        if ins.op == "step" and ins.node.kind == "eis" and not has_potentiostat:
            problems.append((_path_key(ins.path), "an impedance step needs a potentiostat on the channel"))
        if ins.op == "step" and ins.node.kind == "schedule" and not runs_schedules:
            problems.append((_path_key(ins.path), f"{cycler} runs no schedules of its own: write the steps out"))
        if ins.op == "step" and ins.node.kind not in HOST_FREE and not host_driven:
            problems.append((_path_key(ins.path), f"{cycler} runs only its own schedules: name one in a "
                                                   "'schedule' step"))
    for i, cond in enumerate(profile.conditions):
        body = next(iter(cond.model_dump(by_alias=True).values()))
        for quantity in ("temperature", "pressure"):
            if isinstance(body, dict) and body.get(quantity) is not None and not have[quantity]:
                problems.append((("conditions", i), f"sets a {quantity}, but the channel has no {NEEDS[quantity]}"))
    for ins in compile_profile(profile).instrs:
        if ins.op != "step":
            continue
        body = body_of(ins.node)
        asked = {lim.kind for lim in body.until} | {
            q for q in ("temperature", "pressure")
            if ins.node.kind in ("wait", "set") and getattr(body, q, None) is not None
        }
        sensor = getattr(body, "sensor", None) if ins.node.kind == "wait" else None
        for quantity in ("temperature", "pressure"):
            if quantity in asked and sensor is None and not have[quantity]:
                problems.append((_path_key(ins.path), f"needs a {quantity} reading, but the channel has no "
                                                       f"{NEEDS[quantity]}"))
        if "temperature" in asked and (said := _sensor_missing(sensor, has_chamber, has_press)):
            problems.append((_path_key(ins.path), said))
    for i, cond in enumerate(profile.conditions):
        sensor = getattr(getattr(cond, "wait_stable", None), "sensor", None)
        if said := _sensor_missing(sensor, has_chamber, has_press):
            problems.append((("conditions", i), said))
    safety = profile.safety
    if safety and safety.temperature and (said := _sensor_missing(safety.temperature_sensor, has_chamber,
                                                                   has_press)):
        problems.append((("safety", "temperature_sensor"), said))
    for quantity in ("temperature", "pressure"):
        named = quantity == "temperature" and safety is not None and safety.temperature_sensor is not None
        if safety and getattr(safety, quantity) is not None and not have[quantity] and not named:
            problems.append(
                (("safety", quantity), f"a {quantity} safety range needs a {NEEDS[quantity]} on the channel")
            )
    return problems
