"""What a run's engine and its supervisor share of the channel as it stands: the newest reading, whoever took
it, and what the step in hand expects of it. The engine writes it as it goes; the supervisor reads it (and adds
the readings it takes itself), and never looks into the engine."""

from __future__ import annotations

from dataclasses import dataclass

from cellbench.profiles.controls import StepType
from cellbench.roles import Conditions, Reading


@dataclass
class Latest:
    reading: tuple[float, Reading, Conditions] | None = None  # (test time, reading, conditions): the newest
    step_type: StepType | None = None  # the step the channel is in; None between steps
    discharging: float | None = None  # a discharge whose setpoint is in effect: its current's magnitude (A)
