"""What the channels of one bench share while they run: stop signals, a storage failure that stops them all, and
the operator's commands to one channel, answered by the channel's state machine (`runner.states`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cellbench.bench.ops import runs
from cellbench.bench.ops.mqtt import MqttBridge
from cellbench.bench.runner.states import IDLE_SAID, Action, ChannelState, Refused, transition
from cellbench.bench.runtime.commands import Command
from cellbench.bench.runtime.engine import Engine, Interrupted, Paused, RecordingFailed
from cellbench.roles import Reading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)



class Coordinator:
    """What the channels of one bench share: stop signals, a storage failure that stops them all, and the
    operator's commands to one channel (pause, resume, stop) that leave the others running."""

    def __init__(self) -> None:
        self.engines: list[Engine] = []  # each running channel's engine
        self.held: dict[str, asyncio.Future[tuple[str, str]]] = {}  # paused channels: ("resume"|"stop", why)
        self.stopping: Interrupted | RecordingFailed | None = None
        self.control: Path | None = None  # the socket this controller takes commands on (`bench.control`)
        self.keep_open = False  # stay when every channel has ended, taking new runs (`start`) until stopped
        # starts (a profile) or continues (a database) a run on an idle channel: (the command, why and who)
        self.starter: Callable[[Command, str], tuple[bool, str]] | None = None
        self.channels: list[str] = []  # the bench's channels
        self.ended: dict[str, tuple[str, str, float]] = {}  # each channel's last run here: (run ID, how, Unix time)
        self.guard: Callable[[Path], None] | None = None  # tells the guardian of a run started later
        self.tasks: list[asyncio.Future[Any]] = []  # every channel's run, started with the bench or later
        self.opened = False  # the instruments are open: a stop ends the runs, not the opening
        self.mqtt: MqttBridge | None = None  # telemetry and remote commands, where the bench file asks for them
        self.hold_on_trip = False  # a safety stop holds the channel, latched, rather than ending its run
        # held channels that a safety stop latched: what tripped, and what clearing the latch does
        self.latched: dict[str, tuple[str, Callable[[str], None]]] = {}
        # held channels' cells as last read at open circuit, and what is wrong with them now (None: nothing)
        self.open_circuit: dict[str, tuple[Reading, str | None]] = {}
        self._changed = asyncio.Event()
        self._main: asyncio.Task[Any] | None = None
        self._signals: list[signal.Signals] = []

    def saw(self, name: str, reading: Reading, why: str | None) -> None:
        """A held channel's cell read at open circuit, and what is wrong with it now."""
        self.open_circuit[name] = (reading, why)

    def stop_all(self, reason: Interrupted | RecordingFailed) -> None:
        if self.stopping is None:
            self.stopping = reason
            log.warning("stopping every channel: %s", reason)
        for engine in self.engines:
            engine.stop(reason)
        for waiting in self.held.values():
            if not waiting.done():
                waiting.set_result(("stop", str(reason)))
        self._changed.set()
        if not self.opened and self._main is not None:
            self._main.cancel()  # still opening instruments: stop that

    def add(self, engine: Engine) -> None:
        self.engines.append(engine)
        if self.stopping is not None:
            engine.stop(self.stopping)

    def done(self, engine: Engine) -> None:
        self.engines.remove(engine)

    async def hold(self, name: str) -> tuple[str, str]:
        """Wait, paused, for the operator's "resume" or "stop" (or every channel's stop), and why."""
        if self.stopping is not None:
            return "stop", str(self.stopping)
        waiting: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self.held[name] = waiting
        try:
            return await waiting
        finally:
            del self.held[name]

    def launch(self, job: Coroutine[Any, Any, Any]) -> None:
        self.tasks.append(asyncio.ensure_future(job))
        self._changed.set()

    async def finish(self) -> list[Any]:
        """Wait for every run, those started later too; with `keep_open`, until a stop as well. Each run's
        result, or its exception."""
        try:
            while True:
                pending = [t for t in self.tasks if not t.done()]
                if not pending and (not self.keep_open or self.stopping is not None):
                    break
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait([*pending, changed], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
        except asyncio.CancelledError:  # cancelled from outside: every run ends (output off) before we go
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            raise
        return list(await asyncio.gather(*self.tasks, return_exceptions=True))

    def state_of(self, name: str) -> ChannelState:
        """Where a channel of this controller stands: running, paused, latched (held after a safety stop) or idle."""
        if name in self.held:
            return ChannelState.LATCHED if name in self.latched else ChannelState.PAUSED
        if any(e.channel.name == name for e in self.engines):
            return ChannelState.RUNNING
        return ChannelState.IDLE

    def command(self, cmd: Command) -> tuple[bool, str]:
        """Start, pause, resume or stop one channel, or clear its safety latch, or continue a run of an idle
        channel (resume with its database): the channel's state machine (`runner.states`) says whether the action
        is taken in the state it is in; returns whether it was done and what to tell the operator."""
        name, state = cmd.channel, self.state_of(cmd.channel)
        reason = cmd.reason if cmd.operator is None else f"{cmd.reason} (operator {cmd.operator})"
        action = Action(cmd.action)
        if action is Action.RESUME and cmd.database is not None:
            action = Action.CONTINUE  # a run named by its database: started again if idle, or resumed if paused
        to = transition(state, action)
        if isinstance(to, Refused):
            return False, self.idle(name) if to is IDLE_SAID else to.said(name, self.latched.get(name, ("",))[0])
        engine = next((e for e in self.engines if e.channel.name == name), None)
        waiting = self.held.get(name)
        if state is ChannelState.IDLE:  # start, or continue: a new run on the channel
            if self.starter is None or self.stopping is not None or (cmd.profile or cmd.database) is None:
                return False, "this controller takes no new runs"
            return self.starter(cmd, reason)
        if action is Action.CLEAR_LATCH:
            if (now := self.open_circuit.get(name)) is not None and now[1] is not None:
                return False, (f"channel '{name}': latch not cleared: the cell reads {now[0].voltage:.4f} V at open "
                               f"circuit: {now[1]}")
            tripped, cleared = self.latched.pop(name)
            cleared(reason)
            return True, f"channel '{name}': latch cleared ({tripped}); it stays paused until resumed"
        if action is Action.PAUSE and engine is not None:
            engine.stop(Paused(reason))
            return True, f"channel '{name}' pauses: output off, state saved"
        if action in (Action.RESUME, Action.CONTINUE) and waiting is not None and not waiting.done():
            waiting.set_result(("resume", reason))
            return True, f"channel '{name}' resumes where it stood"
        if action is not Action.STOP:  # the table and the channel's run disagree for a moment: a race, said plainly
            return False, f"channel '{name}' is changing state; try again"
        if engine is not None:
            engine.stop(Interrupted(reason))
        elif waiting is not None and not waiting.done():
            waiting.set_result(("stop", reason))
        if state is ChannelState.LATCHED:
            return True, f"channel '{name}' stops: its run ends in its {self.latched[name][0]}, still latched"
        return True, f"channel '{name}' stops: output off, recorded interrupted"

    def idle(self, name: str) -> str:
        """What is true of a channel with no live run here: idle, and how and when its last run ended."""
        if self.channels and name not in self.channels:
            return f"this controller has no channel '{name}' (it has {', '.join(self.channels)})"
        if (last := self.ended.get(name)) is not None:
            run_id, how, when = last
            return f"channel '{name}' is idle: its run {run_id} ended: {how} at {runs.utc(when)}"
        return f"channel '{name}' is idle: no run on it since this controller started"

    async def set_variable(self, name: str, number: int, value: float, reason: str) -> tuple[bool, str]:
        """Change a variable of the schedule a channel's cycler runs now; whether it was done and what to say."""
        engine = next((e for e in self.engines if e.channel.name == name), None)
        if engine is None:
            if name in self.held:
                return False, f"channel '{name}' is paused: resume it first"
            return False, f"channel '{name}' is not running on this controller"
        return await engine.set_variable(number, value, reason)

    def catch_signals(self) -> None:
        """SIGINT, SIGTERM and SIGHUP stop every channel in the safe state (main thread only)."""
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        for sig in STOP_SIGNALS:
            try:
                loop.add_signal_handler(sig, self.stop_all, Interrupted(f"{sig.name} received"))
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no such signal here
                continue
            self._signals.append(sig)

    def release_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals = []
