"""Quantities with units, as people write them in profiles: "4.3 V", "30 min", "350 uA", "C/20".

pint does the unit arithmetic. A C-rate ("C/20", "0.5C", "2 C") is ours: in a battery profile
a number followed by C is a rate against the cell's capacity, never coulombs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, PlainSerializer
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    import pint

# What a quantity may look like before pint sees it: a number, then a unit expression. pint evaluates what
# it is given as arithmetic ("9**9**9 V" would never return, "1/0 min" divides by zero), so anything else
# is refused here, and no quantity is longer than a person writes one.
_QUANTITY = re.compile(
    r"^\s*[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+|inf|nan)(?:[eE][+-]?\d{1,3})?\s*"
    r"(?:[A-Za-zµμΩ°%](?:[A-Za-zµμΩ°%0-9_ ./*^-](?!\*\*\s*-?\d{2}|\^\s*-?\d{2}))*)?\s*$"
)
MAX_QUANTITY = 64


def _quantity(text: str) -> Any:
    """pint's quantity of a string that looks like one, or None."""
    if len(text) > MAX_QUANTITY or not _QUANTITY.match(text):
        return None
    try:
        return registry().Quantity(text.strip())
    except Exception:  # pint's parser raises what its tokenizer and evaluator raise
        return None


_C_RATE = re.compile(r"^\s*([+-])?\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*)?C(?:\s*/\s*(\d+(?:\.\d*)?))?\s*$")


@cache
def registry() -> pint.UnitRegistry[Any]:
    """pint's registry, made (and pint imported, with numpy) on the first quantity read, not at start-up."""
    import pint

    return pint.UnitRegistry(autoconvert_offset_to_baseunit=True)


@dataclass(frozen=True)
class CurrentSpec:
    """A current as written: absolute amps, or a multiple of the cell's capacity per hour."""

    amps: float | None = None
    c_rate: float | None = None

    def resolve(self, capacity_ah: float) -> float:
        """The current in amps for a cell of the given capacity."""
        if self.amps is not None:
            return self.amps
        assert self.c_rate is not None
        return self.c_rate * capacity_ah

    def __neg__(self) -> CurrentSpec:
        return CurrentSpec(
            None if self.amps is None else -self.amps, None if self.c_rate is None else -self.c_rate
        )

    def __abs__(self) -> CurrentSpec:
        return CurrentSpec(
            None if self.amps is None else abs(self.amps), None if self.c_rate is None else abs(self.c_rate)
        )

    def __str__(self) -> str:
        if self.c_rate is not None:
            return c_rate_text(self.c_rate)
        return compact(self.amps, "A")  # type: ignore[arg-type]


def c_rate_text(rate: float) -> str:
    """A C-rate as a lab writes it: "C/3" for a third (not "0.333333C"), "2C", "0.4C", "-C/20"."""
    sign, size = ("-" if rate < 0 else ""), abs(rate)
    if 0 < size < 1 and abs(1 / size - round(1 / size)) < 1e-6:
        return f"{sign}C/{round(1 / size)}"
    return f"{rate:g}C"


def parse_c_rate(text: str) -> float | None:
    """The rate of "C/20", "0.5C", "-2C", or None when the text is not a C-rate."""
    m = _C_RATE.match(text)
    if not m or (m.group(2) is None and m.group(3) is None and text.strip().lstrip("+-").strip() != "C"):
        return None
    sign = -1.0 if m.group(1) == "-" else 1.0
    value = float(m.group(2)) if m.group(2) else 1.0
    if m.group(3):
        if float(m.group(3)) == 0:
            return None  # "C/0" is no rate
        value /= float(m.group(3))
    return sign * value


def to_si(value: Any, unit: str, what: str) -> float:
    """Convert "4.3 V" (or a pint quantity) to a float in ``unit``; raise a message naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PydanticCustomError("quantity", "'{value}' is not {what}", {"value": value, "what": what})
    if isinstance(value, (int, float)):
        raise PydanticCustomError(
            "quantity_unit",
            "{value} has no unit: {what} needs one, e.g. '{example}'",
            {"value": value, "what": what.split(" (")[0], "example": f"{value} {unit}"},
        )
    quantity = _quantity(value)
    try:
        return float(quantity.to(unit).magnitude)
    except Exception:  # None, a dimensionless number, the wrong dimension, or pint failing in its own way
        shown = value if len(value) <= MAX_QUANTITY else value[:MAX_QUANTITY] + "…"
        raise PydanticCustomError("quantity", "'{value}' is not {what}", {"value": shown, "what": what}) from None


# What a quantity is, by its unit: the kinds a step limit can be written in, in checking order.
UNIT_KINDS: tuple[tuple[str, str], ...] = (
    ("voltage", "V"),
    ("time", "s"),
    ("current", "A"),
    ("step_capacity", "A*h"),
    ("step_energy", "W*h"),
    ("dvdt", "V/s"),
    ("didt", "A/s"),
    ("temperature", "degC"),
    ("pressure", "Pa"),
    ("power", "W"),
    ("resistance", "ohm"),
)
SI_UNIT = dict(UNIT_KINDS) | {"cycle_capacity": "A*h", "cycle_energy": "W*h"}


def kind_of(text: str) -> str | None:
    """Which kind of quantity a string is (voltage, time, current, ...), or None."""
    if parse_c_rate(text) is not None:
        return "current"
    quantity = _quantity(text)
    if quantity is None or not hasattr(quantity, "check"):  # no quantity, or a bare number
        return None
    for kind, unit in UNIT_KINDS:
        if quantity.check(registry().parse_units(unit).dimensionality):
            return kind
    return None


def _current(value: Any) -> CurrentSpec:
    if isinstance(value, CurrentSpec):
        return value
    if isinstance(value, str) and (rate := parse_c_rate(value)) is not None:
        return CurrentSpec(c_rate=rate)
    return CurrentSpec(amps=to_si(value, "A", "a current (e.g. '2 mA' or 'C/10')"))


def _si(unit: str, what: str) -> BeforeValidator:
    return BeforeValidator(lambda v: to_si(v, unit, what))


Voltage = Annotated[float, _si("V", "a voltage (e.g. '4.3 V')")]
Power = Annotated[float, _si("W", "a power (e.g. '2 mW')")]
Resistance = Annotated[float, _si("ohm", "a resistance (e.g. '100 ohm')")]
Temperature = Annotated[float, _si("degC", "a temperature (e.g. '25 degC')")]
Pressure = Annotated[float, _si("Pa", "a pressure (e.g. '5 MPa')")]
Duration = Annotated[float, _si("s", "a duration (e.g. '30 min')")]
Displacement = Annotated[float, _si("um", "a displacement (e.g. '50 um')")]
Current = Annotated[CurrentSpec, BeforeValidator(_current), PlainSerializer(str)]


def human_duration(seconds: float) -> str:
    """30 min, 1.5 h, 45 s: the largest unit that keeps the number readable."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and (seconds % size == 0 or seconds >= 10 * size):
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def format_quantity(name: str, value: Any) -> str:
    """A profile value as a person writes it back: durations in h/min, voltages in V, and so on."""
    if isinstance(value, CurrentSpec):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_quantity(name, v) for v in value) + "]"
    if not isinstance(value, float):
        return str(value)
    if name in ("duration", "over", "sample_period", "time", "every", "time_limit"):
        return human_duration(value)
    if name == "temperature":
        return f"{value:g} degC"
    unit = {"voltage": "V", "voltage_limit": "V", "power": "W", "resistance": "ohm", "current": "A",
            "pressure": "Pa"}.get(name)
    return compact(value, unit) if unit else f"{value:g}"


def compact(value: float, unit: str) -> str:
    """350 µA rather than 0.00035 A."""
    if value == 0:
        return f"0 {unit}"
    if unit in ("A*h", "W*h"):  # the lab writes mAh and mWh, not h·mA
        small = abs(value) < 1
        return f"{value * 1e3 if small else value:.4g} {'m' if small else ''}{unit.replace('*', '')}"
    q = registry().Quantity(value, unit).to_compact()
    return f"{q.magnitude:.4g} {q.units:~P}"
