"""MQTT settings of a bench file, and the limits the link keeps to."""


from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field

from cellbench.profiles.base import Strict
from cellbench.profiles.units import Duration

log = logging.getLogger(__name__)



T = TypeVar("T")

COMMANDS = ("pause", "resume", "abort", "clear_latch", "set_variable")
CLOSE_WAIT = 5.0  # s a clean stop waits for the outbox to drain before it leaves the rest for a resume
IN_FLIGHT = 100  # publishes awaited together (aiomqtt counts its pending calls one by one: not thousands)
ANSWERS_KEPT = 1000  # correlation IDs remembered per channel (QoS 1 redelivery is seconds, not hours)
MAX_COMMAND_BYTES = 16_384  # a command is a few fields: anything larger is refused unread


class MqttConfig(Strict):
    """The `mqtt:` section of a bench file; telemetry is off when it is absent."""

    what: ClassVar[str] = "mqtt key"
    host: str = Field(min_length=1, description="the broker's host name or address")
    port: int = Field(1883, ge=1, le=65535, description="the broker's port (8883 is usual with TLS)")
    username: str | None = Field(default=None, description="the bench's user on the broker (its ACL decides what "
                                                           "it may publish and read)")
    password_file: Path | None = Field(default=None, description="a file whose first line is the password "
                                                                 "(never written to a run's record)")
    tls: bool = Field(default=False, description="connect over TLS")
    ca_file: Path | None = Field(default=None, description="the broker's CA certificate (TLS); the system's if absent")
    prefix: str = Field("cellbench", pattern=r"^[^#+/][^#+]*$", description="the first level of every topic")
    telemetry_every: Duration = Field(10.0, ge=0.1, description="how often each channel's newest reading is "
                                                                "published")
    telemetry_qos: Literal[0, 1] = Field(0, description="0: at most once (a message written to the socket as the "
                                                        "broker goes down is lost); 1: at least once, every "
                                                        "message kept in the outbox until the broker has it")
    outbox_limit: int = Field(100_000, ge=100, description="messages kept while the broker is away; the oldest "
                                                           "telemetry goes first, events are kept")
    keepalive: int = Field(30, ge=5, le=3600, description="seconds between MQTT keep-alive pings")

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ValueError(f"mqtt password_file {self.password_file}: {exc}") from None

    def client_kwargs(self) -> dict[str, Any]:
        """What aiomqtt.Client takes for this broker (TLS, credentials, keepalive)."""
        kwargs: dict[str, Any] = {"hostname": self.host, "port": self.port, "username": self.username,
                                  "password": self.password(), "keepalive": self.keepalive, "timeout": 10.0}
        if self.tls:
            kwargs["tls_context"] = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file))
        return kwargs


