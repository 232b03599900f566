"""The profile language as pydantic models: what a test profile may say, checked before any instrument moves.

A profile is a list of steps; each step is a one-key mapping naming its kind:

    - rest: 30 min
    - charge: {current: C/20, until: 4.3 V}        # cc with positive (charging) current
    - hold: {voltage: 4.3 V, until: C/50}          # cv
    - discharge: {current: C/10, until: 2.5 V}     # cc with negative current
    - cc: {current: -2 mA, until: [2.5 V, 10 h]}   # any of several limits ends the step
    - repeat: 3
      steps: [...]

Current is positive on charge, as the Battery Data Format counts it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from profiles.units import Current, CurrentSpec, Duration, Voltage, kind_of


class Strict(BaseModel):
    """A model whose unknown keys are errors that name the key and list the known ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    what: ClassVar[str] = "field"

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known and key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown {what} '{key}' (expected one of: {expected})",
                        {"what": cls.what, "key": key, "expected": ", ".join(known)},
                    )
        return data


def _limits_by_kind(allowed: tuple[str, ...]) -> BeforeValidator:
    """Let `until` be one quantity or a list of them; the unit says which limit each is."""

    def normalise(value: Any) -> Any:
        if isinstance(value, dict) or value is None:
            return value
        items = value if isinstance(value, list) else [value]
        out: dict[str, Any] = {}
        for item in items:
            kind = kind_of(item) if isinstance(item, str) else None
            if kind is None:
                raise PydanticCustomError(
                    "limit",
                    "{item!r} is not a limit (expected a quantity with a unit for one of: {allowed})",
                    {"item": item, "allowed": ", ".join(allowed)},
                )
            if kind not in allowed:
                raise PydanticCustomError(
                    "limit",
                    "'{item}' is a {kind} limit, which this step cannot end on (expected one of: {allowed})",
                    {"item": item, "kind": kind, "allowed": ", ".join(allowed)},
                )
            out[kind] = item
        return out

    return BeforeValidator(normalise)


class _Until(Strict):
    what: ClassVar[str] = "limit"

    @model_validator(mode="after")
    def _at_least_one(self) -> _Until:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise PydanticCustomError("limit", "a step needs at least one limit, or it never ends", {})
        return self


class CurrentUntil(_Until):
    voltage: Voltage | None = None
    time: Duration | None = None


class VoltageUntil(_Until):
    current: Current | None = None
    time: Duration | None = None


class CurrentControl(Strict):
    """Constant current until a voltage or a time; the instrument clamps at voltage_limit."""

    what: ClassVar[str] = "setting"
    current: Current
    until: Annotated[CurrentUntil, _limits_by_kind(("voltage", "time"))]
    voltage_limit: Voltage | None = None


class VoltageControl(Strict):
    """Constant voltage until the current falls to a value, or a time; clamped at current_limit."""

    what: ClassVar[str] = "setting"
    voltage: Voltage
    until: Annotated[VoltageUntil, _limits_by_kind(("current", "time"))]
    current_limit: Current | None = None


class CCStep(Strict):
    what: ClassVar[str] = "step"
    cc: CurrentControl

    def current(self) -> CurrentSpec:
        return self.cc.current


class ChargeStep(Strict):
    what: ClassVar[str] = "step"
    charge: CurrentControl

    @property
    def cc(self) -> CurrentControl:
        return self.charge

    def current(self) -> CurrentSpec:
        return abs(self.charge.current)


class DischargeStep(Strict):
    what: ClassVar[str] = "step"
    discharge: CurrentControl

    @property
    def cc(self) -> CurrentControl:
        return self.discharge

    def current(self) -> CurrentSpec:
        return -abs(self.discharge.current)


class CVStep(Strict):
    what: ClassVar[str] = "step"
    cv: VoltageControl


class HoldStep(Strict):
    what: ClassVar[str] = "step"
    hold: VoltageControl

    @property
    def cv(self) -> VoltageControl:
        return self.hold


class RestStep(Strict):
    what: ClassVar[str] = "step"
    rest: Duration


class RepeatStep(Strict):
    what: ClassVar[str] = "key of a repeat"
    repeat: int = Field(ge=1, description="how many times the steps run")
    steps: list[Step] = Field(min_length=1)


STEP_KINDS = ("charge", "discharge", "hold", "rest", "cc", "cv", "repeat")


def step_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return next(k for k in STEP_KINDS if k in type(value).model_fields)
    if isinstance(value, dict):
        return next((k for k in STEP_KINDS if k in value), None)
    return None


def _known_step(value: Any) -> Any:
    if isinstance(value, dict) and step_kind(value) is None:
        keys = ", ".join(f"'{k}'" for k in value) or "nothing"
        raise PydanticCustomError(
            "step",
            "unknown step {keys} (expected one of: {expected})",
            {"keys": keys, "expected": ", ".join(STEP_KINDS)},
        )
    if not isinstance(value, (dict, BaseModel)):
        raise PydanticCustomError(
            "step", "a step is a mapping such as 'rest: 1 h', not {value!r}", {"value": value}
        )
    return value


Step = Annotated[
    Annotated[ChargeStep, Tag("charge")]
    | Annotated[DischargeStep, Tag("discharge")]
    | Annotated[HoldStep, Tag("hold")]
    | Annotated[RestStep, Tag("rest")]
    | Annotated[CCStep, Tag("cc")]
    | Annotated[CVStep, Tag("cv")]
    | Annotated[RepeatStep, Tag("repeat")],
    Discriminator(step_kind),
    BeforeValidator(_known_step),
]


class Profile(Strict):
    """A whole test profile."""

    what: ClassVar[str] = "profile key"
    name: str
    description: str = ""
    cell: str | None = None
    sample_period: Duration = Field(default=1.0, gt=0)
    steps: list[Step] = Field(min_length=1)
    format: Literal[1] = 1

    def executed_step_count(self) -> int:
        """How many steps a run of this profile starts, loops unrolled."""
        return _count(self.steps)


def _count(steps: list[Any]) -> int:
    return sum(s.repeat * _count(s.steps) if isinstance(s, RepeatStep) else 1 for s in steps)


RepeatStep.model_rebuild()
Profile.model_rebuild()
