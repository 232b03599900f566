"""PyBaMM experiment strings as profile steps.

"Discharge at C/3 until 2.5 V", "Charge at 1 A for 30 minutes or until 4.2 V",
"Hold at 4.2 V until C/50", "Rest for 1 hour", "Discharge at 2 W for 10 minutes",
each optionally ending in "(1 minute period)". PyBaMM counts discharge current positive; our
profiles (and the Battery Data Format) count charge positive. The sign is settled here, at this
boundary only: a PyBaMM "Discharge at 1 A" becomes our `discharge: {current: 1 A}`, which the
engine runs as -1 A.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic_core import PydanticCustomError

_STEP = re.compile(
    r"""^\s*(?P<verb>discharge|charge|hold|rest)
        (?:\s+at\s+(?P<value>[^()]+?))?
        (?:\s+for\s+(?P<duration>[^()]+?))?
        (?:\s+(?:or\s+)?until\s+(?P<until>[^()]+?))?
        (?:\s*\((?P<period>[^()]+?)\s+period\))?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
EXAMPLE = "'Discharge at C/3 until 2.5 V' or 'Charge at 1 A for 30 minutes or until 4.2 V'"


def _unit_fix(text: str) -> str:
    """PyBaMM's spellings that pint reads differently: Ohm, and a bare C-rate like '1 C'."""
    text = re.sub(r"\b[oO]hms?\b", "ohm", text.strip())
    return re.sub(r"^(\d+(?:\.\d*)?)\s+C$", r"\1C", text)


def _quantity_key(text: str) -> str:
    t = text.strip()
    if re.search(r"(^|[\d\s/])C(/\d+(\.\d*)?)?$", t):
        return "current"
    if t.endswith(("W", "mW", "uW", "kW")):
        return "power"
    if t.lower().endswith(("ohm", "ohms")):
        return "resistance"
    if t.endswith("A"):
        return "current"
    if t.endswith("V"):
        return "voltage"
    return "current"


def pybamm_step(text: str) -> dict[str, Any]:
    """Translate one PyBaMM experiment string into the equivalent profile step mapping."""
    m = _STEP.match(text)
    if not m:
        raise PydanticCustomError(
            "pybamm", "'{text}' is not a PyBaMM experiment step (expected e.g. {example})",
            {"text": text, "example": EXAMPLE},
        )
    verb = m.group("verb").lower()
    until: list[str] = []
    if m.group("duration"):
        until.append(m.group("duration").strip())
    if m.group("until"):
        until.extend(_unit_fix(u) for u in re.split(r"\s+or\s+", m.group("until").strip()))
    body: dict[str, Any] = {}
    if m.group("period"):
        body["sample_period"] = m.group("period").strip()
    if verb == "rest":
        if m.group("value"):
            raise PydanticCustomError("pybamm", "'{text}': a rest has no 'at' value", {"text": text})
        if not until:
            raise PydanticCustomError("pybamm", "'{text}' never ends: add 'for ...' or 'until ...'", {"text": text})
        return {"rest": {"for": until[0], **({"until": until[1:]} if until[1:] else {}), **body}}
    value = m.group("value")
    if value is None:
        raise PydanticCustomError("pybamm", "'{text}': say what to {verb} at, e.g. {example}",
                                  {"text": text, "verb": verb, "example": EXAMPLE})
    value = _unit_fix(value)
    if not until:
        raise PydanticCustomError("pybamm", "'{text}' never ends: add 'for ...' or 'until ...'", {"text": text})
    if verb == "hold":
        return {"hold": {"voltage": value, "until": until, **body}}
    key = _quantity_key(value)
    if key == "voltage":  # "Charge at 4.2 V" is PyBaMM for a voltage hold
        return {"hold": {"voltage": value, "until": until, **body}}
    return {verb: {key: value, "until": until, **body}}
