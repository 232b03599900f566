"""The MQTT payloads as pydantic models: what every topic carries (docs/mqtt.md is made from them)."""


from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)



# --- payloads -------------------------------------------------------------------------------------------------
class Status(BaseModel):
    """`status`, retained: where the channel stands."""

    model_config = ConfigDict(extra="forbid")
    state: Literal["starting", "running", "paused", "latched", "completed", "interrupted", "failed", "safety stop",
                   "offline"] = Field(description="latched: a safety stop holds the channel, output off, until an "
                                                  "operator clears the latch (a bench with on_safety_stop: hold)")
    time: str | None = Field(description="UTC, ISO 8601; null in the will, which the broker publishes at a moment "
                                         "the bench cannot know")
    bench: str
    channel: str
    run_id: str | None = None
    cell_id: str | None = None
    step: str | None = Field(default=None, description="the step type, as the Battery Data Format names it")
    step_count: int | None = None
    cycle: int | None = None
    reason: str | None = Field(default=None, description="why the run ended or paused")


class Quantity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float
    unit: str


class Telemetry(BaseModel):
    """`telemetry`: one sample, at most one per `telemetry_every`."""

    model_config = ConfigDict(extra="forbid")
    time: str = Field(description="UTC, ISO 8601, of the reading")
    seq: int = Field(ge=1, description="per channel, shared with `event`, continuous")
    run_id: str
    test_time: float = Field(description="s")
    cycle: int
    step_count: int
    step: str
    values: dict[str, Quantity]


class Cycle(BaseModel):
    """`cycle`, retained: the channel's last finished cycle, so a dashboard needs no analysis of its own."""

    model_config = ConfigDict(extra="forbid")
    time: str = Field(description="UTC, ISO 8601, when the cycle ended")
    run_id: str
    cycle: int
    charge: Quantity = Field(description="Ah charged in the cycle")
    discharge: Quantity = Field(description="Ah discharged in the cycle")
    coulombic_efficiency: float | None = Field(description="discharge over charge (a fraction); null without a "
                                                           "whole charge and discharge (halves ended on time, as "
                                                           "pulses do)")
    retention: float | None = Field(description="discharge over the reference capacity (a fraction)")
    resistance: Quantity | None = Field(description="ohmic plus interfacial resistance of the run's latest "
                                                    "impedance fit, where it has one")


class Event(BaseModel):
    """`event`, QoS 1: a step began or ended, a note of the record (start, end, fault, safety, ...)."""

    model_config = ConfigDict(extra="forbid")
    time: str
    seq: int = Field(ge=1)
    run_id: str
    kind: str = Field(description="step_started, step_ended, safety, or a note's kind (start, end, fault, ...)")
    message: str
    test_time: float


class CommandMessage(BaseModel):
    """What a client publishes to `cmd/<name>`."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200, description="correlation ID: a repeat is answered, not re-run")
    reason: str = Field("by an MQTT client", max_length=500)
    operator: str | None = Field(default=None, max_length=200,
                                 description="who asks, recorded with the reason (as the client says: the broker's "
                                             "ACL decides who may command at all)")
    reply_to: str | None = Field(default=None, max_length=500, pattern=r"^[^#+]+$")
    name: str | None = Field(default=None, max_length=200,
                             description="set_variable: the cycler variable, 1 to 16 (also as MV_UD1 or VAR1)")
    value: float | str | None = Field(default=None, description="set_variable: its value, a number")


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    command: str
    ok: bool
    message: str


PAYLOADS: dict[str, type[BaseModel]] = {"status": Status, "telemetry": Telemetry, "event": Event, "cycle": Cycle,
                                        "cmd/<name>": CommandMessage, "reply": Reply}


def _utc(unix_time: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if unix_time is None else unix_time, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


