"""One channel's link to the broker, the loop all links run on, and a bench's bridge."""


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
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cellbench.bench.ops.mqtt.config import (
    ANSWERS_KEPT,
    CLOSE_WAIT,
    COMMANDS,
    IN_FLIGHT,
    MAX_COMMAND_BYTES,
    MqttConfig,
    T,
)
from cellbench.bench.ops.mqtt.outbox import Outbox
from cellbench.bench.ops.mqtt.payloads import (
    CommandMessage,
    Cycle,
    Event,
    Quantity,
    Reply,
    Status,
    _utc,
)
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

log = logging.getLogger(__name__)

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


