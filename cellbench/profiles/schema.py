"""The profile language as pydantic models: what a test profile may say, checked before any instrument moves.

A profile is a list of steps; each step is a one-key mapping naming its kind, or a PyBaMM
experiment string:

    - rest: 30 min
    - charge: {current: C/20, until: 4.3 V}            # constant current (positive = charge)
    - hold: {voltage: 4.3 V, until: C/50}              # constant voltage until the current falls
    - cccv: {current: C/3, voltage: 4.3 V, until: C/50}
    - discharge: {power: 2 mW, until: [2.5 V, 10 h]}   # constant power; any limit ends the step
    - discharge: {resistance: 1 kohm, until: 2.5 V}    # constant load resistance
    - ramp: {current: [0 A, 1 mA], over: 10 min}
    - drive: {file: us06.csv, quantity: current}       # a current or power series from a CSV file
    - pulse: {segments: [{current: -1C, for: 10 s}, {current: 0 A, for: 40 s}]}
    - repeat: 3
      steps: [...]
    - Discharge at C/3 until 2.5 V                     # PyBaMM's grammar

Every leaf step takes `label`, `until` (limits, each with an optional `then`: next, end, break
or a label), `sample_period`, `record` and `new_cycle`. Current is positive on charge, as the
Battery Data Format counts it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cellbench.profiles.base import Strict
from cellbench.profiles.conditions import Condition, EndsByItself, Sensor, SetBody, WaitBody
from cellbench.profiles.pybamm import pybamm_step
from cellbench.profiles.units import (
    SI_UNIT,
    Current,
    Displacement,
    Duration,
    Power,
    Pressure,
    Resistance,
    Temperature,
    Voltage,
    c_rate_text,
    compact,
    human_duration,
    kind_of,
    parse_c_rate,
    to_si,
)

# --- limits ------------------------------------------------------------------------------------
LimitKind: TypeAlias = Literal[
    "voltage", "current", "time", "step_capacity", "cycle_capacity", "step_energy", "cycle_energy",
    "dvdt", "didt", "temperature", "pressure",
]
LIMIT_KINDS: tuple[LimitKind, ...] = get_args(LimitKind)
_OP = re.compile(r"^\s*(>=|<=|>|<)?\s*(.*)$")
ACTIONS = ("next", "end", "break")


# The shortest sample period: an instrument answers a reading in about a millisecond; 10 ms is the DCIR
# edge a pulse test needs, and a shorter one only fills the disk (1e-9 s wrote 93,668 samples in 0.09 s).
MIN_SAMPLE_PERIOD = 0.01

class Limit(Strict):
    """One end condition: a quantity crossing a value. `then` says where the profile goes next."""

    what: ClassVar[str] = "limit key"
    kind: LimitKind
    op: Literal[">=", "<="] | None = None  # None: the direction the step is heading
    value: float = 0.0
    c_rate: float | None = None  # a current limit written as a C-rate
    then: str = "next"

    def describe(self) -> str:
        if self.c_rate is not None:
            value = c_rate_text(self.c_rate)
        elif self.kind == "time":
            value = human_duration(self.value)
        elif self.kind == "temperature":
            value = f"{self.value:g} degC"
        else:
            value = compact(self.value, SI_UNIT[self.kind])
        return f"{self.kind} {self.op or 'reaches'} {value}"


def _limit(kind: str, text: Any, then: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if kind not in allowed:
        raise PydanticCustomError(
            "unknown_key", "unknown limit '{key}' (expected one of: {expected})",
            {"key": kind, "expected": ", ".join(allowed)},
        )
    raw, op = text, None
    if isinstance(raw, str):
        m = _OP.match(raw)
        assert m
        op = {">": ">=", "<": "<="}.get(m.group(1) or "", m.group(1) or None)
        raw = m.group(2)
    out: dict[str, Any] = {"kind": kind, "op": op, "then": then}
    if kind == "current" and isinstance(raw, str) and (rate := parse_c_rate(raw)) is not None:
        out["c_rate"] = abs(rate)
        return out
    out["value"] = to_si(raw, SI_UNIT[kind], f"a {kind.replace('_', ' ')} limit")
    return out


def normalise_limits(value: Any, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """`until` as one quantity, a list of them, or mappings {kind: value, then: where}."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, dict):
            then = str(item.get("then", "next"))
            kinds = [k for k in item if k != "then"]
            if not kinds:
                raise PydanticCustomError("limit", "a limit needs a quantity besides 'then'", {})
            pairs = [(k, item[k]) for k in kinds]
        elif isinstance(item, str):
            kind = kind_of(_OP.match(item).group(2))  # type: ignore[union-attr]
            if kind is None:
                raise PydanticCustomError(
                    "limit",
                    "'{item}' is not a limit (expected a quantity with a unit for one of: {allowed})",
                    {"item": item, "allowed": ", ".join(allowed)},
                )
            pairs, then = [(kind, item)], "next"
        else:
            raise PydanticCustomError(
                "limit", "'{item}' is not a limit (write it with a unit, e.g. '4.3 V')", {"item": item}
            )
        for kind, text in pairs:
            if kind in LIMIT_KINDS and kind not in allowed:
                raise PydanticCustomError(
                    "limit",
                    "'{item}' is a {kind} limit, which this step cannot end on (expected one of: {allowed})",
                    {"item": text, "kind": kind, "allowed": ", ".join(allowed)},
                )
            out.append(_limit(kind, text, then, allowed))
    return out


CHECK_KINDS = ("retention", "step_capacity", "cycle_capacity")


class Check(Strict):
    """A condition looked at once, when the step has ended: where the profile goes if it holds.

    `retention` is this step's discharge capacity over the reference (the first discharge that
    ended on its voltage limit), e.g. ``{retention: "< 80 %", then: end}``.
    """

    what: ClassVar[str] = "check key"
    kind: str
    op: Literal[">=", "<="]
    value: float
    then: str

    @model_validator(mode="before")
    @classmethod
    def _from_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "kind" in data:
            return data
        if "then" not in data:
            raise PydanticCustomError("check", "a check needs 'then': where to go when it holds", {})
        kinds = [k for k in data if k != "then"]
        if len(kinds) != 1 or kinds[0] not in CHECK_KINDS:
            raise PydanticCustomError(
                "check", "a check names one of: {expected} (got {got})",
                {"expected": ", ".join(CHECK_KINDS), "got": ", ".join(kinds) or "none"},
            )
        kind, text = kinds[0], data[kinds[0]]
        m = _OP.match(str(text))
        assert m
        op = {">": ">=", "<": "<="}.get(m.group(1) or "", m.group(1))
        if op is None:
            raise PydanticCustomError("check", "say which way the check goes, e.g. '< 80 %'", {})
        unit = "percent" if kind == "retention" else "A*h"
        value = to_si(m.group(2), unit, "a percentage (e.g. '80 %')" if kind == "retention" else "a capacity")
        return {"kind": kind, "op": op, "value": value / 100 if kind == "retention" else value, "then": data["then"]}


class RecordRule(Strict):
    """Record a sample when any of these has changed since the last one recorded."""

    what: ClassVar[str] = "record rule"
    every: Duration | None = None
    voltage: Voltage | None = None
    current: Annotated[float, BeforeValidator(lambda v: to_si(v, "A", "a current change (e.g. '0.1 mA')"))] | None = (
        None
    )


# --- leaf steps ----------------------------------------------------------------------------------
ALL_BUT = {k: tuple(x for x in LIMIT_KINDS if x != k) for k in ("voltage", "current")}


class StepBody(Strict):
    """What every leaf step may say besides its control."""

    what: ClassVar[str] = "setting"
    limit_kinds: ClassVar[tuple[str, ...]] = LIMIT_KINDS
    label: str | None = None
    until: list[Limit] = Field(default_factory=list)
    sample_period: Duration | None = Field(default=None, ge=MIN_SAMPLE_PERIOD, allow_inf_nan=False)
    record: RecordRule | None = None
    new_cycle: bool = False
    check: list[Check] = Field(default_factory=list)

    @field_validator("check", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("until", mode="before")
    @classmethod
    def _normalise_until(cls, value: Any) -> Any:
        return normalise_limits(value, cls.limit_kinds)


class CurrentBody(StepBody):
    """Constant current, power or load resistance (exactly one)."""

    current: Current | None = None
    power: Power | None = None
    resistance: Resistance | None = Field(default=None, gt=0)
    voltage_limit: Voltage | None = None
    reference: bool = Field(default=False, description="a reference capacity (a discharge at the reference rate): "
                                                       "retention and cycle life compare these steps with the "
                                                       "first of them only")

    @model_validator(mode="after")
    def _one_control(self) -> CurrentBody:
        given = [k for k in ("current", "power", "resistance") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "control", "say exactly one of current, power or resistance (got {n})",
                {"n": ", ".join(given) or "none"},
            )
        if not self.until:
            raise PydanticCustomError("limit", "a step needs at least one limit in 'until', or it never ends", {})
        return self


class VoltageBody(StepBody):
    limit_kinds: ClassVar[tuple[str, ...]] = ALL_BUT["voltage"]
    voltage: Voltage
    current_limit: Current | None = None

    @model_validator(mode="after")
    def _ends(self) -> VoltageBody:
        if not self.until:
            raise PydanticCustomError("limit", "a step needs at least one limit in 'until', or it never ends", {})
        return self


class CCCVBody(StepBody):
    """Constant current up to a voltage, then that voltage held; `until` usually ends it on current."""

    current: Current
    voltage: Voltage

    @model_validator(mode="after")
    def _ends(self) -> CCCVBody:
        if not self.until:
            raise PydanticCustomError("limit", "a cccv step needs an end, e.g. until: C/50", {})
        return self


class RestBody(StepBody):
    duration: Duration | None = Field(default=None, alias="for")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"for": data} if isinstance(data, (str, int, float)) else data

    @model_validator(mode="after")
    def _ends(self) -> RestBody:
        if self.duration is None and not self.until:
            raise PydanticCustomError("limit", "a rest needs a duration ('rest: 1 h') or a limit", {})
        return self


class RampBody(StepBody):
    current: tuple[Current, Current] | None = None
    voltage: tuple[Voltage, Voltage] | None = None
    over: Duration = Field(gt=0)
    voltage_limit: Voltage | None = None
    current_limit: Current | None = None

    @model_validator(mode="after")
    def _one(self) -> RampBody:
        if (self.current is None) == (self.voltage is None):
            raise PydanticCustomError("control", "a ramp is of current or of voltage: say exactly one", {})
        return self


class DriveBody(StepBody):
    """A current or power series from a CSV file of time (s) and value (A or W), charge positive."""

    file: str
    quantity: Literal["current", "power"] = "current"
    interpolation: Literal["linear", "step"] = "linear"
    repeat: bool = False
    voltage_limit: Voltage | None = None
    times: tuple[float, ...] = ()  # filled in from the file when the profile is loaded
    values: tuple[float, ...] = ()


class Segment(Strict):
    what: ClassVar[str] = "segment key"
    current: Current | None = None
    power: Power | None = None
    duration: Duration = Field(alias="for", gt=0)

    @model_validator(mode="after")
    def _one(self) -> Segment:
        if (self.current is None) == (self.power is None):
            raise PydanticCustomError("control", "a segment has a current or a power: say exactly one", {})
        return self


class PulseBody(StepBody):
    """Back-to-back segments (HPPC); a sample is taken just before and just after every edge."""

    segments: list[Segment] = Field(min_length=1)
    voltage_limit: Voltage | None = None


class ScheduleBody(StepBody):
    """A schedule (Arbin) or procedure (Maccor) stored on the cycler, run by the cycler itself: cellbench assigns
    and starts it, steers it through the cycler's variables, samples and supervises it, and ends the step when
    the schedule ends (or earlier, on a limit of `until`, by stopping it)."""

    name: str = Field(min_length=1, max_length=200, description="the schedule's or procedure's name on the cycler")
    variables: dict[Annotated[int, Field(ge=1, le=16)], float] = Field(
        default_factory=dict, description="the cycler's variables to set once it runs (Arbin MV_UD1-16, Maccor "
                                          "VarNum 1-15)")


Frequency = Annotated[float, BeforeValidator(lambda v: to_si(v, "Hz", "a frequency (e.g. '100 kHz')"))]


class EisBody(EndsByItself, Strict):
    """Potentiostatic impedance on the channel's potentiostat, the cycler's output off meanwhile."""

    what: ClassVar[str] = "setting"
    label: str | None = None
    start: Frequency = Field(default=1e6, alias="from", gt=0)
    end: Frequency = Field(default=0.1, alias="to", gt=0)
    points_per_decade: int = Field(default=10, ge=1, le=50)
    amplitude: Voltage = Field(default=0.01, gt=0)
    bias: Literal["ocv"] | Voltage = "ocv"
    new_cycle: bool = False
    sample_period: Duration | None = Field(default=None, ge=MIN_SAMPLE_PERIOD, allow_inf_nan=False)

    def n_points(self) -> int:
        import math

        return max(2, round(abs(math.log10(self.start / self.end)) * self.points_per_decade) + 1)


Body: TypeAlias = "StepBody | EisBody | WaitBody | SetBody"  # what follows a leaf step's kind


class LeafStep(Strict):
    """A step as written: the one-key mapping {kind: body}. Each kind is its own class below, declared once."""

    what: ClassVar[str] = "step"
    kind: ClassVar[str]

    @property
    def body(self) -> Body:
        """What follows the step's kind: its body, of the kind's own model."""
        body: Body = getattr(self, self.kind)
        return body


class ChargeStep(LeafStep):
    kind: ClassVar[str] = "charge"
    charge: CurrentBody


class DischargeStep(LeafStep):
    kind: ClassVar[str] = "discharge"
    discharge: CurrentBody


class CCStep(LeafStep):
    kind: ClassVar[str] = "cc"
    cc: CurrentBody


class HoldStep(LeafStep):
    kind: ClassVar[str] = "hold"
    hold: VoltageBody


class CVStep(LeafStep):
    kind: ClassVar[str] = "cv"
    cv: VoltageBody


class CCCVStep(LeafStep):
    kind: ClassVar[str] = "cccv"
    cccv: CCCVBody


class RestStep(LeafStep):
    kind: ClassVar[str] = "rest"
    rest: RestBody


class RampStep(LeafStep):
    kind: ClassVar[str] = "ramp"
    ramp: RampBody


class DriveStep(LeafStep):
    kind: ClassVar[str] = "drive"
    drive: DriveBody


class PulseStep(LeafStep):
    kind: ClassVar[str] = "pulse"
    pulse: PulseBody


class EisStep(LeafStep):
    kind: ClassVar[str] = "eis"
    eis: EisBody


class WaitStep(LeafStep):
    kind: ClassVar[str] = "wait"
    wait: WaitBody


class SetStep(LeafStep):
    kind: ClassVar[str] = "set"
    set: SetBody


class ScheduleStep(LeafStep):
    kind: ClassVar[str] = "schedule"
    schedule: ScheduleBody


class RepeatStep(Strict):
    what: ClassVar[str] = "key of a repeat"
    kind: ClassVar[str] = "repeat"
    repeat: int = Field(ge=1, description="how many times the steps run")
    steps: list[Step] = Field(min_length=1)
    label: str | None = None
    time_limit: Duration | None = Field(default=None, gt=0, description="a time budget for the whole loop")
    then: str = "next"  # where to go when the time budget runs out


LEAF_STEPS: tuple[type[LeafStep], ...] = (
    ChargeStep, DischargeStep, CCStep, HoldStep, CVStep, CCCVStep, RestStep, RampStep, DriveStep, PulseStep,
    WaitStep, SetStep, EisStep, ScheduleStep,
)
STEP_KINDS = (*(c.kind for c in LEAF_STEPS), "repeat")


def body_of(step: BaseModel) -> Any:
    """The body of a leaf step (what follows its kind), untyped: for code that handles every kind alike and reads
    only what it checks for. Typed code asks the step itself (`LeafStep.body`) or narrows by its class."""
    return getattr(step, step.kind)  # type: ignore[attr-defined]


def step_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return str(value.kind)  # type: ignore[attr-defined]
    if isinstance(value, dict):
        return next((k for k in STEP_KINDS if k in value), None)
    return None


def _known_step(value: Any) -> Any:
    if isinstance(value, str):
        return pybamm_step(value)
    if isinstance(value, dict) and step_kind(value) is None:
        keys = ", ".join(f"'{k}'" for k in value) or "nothing"
        raise PydanticCustomError(
            "step",
            "unknown step {keys} (expected one of: {expected})",
            {"keys": keys, "expected": ", ".join(STEP_KINDS)},
        )
    if not isinstance(value, (dict, BaseModel)):
        raise PydanticCustomError(
            "step", "a step is a mapping such as 'rest: 1 h' or a PyBaMM string, not '{value}'", {"value": value}
        )
    return value


Step = Annotated[
    Annotated[ChargeStep, Tag("charge")]
    | Annotated[DischargeStep, Tag("discharge")]
    | Annotated[CCStep, Tag("cc")]
    | Annotated[HoldStep, Tag("hold")]
    | Annotated[CVStep, Tag("cv")]
    | Annotated[CCCVStep, Tag("cccv")]
    | Annotated[RestStep, Tag("rest")]
    | Annotated[RampStep, Tag("ramp")]
    | Annotated[DriveStep, Tag("drive")]
    | Annotated[PulseStep, Tag("pulse")]
    | Annotated[WaitStep, Tag("wait")]
    | Annotated[SetStep, Tag("set")]
    | Annotated[EisStep, Tag("eis")]
    | Annotated[ScheduleStep, Tag("schedule")]
    | Annotated[RepeatStep, Tag("repeat")],
    Discriminator(step_kind),
    BeforeValidator(_known_step),
]


class Range(Strict):
    """Profile-level safety limits: readings outside end the test in the safe state."""

    what: ClassVar[str] = "safety limit"
    voltage: tuple[Voltage, Voltage] | None = None
    current: tuple[Current, Current] | None = None
    temperature: tuple[Temperature, Temperature] | None = None
    temperature_sensor: Sensor | None = None  # which temperature the range is of (default: the cell's, else air)
    pressure: tuple[Pressure, Pressure] | None = None
    displacement: tuple[Displacement, Displacement] | None = None  # um: the stack's swelling under the press


class ShortDetection(Strict):
    """Lithium-metal short detection while a constant current charges the cell.

    A hard short collapses the voltage (a fall of `collapse` or more from one sample to the next); a soft
    short makes it fall while charge keeps flowing (`drop` or more below its highest over `window`).
    Two cycles in a row that gave back more than they took (coulombic efficiency above `efficiency_above`,
    beyond what the sampling can place, after a charge of at least half the capacity, from the second cycle
    on) are a soft short's signature too.
    `action`: stop the test in the safe state; `eis`: put the cell at rest, take an impedance spectrum
    (the channel's potentiostat, default sweep) and stop; flag it as an event and go on; or off.
    """

    what: ClassVar[str] = "short_detection key"
    action: Literal["stop", "eis", "flag", "off"] = "stop"
    window: Duration = Field(default=600.0, gt=0)
    drop: Voltage = Field(default=0.005, gt=0)
    collapse: Voltage = Field(default=0.1, gt=0)
    efficiency_above: float = Field(default=1.01, gt=1.0, description="as a fraction: 1.01 is 101 %")


class Profile(Strict):
    """A whole test profile."""

    what: ClassVar[str] = "profile key"
    _program: Any = PrivateAttr(default=None)  # its compiled program (profiles/program.py), made on first use
    name: str
    description: str = ""
    cell: str | None = None
    sample_period: Duration = Field(default=1.0, ge=MIN_SAMPLE_PERIOD, allow_inf_nan=False)
    record: RecordRule | None = None
    safety: Range | None = None
    short_detection: ShortDetection = Field(default_factory=ShortDetection)
    time_limit: Duration | None = Field(default=None, gt=0)
    c_rate_basis: Literal["nominal", "measured"] = "nominal"
    cycle_counting: Literal["auto", "explicit"] = "auto"
    conditions: list[Condition] = Field(default_factory=list)
    steps: list[Step] = Field(min_length=1)
    format: Literal[1] = 1

    def executed_step_count(self) -> int:
        """How many steps a run of this profile starts, loops unrolled and no limit jumping."""
        return _count(self.steps)


def _count(steps: list[Any]) -> int:
    return sum(s.repeat * _count(s.steps) if isinstance(s, RepeatStep) else 1 for s in steps)


RepeatStep.model_rebuild()
Profile.model_rebuild()
