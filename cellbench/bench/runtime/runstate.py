"""The run's state, typed and serialisable: everything needed to rebuild a run where it stood.

The engine keeps no other state that outlives a sample: its position in the program, the loop
counters and time budgets, the step and cycle counters with their accumulators, what the instrument
was last told, and the conditions track's setpoints all live here. It is written to the run's
database at every step boundary and at an interval, and read back with `RunState.model_validate_json`.
Times are test times (seconds from the run's start), never clock readings, so a state is valid on
another clock after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, model_validator

from cellbench.profiles.controls import SourceMode, StepType

STATE_VERSION = 1


class EndKind(StrEnum):
    """Why a step ended: the quantity of the limit crossed, or what else ended it."""

    VOLTAGE = "voltage"
    CURRENT = "current"
    TIME = "time"
    STEP_CAPACITY = "step_capacity"
    STEP_ENERGY = "step_energy"
    CYCLE_CAPACITY = "cycle_capacity"
    CYCLE_ENERGY = "cycle_energy"
    DVDT = "dvdt"
    DIDT = "didt"
    TEMPERATURE = "temperature"
    PRESSURE = "pressure"
    BUDGET = "budget"  # a loop's or the profile's time limit ran out
    STABLE = "stable"  # a wait step's conditions held long enough
    SET = "set"  # a set step took its setpoints
    SPECTRUM = "spectrum"  # an EIS step measured its spectrum
    SCHEDULE = "schedule"  # the cycler's own schedule ended


class RunStatus(StrEnum):
    """How a run ended."""

    COMPLETED = "completed"
    FAILED = "failed"  # the profile could not go on as written
    SAFETY_STOP = "safety stop"
    FAULT = "instrument fault"
    RECORDING_FAILED = "recording failed"
    INTERRUPTED = "interrupted"  # a signal (SIGINT, SIGTERM, SIGHUP) or an operator stopped it
    PAUSED = "paused"  # an operator paused it: output off, state saved, its controller may resume it
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Ending:
    """A step's end: its kind, the words recorded for it, and where the program goes next."""

    kind: EndKind
    reason: str
    target: str | int  # "next", "end", "break", a label, or a program counter


class Totals(BaseModel):
    """Charge and energy in and out (all positive)."""

    charge_ah: float = 0.0
    discharge_ah: float = 0.0
    charge_wh: float = 0.0
    discharge_wh: float = 0.0
    # charge the sampling cannot place: the last interval of every step that ended on a limit (it may have
    # overshot by up to that much); a coulombic efficiency within it says nothing
    resolution_ah: float = 0.0
    carried_ah: float = 0.0  # the previous cycle's resolution_ah: where it stopped sets where this one starts

    def add(self, ah: float, wh: float) -> None:
        if ah >= 0:
            self.charge_ah += ah
            self.charge_wh += max(wh, 0.0)
        else:
            self.discharge_ah -= ah
            self.discharge_wh -= min(wh, 0.0)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return self.charge_ah, self.discharge_ah, self.charge_wh, self.discharge_wh


class Budget(BaseModel):
    """A loop's (or the profile's) time budget: when it runs out the running step ends."""

    deadline: float  # test time
    target: int  # program counter to go to
    name: str
    loop_pc: int  # -1 for the profile's own time limit


class Setpoint(BaseModel):
    """What the cycler was last told."""

    mode: SourceMode
    value: float
    compliance: float


class StepProgress(BaseModel):
    """The running step."""

    step_count: int
    pc: int
    step_type: StepType
    start: float  # test time
    totals: Totals = Field(default_factory=Totals)
    stable_since: float | None = None  # a wait step: since when the conditions have been in tolerance


class RunState(BaseModel):
    """Where a run stands. Saved as JSON in the run's database (table `run_state`)."""

    version: int = STATE_VERSION
    test_time: float = 0.0  # when this state was taken
    accounted_until: float = 0.0  # test time up to which the accumulators count (the last sample taken)
    pc: int = 0  # the step running (or next to run)
    counters: dict[int, int] = Field(default_factory=dict)  # loop head pc -> passes completed
    budgets: list[Budget] = Field(default_factory=list)
    step_count: int = 0
    cycle: int = 1
    cycle_has_run: bool = False
    discharged: bool = False  # whether this cycle has had a discharge yet
    whole_charge: bool = False  # this cycle has had a charge ended on a voltage, current, capacity or energy limit
    whole_discharge: bool = False  # ... and a discharge
    high_efficiency: list[float] = Field(default_factory=list)  # CE of the last cycles in a row above the threshold
    cycle_totals: Totals = Field(default_factory=Totals)
    step: StepProgress | None = None
    last_cc_current: float | None = None  # A, for a hold step without its own current limit
    measured_capacity: float | None = None  # Ah, the last discharge to a voltage limit
    reference_capacity: float | None = None  # Ah, the first one
    setpoint: Setpoint | None = None
    temperature: float | None = None  # degC, the track's setpoint
    pressure_pa: float | None = None  # the track's setpoint

    @model_validator(mode="before")
    @classmethod
    def _in_pascal(cls, data: Any) -> Any:
        """A state saved before pressures were kept in Pa says MPa."""
        if isinstance(data, dict) and "pressure_mpa" in data:
            data = dict(data)
            mpa = data.pop("pressure_mpa")
            data.setdefault("pressure_pa", None if mpa is None else mpa * 1e6)
        return data
    finished: bool = False
