"""The run's event stream: what the engine publishes, typed, and the bus that hands it to subscribers.

The store writer, the CLI's progress, and later the safety supervisor and MQTT telemetry subscribe.
A subscriber is called on the control loop, so it must only hand the event on (to a queue, a thread,
a display) and return; one that raises stops the run, which is how a wall-time budget ends an estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from cellbench.bench.runtime.runstate import EndKind, RunState


class NoteKind(StrEnum):
    """The kinds of the `events` table."""

    START = "start"
    END = "end"
    FAULT = "fault"
    SAFETY = "safety"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CONDITIONS = "conditions"
    HANDOVER = "handover"
    FIT = "fit"
    RECORDING = "recording"
    INTERRUPTED = "interrupted"
    NOTICE = "notice"
    OUTAGE = "outage"
    RECOVERED = "recovered"
    SHORT = "short"
    RESUMED = "resumed"
    PAUSED = "paused"
    SCHEDULE = "schedule"
    LATCH_CLEARED = "latch cleared"


class Sample(NamedTuple):
    """One recorded row; capacities and energies accumulate within a cycle. A tuple in the store's column
    order, so it is written as it is (no conversion per sample on the control loop)."""

    test_time: float
    unix_time: float
    voltage: float
    current: float
    cycle: int
    step_count: int
    step_index: int
    step_type: str
    charge_ah: float
    discharge_ah: float
    charge_wh: float
    discharge_wh: float
    ambient_c: float | None = None  # chamber air, when the channel has a chamber
    t1_c: float | None = None  # the cell (the press's platen thermocouple), when it has a press
    pressure_pa: float | None = None
    displacement_um: float | None = None


@dataclass(frozen=True, slots=True)
class SampleTaken:
    """A recorded sample; on a real bench with the run state that accounts for it (JSON), so that the two reach
    the disk together."""

    sample: Sample
    state_json: str | None = None


@dataclass(frozen=True, slots=True)
class StepStarted:
    step_count: int
    step_index: int
    step_type: str
    path: str
    cycle: int
    test_time: float


@dataclass(frozen=True, slots=True)
class StepEnded:
    step_count: int
    test_time: float
    reason: str
    kind: EndKind


@dataclass(frozen=True, slots=True)
class Note:
    """Something the record must say: the start, the end, faults, safety trips, hand-overs."""

    kind: NoteKind
    message: str
    test_time: float
    unix_time: float


@dataclass(frozen=True, slots=True)
class SafetyTripped:
    """A reading outside what the cell may see; the run goes to the safe state (also recorded as a Note)."""

    reason: str
    test_time: float


@dataclass(frozen=True, slots=True)
class SpectrumMeasured:
    step_count: int
    test_time: float
    points: list[tuple[float, float, float]]  # (frequency, Z', Z'')


@dataclass(frozen=True, slots=True)
class SpectrumFitted:
    step_count: int
    test_time: float
    circuit: str
    r_ohmic: float
    r_interfacial: float
    parameters: dict[str, float]
    rel_rmse: float


@dataclass(frozen=True, slots=True)
class StateSaved:
    """The run's state at a step boundary or a checkpoint, as the JSON of a `RunState` (immutable, cheap)."""

    test_time: float
    state_json: str

    def state(self) -> RunState:
        from cellbench.bench.runtime.runstate import RunState

        return RunState.model_validate_json(self.state_json)


@dataclass(frozen=True, slots=True)
class CycleCompleted:
    """A cycle ended (the next began): its charge and discharge, and its retention against the reference."""

    cycle: int
    test_time: float
    charge_ah: float
    discharge_ah: float
    charge_wh: float
    discharge_wh: float
    retention: float | None  # discharge over the reference capacity, where there is one
    whole: bool = True  # a whole charge and a whole discharge (policy.WHOLE_ENDS): its efficiency means something


RunEvent = (SampleTaken | StepStarted | StepEnded | Note | SafetyTripped | SpectrumMeasured | SpectrumFitted
            | StateSaved | CycleCompleted)
Subscriber = Callable[[RunEvent], None]


class EventBus:
    """Hands every published event to every subscriber, in the order they subscribed."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: RunEvent) -> None:
        for subscriber in self._subscribers:
            subscriber(event)
