"""An operator's command to one channel of a running controller, as the runner takes it from any face (the
command socket of `bench.control`, MQTT): what to do, to which channel, why and who asks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Command(BaseModel):
    """One command to one channel of a running controller."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["start", "pause", "resume", "stop", "clear_latch"]
    channel: str = Field(min_length=1, max_length=200)
    reason: str = Field("by an operator", max_length=500)
    profile: str | None = Field(default=None, max_length=4096, description="start: the profile file's full path")
    database: str | None = Field(default=None, max_length=4096,
                                 description="resume: a run of an idle channel to continue, its database's full path")
    operator: str | None = Field(default=None, max_length=200, description="who asks (recorded with the reason)")
    allow_density: bool = Field(default=False, description="start: charge denser than the cell's limit (recorded)")
