"""The pressure-temperature track that runs alongside a profile's electrical steps, and the wait step.

    conditions:
      - set: {temperature: 60 degC, pressure: 5 MPa}
      - wait stable: {temperature: 0.5 degC, pressure: 0.1 MPa, for: 30 min, timeout: 3 h}
      - hold: 12 h
      - ramp: {temperature: 25 degC, rate: 0.5 degC/min}
    steps:
      - wait: {temperature: 25 degC, pressure: 5 MPa, for: 30 min, timeout: 3 h}
      - discharge: {current: C/10, until: 2.5 V}

Temperatures in a track are the cell's (its thermocouple, T1) where the channel has one, the
chamber air otherwise, unless a `sensor` names which: `cell` (T1, the press platen's thermocouple against the
cell) or `chamber` (the chamber's air); pressures are the stack pressure the press holds. A wait step with
`set: if owner` sets its temperature and pressure first where the channel controls the instrument (it is its
own, or the channel is the owner of a shared one) and only waits for them otherwise: one profile for every
channel of a shared chamber.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from cellbench.profiles.base import Strict
from cellbench.profiles.units import Duration, Pressure, Temperature, to_si


def _delta(unit: str, what: str) -> BeforeValidator:
    """A temperature difference or rate: '0.5 degC' and '1 degC/min' are deltas, not absolute temperatures."""

    def parse(value: Any) -> float:
        text = re.sub(r"\bdegC\b", "delta_degC", value) if isinstance(value, str) else value
        return to_si(text, unit, what)

    return BeforeValidator(parse)


Sensor = Literal["cell", "chamber"]  # which temperature: the cell's T1 (press platen thermocouple) or chamber air
SENSOR_NAMES = {"cell": "cell T1 (press platen)", "chamber": "chamber air"}
TemperatureDelta = Annotated[float, _delta("delta_degC", "a temperature difference (e.g. '0.5 degC')")]
PressureDelta = Annotated[float, BeforeValidator(lambda v: to_si(v, "Pa", "a pressure difference (e.g. '0.1 MPa')"))]


class Setpoints(Strict):
    what: ClassVar[str] = "setpoint"
    temperature: Temperature | None = None
    pressure: Pressure | None = None

    @model_validator(mode="after")
    def _some(self) -> Setpoints:
        if self.temperature is None and self.pressure is None:
            raise PydanticCustomError("condition", "say a temperature, a pressure or both", {})
        return self


class RampTo(Strict):
    """Move one setpoint to a target at a rate."""

    what: ClassVar[str] = "ramp key"
    temperature: Temperature | None = None
    pressure: Pressure | None = None
    rate: str

    @model_validator(mode="after")
    def _one(self) -> RampTo:
        if (self.temperature is None) == (self.pressure is None):
            raise PydanticCustomError("condition", "a ramp moves a temperature or a pressure: say exactly one", {})
        return self

    def rate_per_s(self) -> float:
        """°C/s or Pa/s, parsed by what is ramped."""
        if self.temperature is not None:
            return to_si(re.sub(r"\bdegC\b", "delta_degC", self.rate), "delta_degC/s",
                         "a temperature rate (e.g. '1 degC/min')")
        return to_si(self.rate, "Pa/s", "a pressure rate (e.g. '1 MPa/min')")

    @model_validator(mode="after")
    def _rate(self) -> RampTo:
        if self.rate_per_s() <= 0:
            raise PydanticCustomError("condition", "a ramp rate must be above zero", {})
        return self


class Stable(Strict):
    """Within a tolerance of the setpoints for a while; failing the test after timeout."""

    what: ClassVar[str] = "stability key"
    temperature: TemperatureDelta | None = None
    pressure: PressureDelta | None = None
    duration: Duration = Field(alias="for", ge=0)
    timeout: Duration = Field(gt=0)
    sensor: Sensor | None = None


class SetCondition(Strict):
    what: ClassVar[str] = "condition"
    set: Setpoints


class RampCondition(Strict):
    what: ClassVar[str] = "condition"
    ramp: RampTo


class HoldCondition(Strict):
    what: ClassVar[str] = "condition"
    hold: Duration


class WaitStableCondition(Strict):
    what: ClassVar[str] = "condition"
    wait_stable: Stable = Field(alias="wait stable")


CONDITION_KINDS = ("set", "ramp", "hold", "wait stable")


def _condition(value: Any) -> Any:
    if isinstance(value, dict):
        kinds = [k for k in value if k in CONDITION_KINDS]
        if len(kinds) != 1:
            raise PydanticCustomError(
                "condition", "a condition is one of: {expected} (got {got})",
                {"expected": ", ".join(CONDITION_KINDS), "got": ", ".join(map(str, value)) or "nothing"},
            )
        models: dict[str, type[BaseModel]] = {"set": SetCondition, "ramp": RampCondition, "hold": HoldCondition,
                                              "wait stable": WaitStableCondition}
        model = models[kinds[0]]
        return model.model_validate(value)
    return value


Condition = Annotated[
    SetCondition | RampCondition | HoldCondition | WaitStableCondition, BeforeValidator(_condition)
]


class EndsByItself:
    """A step with no limits, checks or record rule of its own: it ends when its work is done."""

    @property
    def until(self) -> list[Any]:
        return []

    @property
    def check(self) -> list[Any]:
        return []

    @property
    def record(self) -> None:
        return None


class SetBody(EndsByItself, Setpoints):
    """A leaf step: new temperature and pressure setpoints, given in sequence with the electrical steps."""

    what: ClassVar[str] = "setting"
    label: str | None = None
    new_cycle: bool = False
    sample_period: Duration | None = None


class Tolerance(Strict):
    what: ClassVar[str] = "tolerance key"
    temperature: TemperatureDelta | None = None
    pressure: PressureDelta | None = None


class WaitBody(EndsByItself, Strict):
    """A leaf step: the cell at rest until temperature and pressure have been stable at these values."""

    what: ClassVar[str] = "setting"
    label: str | None = None
    temperature: Temperature | None = None
    pressure: Pressure | None = None
    tolerance: Tolerance | None = None
    duration: Duration = Field(default=0.0, alias="for", ge=0)
    timeout: Duration = Field(gt=0)
    sample_period: Duration | None = Field(default=None, gt=0, allow_inf_nan=False)
    new_cycle: bool = False
    sensor: Sensor | None = None
    set: Literal["if owner", "never"] = "never"

    @model_validator(mode="after")
    def _some(self) -> WaitBody:
        if self.temperature is None and self.pressure is None:
            raise PydanticCustomError("condition", "wait for a temperature, a pressure or both", {})
        return self

    def tolerances(self) -> tuple[float, float]:
        """(°C, Pa): the given tolerances, else 0.5 degC and 0.1 MPa."""
        t = self.tolerance or Tolerance()
        return (0.5 if t.temperature is None else t.temperature, 0.1e6 if t.pressure is None else t.pressure)
