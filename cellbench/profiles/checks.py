"""Checks that need more than one field: flow, files a profile names, and the cell it will run on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellbench.profiles.controls import load_series
from cellbench.profiles.program import _path_key, compile_profile, flow_problems
from cellbench.profiles.schema import Profile, body_of

Problem = tuple[tuple[str | int, ...], str]
NEEDS = {"temperature": "chamber", "pressure": "press"}


def profile_checks(base_dir: Path) -> Callable[[Profile], list[Problem]]:
    """The checks of a profile file read from base_dir (drive files are relative to it)."""

    def check(profile: Profile) -> list[Problem]:
        problems = flow_problems(profile)
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


def cell_problems(profile: Profile, v_min: float, v_max: float) -> list[Problem]:
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
                problems.append((where, f"{name} {volts:g} V is above the cell's maximum {v_max:g} V"))
            elif volts < v_min - 1e-9:
                problems.append((where, f"{name} {volts:g} V is below the cell's minimum {v_min:g} V"))
    return problems


def instrument_problems(
    profile: Profile, *, has_chamber: bool, has_press: bool, has_potentiostat: bool = True
) -> list[Problem]:
    """What the profile reads or sets that the channel has no instrument for."""
    have = {"temperature": has_chamber, "pressure": has_press}
    problems: list[Problem] = []
    for ins in compile_profile(profile).instrs:
        if ins.op == "step" and ins.node.kind == "eis" and not has_potentiostat:
            problems.append((_path_key(ins.path), "an impedance step needs a potentiostat on the channel"))
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
        for quantity in ("temperature", "pressure"):
            if quantity in asked and not have[quantity]:
                problems.append((_path_key(ins.path), f"needs a {quantity} reading, but the channel has no "
                                                       f"{NEEDS[quantity]}"))
    safety = profile.safety
    for quantity in ("temperature", "pressure"):
        if safety and getattr(safety, quantity) is not None and not have[quantity]:
            problems.append(
                (("safety", quantity), f"a {quantity} safety range needs a {NEEDS[quantity]} on the channel")
            )
    return problems
