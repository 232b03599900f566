"""MQTT telemetry and remote control: a subscriber of each channel's event stream, never in the run's way.

Topics, under `<prefix>/<bench>/<channel>/` (payloads in docs/mqtt.md, whose JSON Schemas come from the models
below):

- `status`: retained `Status`; the connection's will sets it `offline`, a clean stop publishes `offline` itself.
- `telemetry`: `Telemetry` at the configured rate; `event`: `Event` (step changes, notes, faults, safety trips),
  QoS 1. Both carry one per-channel sequence number, continuous over outages and resumes.
- `cmd/<name>` (pause, resume, abort, clear_latch, set_variable): a `CommandMessage` with a correlation ID; the
  answer (`Reply`) goes to its `reply_to` topic or to `reply`. A repeated ID is answered again, not executed twice.

The engine's subscriber only appends to a queue and wakes its link; the links run on an event loop of their own,
on a thread of its own (publishing never takes the control loop's time), move messages into a durable outbox
(SQLite beside the run's database, bounded) and publish them in order from there, deleting what the broker
acknowledged. Commands are carried out on the control loop. When the broker is down the run goes on and the outbox
fills; when it returns, the outbox is replayed by sequence number and the status comes back online. Who may
command what is the broker's decision (its password file and ACL); the bench connects with its own credentials.
"""

from __future__ import annotations

from cellbench.bench.ops.mqtt.config import (
    ANSWERS_KEPT,
    CLOSE_WAIT,
    COMMANDS,
    IN_FLIGHT,
    MAX_COMMAND_BYTES,
    MqttConfig,
)
from cellbench.bench.ops.mqtt.link import (
    VARIABLE,
    ChannelLink,
    CommandFn,
    MqttBridge,
    MqttLoop,
    VariableFn,
    from_url,
    variable_of,
)
from cellbench.bench.ops.mqtt.outbox import Outbox
from cellbench.bench.ops.mqtt.payloads import (
    PAYLOADS,
    CommandMessage,
    Cycle,
    Event,
    Quantity,
    Reply,
    Status,
    Telemetry,
    _utc,
)
from cellbench.bench.ops.mqtt.tools import check, schema_doc, statuses

__all__ = [
    "ANSWERS_KEPT", "CLOSE_WAIT", "COMMANDS", "IN_FLIGHT", "MAX_COMMAND_BYTES", "PAYLOADS", "VARIABLE",
    "ChannelLink", "CommandFn", "CommandMessage", "Cycle", "Event", "MqttBridge", "MqttConfig", "MqttLoop",
    "Outbox", "Quantity", "Reply", "Status", "Telemetry", "VariableFn", "_utc", "check", "from_url", "schema_doc",
    "statuses", "variable_of",
]
