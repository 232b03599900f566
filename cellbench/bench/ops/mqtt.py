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

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellbench.bench.runtime.commands import Command
from cellbench.bench.runtime.events import (
    CycleCompleted,
    Note,
    NoteKind,
    RunEvent,
    SafetyTripped,
    SampleTaken,
    SpectrumFitted,
    StepEnded,
    StepStarted,
)
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


# --- the outbox -----------------------------------------------------------------------------------------------
class Outbox:
    """Messages not yet acknowledged by the broker, in sequence order, on disk (bounded)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.limit = limit
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                         "payload TEXT NOT NULL, qos INTEGER NOT NULL, telemetry INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS last (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER)")
        # how many wait, kept here: counting the table at every batch cost a full scan of a long outage's outbox
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM last").fetchone()
        return int(row[0]) if row else 0

    def turn(self, rows: list[tuple[int, str, str, int, int]], acked: int, n: int) -> list[tuple[int, str, str, int]]:
        """One pass of the publisher, in one transaction: forget what the broker has taken (sequence numbers up
        to `acked`), add what the run handed on, and return the first `n` messages still to send."""
        with self._db:
            self._db.execute("BEGIN")
            if acked:
                self._count -= self._db.execute("DELETE FROM outbox WHERE seq <= ?", (acked,)).rowcount
            if rows:
                self._add(rows)
            return self._db.execute("SELECT seq, topic, payload, qos FROM outbox ORDER BY seq LIMIT ?",
                                    (n,)).fetchall() if n else []

    def _add(self, rows: list[tuple[int, str, str, int, int]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("INSERT OR REPLACE INTO last VALUES (1, ?)", (rows[-1][0],))
        count = self._count + len(rows)
        if count > self.limit:  # (a replaced row would make that too many: counted exactly then)
            count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        over = count - self.limit
        if over > 0:  # the oldest telemetry goes first: events and the sequence stay
            count -= self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE "
                                      "telemetry = 1 ORDER BY seq LIMIT ?)", (over,)).rowcount
        self._count = count

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()


# --- one channel's link -------------------------------------------------------------------------------------
CommandFn = Callable[[Command], tuple[bool, str]]  # the runner's command handler -> (done, message)
# (channel, variable number, value, reason) -> (done, message), on the control loop
VariableFn = Callable[[str, int, float, str], Coroutine[Any, Any, tuple[bool, str]]]
VARIABLE = re.compile(r"^(?:MV_UD|VAR)?\s*(\d{1,2})$", re.IGNORECASE)


def variable_of(cmd: CommandMessage) -> tuple[int, float] | str:
    """A set_variable command's (number, value), or why it cannot be one."""
    m = VARIABLE.match((cmd.name or "").strip())
    if m is None or not 1 <= int(m.group(1)) <= 16:
        return "name: the cycler variable, 1 to 16 (or MV_UD1, VAR1, ...)"
    try:
        value = float(cmd.value) if cmd.value is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        return "value: a number"
    return int(m.group(1)), value


class MqttLoop:
    """An event loop on a thread of its own, for every channel link of a bench: publishing, the outbox and the
    broker's answers never take the control loop's time."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="cellbench-mqtt", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class ChannelLink:
    """One channel's connection to the broker: its will, its telemetry and events, its commands.

    Made and fed on the control loop; its connection, outbox and commands live on the `MqttLoop`'s thread.
    """

    def __init__(self, cfg: MqttConfig, bench: str, channel: str, run_id: str, cell_id: str | None,
                 outbox: Path, command: CommandFn, mqtt_loop: MqttLoop, variable: VariableFn | None = None) -> None:
        self.cfg, self.channel, self.run_id = cfg, channel, run_id
        self.topic = f"{cfg.prefix}/{bench}/{channel}"
        self._command, self._variable = command, variable
        self._control = asyncio.get_running_loop()
        self._mqtt = mqtt_loop
        self._outbox = Outbox(outbox, cfg.outbox_limit)
        self._seq = self._outbox.last_seq()
        self._pending: collections.deque[tuple[int, str, str, int, int]] = collections.deque()
        self._wake = asyncio.Event()  # set on the MQTT loop only (`_notify` from the control loop)
        self._woken = False
        self._status = Status(state="starting", time=_utc(), bench=bench, channel=channel, run_id=run_id,
                              cell_id=cell_id)
        self._status_sent: str | None = None
        self._cycle: Cycle | None = None  # the last finished cycle, and the one the broker last took
        self._cycle_sent: Cycle | None = None
        self._resistance: float | None = None  # ohm: the run's latest impedance fit, R_ohmic + R_interfacial
        self._last_telemetry = -math.inf
        self._answers: collections.OrderedDict[str, Reply] = collections.OrderedDict()
        self._closing = False
        self._acked = 0  # the last sequence number the broker took that the outbox still holds
        self.connected = False
        # unique on the broker: two labs' benches may share a name, a broker drops the older of two equal IDs
        self._identifier = f"cellbench-{socket.gethostname()}-{os.getpid()}-{bench}-{channel}"
        self._done = mqtt_loop.submit(self._run())
        self._done.add_done_callback(self._stopped)

    def _stopped(self, done: concurrent.futures.Future[None]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.error("%s: MQTT telemetry stopped (the run goes on): %s", self.channel, exc)

    def _notify(self) -> None:
        """Wake the link's task (on the MQTT loop) once, however many messages come before it runs."""
        if not self._woken:
            self._woken = True
            self._mqtt.loop.call_soon_threadsafe(self._wake.set)

    # on the control loop: hand on and return ---------------------------------------------------------------
    def on_event(self, event: RunEvent) -> None:
        """The engine's subscriber: builds the message and wakes the link; never waits."""
        if isinstance(event, SampleTaken):
            s = event.sample
            if 0.0 <= s.unix_time - self._last_telemetry < self.cfg.telemetry_every:
                return  # (a stamp behind the last one, as after a wall-clock step back, is never held back)
            self._last_telemetry = s.unix_time
            values = {"voltage": (s.voltage, "V"), "current": (s.current, "A"), "charge": (s.charge_ah, "Ah"),
                      "discharge": (s.discharge_ah, "Ah"), "charge_energy": (s.charge_wh, "Wh"),
                      "discharge_energy": (s.discharge_wh, "Wh"), "cell_temperature": (s.t1_c, "degC"),
                      "ambient_temperature": (s.ambient_c, "degC"), "pressure": (s.pressure_pa, "Pa"),
                      "displacement": (s.displacement_um, "um")}
            # the `Telemetry` model's JSON, written directly: this runs on the control loop for every sample
            seq = self._next()
            payload = json.dumps({
                "time": _utc(s.unix_time), "seq": seq, "run_id": self.run_id, "test_time": s.test_time,
                "cycle": s.cycle, "step_count": s.step_count, "step": s.step_type,
                "values": {k: {"value": v, "unit": u} for k, (v, u) in values.items() if v is not None}})
            self._pending.append((seq, f"{self.topic}/telemetry", payload, self.cfg.telemetry_qos, 1))
            self._notify()
            return
        if isinstance(event, SpectrumFitted):
            self._resistance = event.r_ohmic + event.r_interfacial
            return
        if isinstance(event, CycleCompleted):
            ce = event.discharge_ah / event.charge_ah if event.charge_ah > 0 and event.whole else None
            self._cycle = Cycle(time=_utc(), run_id=self.run_id, cycle=event.cycle,
                                charge=Quantity(value=event.charge_ah, unit="Ah"),
                                discharge=Quantity(value=event.discharge_ah, unit="Ah"), coulombic_efficiency=ce,
                                retention=event.retention,
                                resistance=None if self._resistance is None else Quantity(value=self._resistance,
                                                                                           unit="ohm"))
            self._notify()
            return
        if isinstance(event, StepStarted):
            self._set_status("running", step=event.step_type, step_count=event.step_count, cycle=event.cycle)
            kind, message, test_time = "step_started", f"step {event.step_count}: {event.step_type}", event.test_time
        elif isinstance(event, StepEnded):
            kind, message, test_time = "step_ended", f"step {event.step_count}: {event.reason}", event.test_time
        elif isinstance(event, SafetyTripped):
            self._set_status("latched", reason=event.reason)
            kind, message, test_time = "safety", event.reason, event.test_time
        elif isinstance(event, Note):
            kind, message, test_time = event.kind.value, event.message, event.test_time
            if event.kind in (NoteKind.PAUSED, NoteKind.LATCH_CLEARED):
                self._set_status("paused", reason=event.message)
            elif event.kind in (NoteKind.RESUMED, NoteKind.START):
                self._set_status("running", reason=None)
        else:
            return
        self._queue("event", Event(time=_utc(), seq=self._next(), run_id=self.run_id, kind=kind, message=message,
                                   test_time=test_time), qos=1, telemetry=False)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _queue(self, suffix: str, msg: BaseModel, *, qos: int, telemetry: bool) -> None:
        self._pending.append((getattr(msg, "seq", 0), f"{self.topic}/{suffix}", msg.model_dump_json(), qos,
                              int(telemetry)))
        self._notify()

    def _set_status(self, state: str, **changes: Any) -> None:
        self._status = self._status.model_copy(update={"state": state, "time": _utc(), **changes})
        self._notify()

    async def close(self, state: str, reason: str | None) -> None:
        """The run has ended: publish its end, drain the outbox (briefly), then say `offline` and disconnect."""
        self._set_status(state, reason=reason)
        self._closing = True
        self._notify()
        done = asyncio.wrap_future(self._done)
        try:
            await asyncio.wait_for(asyncio.shield(done), CLOSE_WAIT)
        except TimeoutError:
            log.warning("%s: MQTT broker unreachable at the end; %d message(s) stay in the outbox",
                        self.channel, len(self._outbox) + len(self._pending))
            self._done.cancel()
            await asyncio.gather(done, return_exceptions=True)
        except (sqlite3.Error, OSError) as exc:  # the link had stopped already (a full disk): the run's end stands
            log.error("%s: MQTT telemetry stopped: %s", self.channel, exc)
        finally:
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._spill()
            self._outbox.close()

    # the link's own task -----------------------------------------------------------------------------------
    async def _spill(self, n: int = 0) -> list[tuple[int, str, str, int]]:
        """Move what the engine handed on into the outbox and forget what the broker took (on a worker thread);
        the first `n` messages still to send."""
        rows = [self._pending.popleft() for _ in range(len(self._pending))]  # what comes meanwhile stays
        if not rows and not self._acked and not n:
            return []
        acked, self._acked = self._acked, 0
        try:
            return await asyncio.to_thread(self._outbox.turn, rows, acked, n)
        except BaseException:
            self._pending.extendleft(reversed(rows))
            self._acked = max(self._acked, acked)
            raise

    async def _run(self) -> None:
        import aiomqtt

        backoff = 1.0
        said_down = False
        while True:
            await self._spill()
            will = aiomqtt.Will(f"{self.topic}/status", self._will().model_dump_json(), qos=1, retain=True)
            try:
                async with aiomqtt.Client(**self.cfg.client_kwargs(), will=will,
                                          identifier=self._identifier) as client:
                    self.connected, backoff = True, 1.0
                    client.pending_calls_threshold = IN_FLIGHT + 10  # ours, by design: no warning for them
                    if said_down:
                        log.info("%s: MQTT broker back; replaying %d message(s)", self.channel, len(self._outbox))
                        said_down = False
                    self._status_sent = self._cycle_sent = None  # say where we stand on every new connection
                    await client.subscribe(f"{self.topic}/cmd/+", qos=1)
                    listener = asyncio.ensure_future(self._listen(client))
                    publisher = asyncio.ensure_future(self._publish(client))
                    try:
                        # a lost connection ends the listener even while nothing is published (a paused channel)
                        await asyncio.wait({listener, publisher}, return_when=asyncio.FIRST_COMPLETED)
                        if not publisher.done():
                            lost = listener.exception() if not listener.cancelled() else None
                            raise lost if isinstance(lost, aiomqtt.MqttError) else aiomqtt.MqttError(
                                f"the broker's connection ended ({lost or 'no reason given'})")
                        publisher.result()
                        await client.publish(f"{self.topic}/status", self._offline().model_dump_json(), qos=1,
                                             retain=True)
                        return
                    finally:
                        for task in (listener, publisher):
                            task.cancel()
                        await asyncio.gather(listener, publisher, return_exceptions=True)
            except aiomqtt.MqttError as exc:
                self.connected = False
                if not said_down:
                    log.warning("%s: MQTT broker %s:%d unreachable (%s); the run goes on, telemetry waits in the "
                                "outbox", self.channel, self.cfg.host, self.cfg.port, exc)
                    said_down = True
            self._sleep_ready()
            try:
                await asyncio.wait_for(self._wake.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, 10.0)

    def _offline(self) -> Status:
        return self._status.model_copy(update={"state": "offline", "time": _utc()})

    def _will(self) -> Status:
        """The `offline` the broker publishes if the bench vanishes: only what stays true whenever that is (which
        run, which cell), not the time, step or cycle of the connection's start, which would be stale by then."""
        return self._status.model_copy(update={
            "state": "offline", "time": None, "step": None, "step_count": None, "cycle": None,
            "reason": "the bench's connection was lost (its last status before this one says where it stood)"})

    async def _publish(self, client: Any) -> None:
        """Status when it changed, then the outbox in order; returns once closing and everything is out."""
        while True:
            status = self._status.model_dump_json(exclude={"time"})
            if status != self._status_sent:
                await client.publish(f"{self.topic}/status", self._status.model_dump_json(), qos=1, retain=True)
                self._status_sent = status
            if self._cycle is not None and self._cycle is not self._cycle_sent:  # retained: the last one stands
                cycle = self._cycle
                await client.publish(f"{self.topic}/cycle", cycle.model_dump_json(), qos=1, retain=True)
                self._cycle_sent = cycle
            rows = await self._spill(500)
            if rows:  # the outbox lets them go at the next pass, once each is out
                await _send(client, rows)
                self._acked = rows[-1][0]
                continue
            if self._closing and not self._pending:
                return
            self._sleep_ready()
            if not self._pending and self._status.model_dump_json(exclude={"time"}) == self._status_sent:
                await self._wake.wait()

    def _sleep_ready(self) -> None:
        """Before waiting: the next message wakes the task again."""
        self._woken = False
        self._wake.clear()

    async def _listen(self, client: Any) -> None:
        async for message in client.messages:
            name = str(message.topic).rsplit("/", 1)[-1]
            reply, to = await self.answer(name, bytes(message.payload or b""))
            await client.publish(to, reply.model_dump_json(), qos=1)

    async def answer(self, name: str, payload: bytes) -> tuple[Reply, str]:
        """The reply to one command message and the topic it goes to; a repeated correlation ID gets the first
        answer again."""
        reply_to = f"{self.topic}/reply"
        if len(payload) > MAX_COMMAND_BYTES:
            return Reply(id="?", command=name, ok=False,
                         message=f"refused: a command is at most {MAX_COMMAND_BYTES} bytes"), reply_to
        try:
            cmd = CommandMessage.model_validate_json(payload)
        except ValidationError as exc:
            try:
                ident = str(json.loads(payload).get("id", ""))[:200] or "?"
            except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested beyond reason
                ident = "?"
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            return Reply(id=ident, command=name, ok=False, message=f"refused: {where}: {first['msg']}"), reply_to
        to = cmd.reply_to or reply_to
        if cmd.id in self._answers:
            return self._answers[cmd.id], to
        reply = Reply(id=cmd.id, command=name, **await self._execute(name, cmd))
        self._answers[cmd.id] = reply
        while len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        log.info("%s: MQTT command %s (%s, operator %s): %s", self.channel, name, cmd.id,
                 cmd.operator or "unnamed", reply.message, extra={"channel": self.channel})
        return reply, to

    async def _execute(self, name: str, cmd: CommandMessage) -> dict[str, Any]:
        if name not in COMMANDS:
            return {"ok": False, "message": f"refused: unknown command '{name}' (expected one of: "
                                            f"{', '.join(COMMANDS)})"}
        if name == "set_variable":
            return await self._set_variable(cmd)

        async def on_control_loop() -> tuple[bool, str]:  # the coordinator is the control loop's
            return self._command(Command(action="stop" if name == "abort" else name,
                                         channel=self.channel, reason=cmd.reason,
                                         operator=cmd.operator or "an MQTT client"))

        return await self._on_control(on_control_loop())

    async def _set_variable(self, cmd: CommandMessage) -> dict[str, Any]:
        got = variable_of(cmd)
        if isinstance(got, str):
            return {"ok": False, "message": f"refused: {got}"}
        if self._variable is None:
            return {"ok": False, "message": "refused: this bench takes no variable changes"}
        return await self._on_control(self._variable(self.channel, *got, cmd.reason))

    async def _on_control(self, job: Coroutine[Any, Any, tuple[bool, str]]) -> dict[str, Any]:
        """Carry a command out on the control loop (the coordinator is its), and say how it went."""
        ok, message = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(job, self._control))
        return {"ok": ok, "message": message if ok else f"refused: {message}"}


async def _send(client: Any, rows: list[tuple[int, str, str, int]]) -> None:
    """Publish outbox rows in order; returns once each is out (QoS 0: written to the socket; QoS 1: acknowledged).

    aiomqtt awaits every publish on its own (an event, a timeout task and a callback per message), which halved
    the telemetry rate against bare paho. A run of QoS 0 rows therefore goes to its paho client in one go and
    only the last is awaited: paho writes its queue in order, so the last out means all are out."""
    import aiomqtt

    paho = getattr(client, "_client", None)  # aiomqtt's paho client; without it, each row is awaited
    k = 0
    while k < len(rows):
        qos, end = rows[k][3], k + 1
        while end < len(rows) and rows[end][3] == qos:
            end += 1
        if qos == 0 and paho is not None:
            for _, topic, payload, _ in rows[k:end - 1]:
                if (rc := paho.publish(topic, payload, 0).rc) != 0:  # not connected any more
                    raise aiomqtt.MqttCodeError(rc, "Could not publish message")
            await client.publish(rows[end - 1][1], rows[end - 1][2], qos=0)
        else:  # many in flight together (the client keeps their order on the wire)
            for j in range(k, end, IN_FLIGHT):
                await asyncio.gather(*(client.publish(topic, payload, qos=q)
                                       for _, topic, payload, q in rows[j:min(j + IN_FLIGHT, end)]))
        k = end


class MqttBridge:
    """The bench's MQTT side: one link per channel run, all on one `MqttLoop`."""

    def __init__(self, cfg: MqttConfig, bench: str, command: CommandFn, variable: VariableFn | None = None) -> None:
        self.cfg, self.bench, self.command, self.variable = cfg, bench, command, variable
        cfg.password()  # a missing password file is said before any run starts
        self._loop: MqttLoop | None = None

    def link(self, channel: str, run_id: str, cell_id: str | None, outbox: Path) -> ChannelLink:
        if self._loop is None:
            self._loop = MqttLoop()
        return ChannelLink(self.cfg, self.bench, channel, run_id, cell_id, outbox, self.command, self._loop,
                           self.variable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None


def from_url(url: str, password_file: Path | None = None, ca_file: Path | None = None) -> MqttConfig:
    """`mqtt://user@host:port/prefix` (or `mqtts://` for TLS, verified against `ca_file` or the system's CAs) as
    broker settings; the password from a file."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker {url!r}: give it as mqtt://[user@]host[:port] (mqtts:// for TLS)")
    if parts.password:
        raise ValueError("broker URL: put the password in a file (--password-file), not on the command line")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker {url!r}: the port is not a number") from None
    tls = parts.scheme == "mqtts"
    if ca_file is not None and not tls:
        raise ValueError(f"broker {url!r}: a CA file is for mqtts:// (TLS)")
    if ca_file is not None and not ca_file.is_file():
        raise ValueError(f"CA file {ca_file}: no such file")
    return MqttConfig(host=parts.hostname, port=port or (8883 if tls else 1883), username=parts.username or None,
                      password_file=password_file, tls=tls, ca_file=ca_file,
                      prefix=parts.path.strip("/") or "cellbench")


async def statuses(cfg: MqttConfig, wait: float = 2.0) -> list[Status]:
    """Every channel's retained status on the broker (all benches under the prefix), read for `wait` seconds."""
    import aiomqtt

    found: dict[str, Status] = {}
    async with aiomqtt.Client(**cfg.client_kwargs(), identifier=None) as client:
        await client.subscribe(f"{cfg.prefix}/+/+/status", qos=1)

        async def read() -> None:
            async for m in client.messages:
                try:
                    found[str(m.topic)] = Status.model_validate_json(bytes(m.payload or b""))
                except ValidationError:
                    continue  # someone else's message under the prefix

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), wait)
    return sorted(found.values(), key=lambda st: (st.bench, st.channel))


async def check(cfg: MqttConfig, bench: str, wait: float = 3.0) -> list[tuple[str, bool, str]]:
    """Whether these credentials can do what a bench does: connect, take commands, publish and be read back."""
    import aiomqtt

    results: list[tuple[str, bool, str]] = []
    probe = f"{cfg.prefix}/{bench}/_check/event"
    try:
        async with aiomqtt.Client(**cfg.client_kwargs(), identifier=None) as client:
            results.append(("connect", True, f"{cfg.host}:{cfg.port} as {cfg.username or 'anonymous'}"))
            for topic in (f"{cfg.prefix}/{bench}/+/cmd/+", probe):
                try:
                    granted = await client.subscribe(topic, qos=1)
                    refused = any(_failed(code) for code in (granted or ()))
                    results.append((f"subscribe {topic}", not refused, "refused by the broker" if refused
                                    else "granted"))
                except aiomqtt.MqttError as exc:
                    results.append((f"subscribe {topic}", False, f"refused by the broker ({exc})"))
            token = f"cellbench check {time.time()}"
            await client.publish(probe, json.dumps({"check": token}), qos=1)

            async def echo() -> bool:
                async for m in client.messages:
                    if str(m.topic) == probe and token in bytes(m.payload or b"").decode(errors="replace"):
                        return True
                return False

            try:
                back = await asyncio.wait_for(echo(), wait)
            except TimeoutError:
                back = False
            results.append((f"publish {probe}", back, "read back" if back else
                            f"not read back within {wait:g} s: the broker's ACL drops this user's publishing there"))
    except aiomqtt.MqttError as exc:
        results.append(("connect", False, f"{cfg.host}:{cfg.port}: {exc}"))
    return results


def _failed(code: object) -> bool:
    """A SUBACK's code for one topic: 0x80 and above refuse it (an int in MQTT 3.1.1, a ReasonCode in 5)."""
    value = getattr(code, "value", code)
    return isinstance(value, int) and value >= 0x80


def schema_doc() -> str:
    """The JSON Schemas of every payload, as docs/mqtt.md lists them."""
    parts = []
    for topic, model in PAYLOADS.items():
        parts.append(f"### `{topic}`: {model.__name__}\n\n```json\n"
                     f"{json.dumps(model.model_json_schema(), indent=2)}\n```\n")
    return "\n".join(parts)
