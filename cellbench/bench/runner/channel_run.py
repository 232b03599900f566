"""One channel's run: its database (one writer), its registry entry and log, its events to the store, the log
and MQTT, one engine pass after another while the operator pauses and resumes it, and its end told to whoever
is to be told."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cellbench.bench.ops import latches, runs
from cellbench.bench.ops.locks import RunLock
from cellbench.bench.ops.mqtt import ChannelLink
from cellbench.bench.ops.runlog import RunLog
from cellbench.bench.runner.coordinator import Coordinator
from cellbench.bench.runtime.channel import Channel
from cellbench.bench.runtime.clock import Clock
from cellbench.bench.runtime.engine import Engine, Outcome, Progress, RecordingFailed
from cellbench.bench.runtime.events import EventBus, Note, NoteKind, SampleTaken
from cellbench.bench.runtime.runstate import RunState, RunStatus
from cellbench.bench.runtime.store import RunStore, shared_failure
from cellbench.bench.runtime.supervisor import Supervisor, watch_held
from cellbench.profiles.schema import Profile
from cellbench.roles import Reading

ProgressCallback = Callable[[str, Progress], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelResult:
    channel: str
    database: Path
    outcome: Outcome


@dataclass(frozen=True)
class ProfileFile:
    """A profile as a channel runs it: the model, its text (recorded), where it came from, its folder."""

    profile: Profile
    text: str
    source: str = "<profile>"
    base_dir: Path = Path(".")


@functools.cache
def _openers() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that create run databases (a file, WAL, the tables: fsync-bound, so they overlap well): the default
    pool's few threads made 1,024 channels' first samples wait 2.5 s for their stores."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-opener")


@functools.cache
def cellbench_version() -> str:
    """The installed version (read once a process: the package metadata is parsed on every look, 2 ms, which a
    thousand channels starting at once paid a thousand times)."""
    try:
        return version("cellbench")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class About:
    """What a channel's run says of itself beyond its profile: its bench, operator, the bench's notify command,
    and whom to tell where its database is."""

    bench: str = "bench"
    operator: str | None = None
    notify: list[str] | None = None
    on_start: Callable[[str, Path], None] | None = None


NOTIFY_TIMEOUT = 30.0  # s a notify command may take before it is killed
LATCHED = "latched"  # a channel held after a safety stop (on_safety_stop: hold): `paused` in the registry


async def notify(command: list[str], payload: dict[str, Any]) -> None:
    """Run the bench's notify command with the payload as JSON on its standard input; a failure is logged."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        log.error("the notify command %s could not start: %s", command[0], exc)
        return
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(json.dumps(payload).encode() + b"\n"), NOTIFY_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.error("the notify command %s took more than %.0f s and was stopped", command[0], NOTIFY_TIMEOUT)
        return
    if proc.returncode:
        log.error("the notify command %s failed (exit %s): %s", command[0], proc.returncode,
                  stderr.decode(errors="replace").strip()[-300:])


async def _telemetry(link: ChannelLink, running: list[Engine]) -> None:
    """Telemetry on the bench file's own cadence (`telemetry_every`), from the channel's newest reading (the
    engine's or the supervisor's, at least once a second), recorded or not: a profile that records every few
    minutes is still seen every few seconds. A reading already published is not published again."""
    last: float | None = None
    while True:
        await asyncio.sleep(link.cfg.telemetry_every)
        sample = running[0].live_sample() if running else None
        if sample is not None and sample.test_time != last:
            last = sample.test_time
            link.on_event(SampleTaken(sample, None))


def _mqtt_state(outcome: Outcome | None) -> str:
    """The state a channel's MQTT status ends in."""
    if outcome is None:
        return "failed"
    return {RunStatus.COMPLETED: "completed", RunStatus.SAFETY_STOP: "safety stop",
            RunStatus.INTERRUPTED: "interrupted"}.get(outcome.status, "failed")



@dataclass
class ChannelRun:
    """A run of one channel recorded in `path`. `resume` and `outage` continue a saved run where it stood;
    `notices` are recorded at its start; `why` says who continued it and why; `supervise` puts a safety
    supervisor beside the engine (by default on the real clock only)."""

    channel: Channel
    profile: ProfileFile
    clock: Clock
    path: Path
    coordinator: Coordinator = field(default_factory=Coordinator)
    on_progress: ProgressCallback | None = None
    extra: dict[str, object] = field(default_factory=dict)
    notices: list[str] | None = None
    resume: RunState | None = None
    outage: tuple[float, float] | None = None
    supervise: bool | None = None
    about: About = field(default_factory=lambda: About())
    why: str | None = None

    def __post_init__(self) -> None:
        self._events = EventBus()
        self._running: list[Engine] = []  # the present pass's engine: telemetry, a storage fault, a stop
        self._told: list[asyncio.Future[None]] = []  # notify commands run while the run goes on
        self._last: list[Progress] = []  # the channel's latest progress, told once more with how its run stopped
        self._entry: runs.RunEntry | None = None
        self._outcome: Outcome | None = None  # how the latest pass, or the run, ended: for the MQTT status

    @property
    def name(self) -> str:
        return self.channel.name

    async def run(self) -> ChannelResult:
        """The run, by one writer: on a real bench the run database's lock is taken before anything is written
        (InstrumentBusy, nothing written, when another process records it) and held to the end."""
        if self.clock.virtual:  # a dry run's file is new and its own: never resumed, never shared
            return await self._registered()
        writer = RunLock(self.path)
        writer.acquire("recording the run")
        try:
            return await self._registered()
        finally:
            writer.release()

    async def _registered(self) -> ChannelResult:
        """The run with its registry entry, its log, and the notify command told of a latch and of its end."""
        if self.why is not None:  # continued by an operator's command: who and why, in the run's events
            self.notices = [*(self.notices or []), f"resumed by command: {self.why}"]
        about, channel, path = self.about, self.channel, self.path
        if about.on_start is not None:
            about.on_start(channel.name, path)
        control = self.coordinator.control
        entry = self._entry = runs.begin(
            path, channel=channel.name, cell_id=channel.cell_id or channel.name, bench=about.bench,
            profile=self.profile.profile.name, clock="virtual" if self.clock.virtual else "real",
            operator=about.operator, control=None if control is None else str(control))
        with RunLog(path.with_suffix(".log"), path.stem, channel.name) as run_log:
            log.info("%s %s on channel %s (cell %s), recording to %s", "resuming" if self.resume else "starting",
                     self.profile.profile.name, channel.name, entry.cell_id, path)
            try:
                outcome = await self._recorded(run_log)
            except BaseException as exc:  # the registry must not say `running` for a run that is not
                runs.end(entry, RunStatus.FAILED.value, f"failed: {type(exc).__name__}: {exc}")
                raise
            await self._ended(entry, outcome)
        return ChannelResult(channel.name, path, outcome)

    async def _ended(self, entry: runs.RunEntry, outcome: Outcome) -> None:
        """The registry, the cell's latch after a safety stop, and the notify command told how the run ended."""
        log.info("%s: %s after %.1f s of test time", self.name, outcome.reason, outcome.test_time)
        self.coordinator.ended[self.name] = (self.path.stem, outcome.reason, time.time())
        if self.clock.virtual:
            runs.end(entry, outcome.status.value, outcome.reason)
        else:  # a file written and renamed: off the control loop, where other channels are sampling
            await asyncio.to_thread(runs.end, entry, outcome.status.value, outcome.reason)
            if outcome.status is RunStatus.SAFETY_STOP:  # the cell is not run again until an operator clears it
                await asyncio.to_thread(latches.latch, latches.CellLatch(
                    cell_id=entry.cell_id, reason=outcome.reason, run_id=self.path.stem, database=entry.database,
                    channel=self.name, bench=self.about.bench, since=time.time()))
        await asyncio.gather(*self._told)
        if self.about.notify:
            await notify(self.about.notify, {**entry.model_dump(), "state": outcome.status.value,
                                             "reason": outcome.reason, "test_time": outcome.test_time,
                                             "ended": time.time()})

    def _on_state(self, state: str, reason: str) -> None:
        """Paused, latched (held after a safety stop), or running again: the registry, and the notify command of a
        latch (someone must come and look at the cell: told now, not at the end)."""
        assert self._entry is not None
        entry = self._entry
        runs.save(entry.model_copy(update={"state": runs.PAUSED if state == LATCHED else state, "reason": reason}))
        if state == LATCHED and self.about.notify:
            self._told.append(asyncio.ensure_future(notify(self.about.notify, {
                **entry.model_dump(), "state": state, "reason": reason, "latched": time.time()})))

    def _stop_this(self, why: RecordingFailed) -> None:
        for engine in self._running:
            engine.stop(why)
        if (held := self.coordinator.held.get(self.name)) is not None and not held.done():  # paused: stopped too
            held.set_result(("stop", str(why)))

    def _store_failed(self, loop: asyncio.AbstractEventLoop, exc: BaseException) -> None:
        """The store's writer failed (on its thread): the disk's failure stops every channel on it now rather
        than at its next write; this database's own (locked past the grace, damaged) this channel alone."""
        why = RecordingFailed(f"{self.path.name}: {exc}")
        loop.call_soon_threadsafe(self.coordinator.stop_all if shared_failure(exc) else self._stop_this, why)

    async def _open_store(self) -> RunStore:
        loop = asyncio.get_running_loop()
        failed = functools.partial(self._store_failed, loop)
        if self.clock.virtual:
            store = RunStore(self.path, durable=False, on_failure=failed)
        else:  # its file opened and its tables made off the loop: a thousand channels start without queueing on it
            store = await loop.run_in_executor(_openers(), functools.partial(RunStore, self.path, durable=True,
                                                                             on_failure=failed))
        if self.resume is not None:
            store.set_metadata(last_resumed_unix_time=time.time())
            return store
        channel, cell = self.channel, self.channel.cell
        store.set_metadata(
            cellbench_version=cellbench_version(),
            run_id=self.path.stem,
            channel=channel.name,
            cell_id=channel.cell_id or channel.name,
            cell={**cell.model_dump(mode="json"), "volume_cm3": cell.volume_cm3,
                  "active_mass_g": cell.active_mass_g},
            instruments=channel.identity,
            profile_name=self.profile.profile.name,
            profile_text=self.profile.text,
            clock="virtual" if self.clock.virtual else "real",
            **self.extra,
        )
        return store

    async def _recorded(self, run_log: RunLog) -> Outcome:
        """The run's passes with its events recorded (the store, the log, MQTT), and everything closed after."""
        store = await self._open_store()
        link: ChannelLink | None = None
        ticker: asyncio.Future[None] | None = None
        try:
            self._events.subscribe(store.record)
            self._events.subscribe(run_log.on_event)
            if (mqtt := self.coordinator.mqtt) is not None:
                link = mqtt.link(self.name, self.path.stem, self.channel.cell_id or self.name,
                                 self.path.with_suffix(".outbox.sqlite"))
                self._events.subscribe(link.on_event)
                if not self.clock.virtual:
                    ticker = asyncio.ensure_future(_telemetry(link, self._running))
            return await self._passes()
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            if link is not None:
                ended = self._outcome
                await link.close(_mqtt_state(ended), None if ended is None else ended.reason)
            # the last batch is committed off the control loop on the real clock (other channels keep sampling)
            if self.clock.virtual:
                store.close()
            else:
                await asyncio.to_thread(store.close)

    def _progress(self, p: Progress) -> None:
        self._last[:] = [p]
        assert self.on_progress is not None
        self.on_progress(self.name, p)

    def _stopped(self, how: str) -> None:
        if self.on_progress is not None and self._last:
            self.on_progress(self.name, dataclasses.replace(self._last[0], ended=how))

    @property
    def _watched(self) -> bool:
        return not self.clock.virtual if self.supervise is None else self.supervise

    async def _passes(self) -> Outcome:
        """One engine pass, or one per pause: the operator may pause and resume the channel, and a safety stop
        may hold it latched; the outcome the run ends in."""
        resume, outage, notices = self.resume, self.outage, self.notices
        while True:
            engine = Engine(self.profile.profile, self.channel, self._events, self.clock,
                            on_progress=self._progress if self.on_progress else None,
                            base_dir=self.profile.base_dir, notices=notices)
            outcome = self._outcome = await self._pass(engine, resume, outage)
            latched = (outcome.status is RunStatus.SAFETY_STOP and self.coordinator.hold_on_trip
                       and self.coordinator.stopping is None)
            self._stopped(LATCHED if latched else outcome.status.value)
            if outcome.status is not RunStatus.PAUSED and not latched:
                return outcome
            final = await self._held(outcome, latched)
            if final is not None:
                self._outcome = final
                return final
            resume, outage, notices = engine.state, None, None

    async def _pass(self, engine: Engine, resume: RunState | None, outage: tuple[float, float] | None) -> Outcome:
        """The engine run to its end, a pause or a stop, with the safety supervisor beside it."""
        self._running[:] = [engine]
        self.coordinator.add(engine)
        watcher = (asyncio.ensure_future(Supervisor(engine, self.channel, self.profile.profile, self.clock).run())
                   if self._watched else None)
        try:
            return await engine.run(resume, outage)
        finally:
            self.coordinator.done(engine)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    async def _held(self, outcome: Outcome, latched: bool) -> Outcome | None:
        """A paused or latched channel, watched at open circuit, until the operator resumes it (None) or stops
        it (the outcome its run ends in)."""
        name, coordinator = self.name, self.coordinator
        log.warning("%s: %s", name, outcome.reason + (" (held, latched)" if latched else ""))
        self._on_state(LATCHED if latched else RunStatus.PAUSED.value, outcome.reason)
        if latched:
            coordinator.latched[name] = (outcome.reason, functools.partial(
                _latch_cleared, self._events, outcome, functools.partial(self._on_state, RunStatus.PAUSED.value)))
        held = asyncio.ensure_future(watch_held(
            self.channel, self.profile.profile, self.clock,
            found=functools.partial(_found_held, name, coordinator, self._events, outcome, self._on_state),
            seen=functools.partial(coordinator.saw, name))) if self._watched else None
        try:
            action, why = await coordinator.hold(name)
        finally:
            coordinator.open_circuit.pop(name, None)
            if held is not None:
                held.cancel()
                await asyncio.gather(held, return_exceptions=True)
        # every stop and resume of a held channel is an event with its reason (and who asked)
        self._events.publish(Note(NoteKind.INTERRUPTED if action == "stop" else NoteKind.NOTICE,
                                  why if action == "stop" else f"resume asked: {why}", outcome.test_time, time.time()))
        if (latch := coordinator.latched.pop(name, None)) is not None:  # stopped, latched: it stands
            if outcome.status is RunStatus.PAUSED:  # latched while paused: the run ends in that safety stop
                outcome = Outcome(False, latch[0], outcome.test_time, outcome.steps, outcome.cycles,
                                  RunStatus.SAFETY_STOP)
                self._events.publish(Note(NoteKind.END, outcome.reason, outcome.test_time, time.time()))
            self._stopped(outcome.status.value)
            return outcome
        if action == "stop":
            outcome = Outcome(False, f"interrupted: {why}", outcome.test_time, outcome.steps, outcome.cycles,
                              RunStatus.INTERRUPTED)
            self._stopped(outcome.status.value)
            self._events.publish(Note(NoteKind.END, outcome.reason, outcome.test_time, time.time()))
            return outcome
        log.info("%s: resumed by the operator (%s)", name, why)
        self._on_state(runs.RUNNING, "")
        return None


def _found_held(name: str, coordinator: Coordinator, events: EventBus, held: Outcome,
                on_state: Callable[[str, str], None], why: str, reading: Reading) -> None:
    """The watch of a paused or latched channel found its cell unsafe at open circuit: recorded, and the channel
    latched (a resume is refused until an operator clears the latch)."""
    said = f"safety stop: {why} (while held, reading {reading.voltage:.4f} V at open circuit)"
    log.error("%s: %s", name, said)
    events.publish(Note(NoteKind.SAFETY, said, held.test_time, time.time()))
    if name in coordinator.latched:  # latched already, by the trip that stopped it: the finding is recorded
        return
    tripped = dataclasses.replace(held, reason=said, status=RunStatus.SAFETY_STOP)
    coordinator.latched[name] = (said, functools.partial(_latch_cleared, events, tripped,
                                                         functools.partial(on_state, RunStatus.PAUSED.value)))
    on_state(LATCHED, said)


def _latch_cleared(events: EventBus, tripped: Outcome, on_state: Callable[[str], None], why: str) -> None:
    """An operator has cleared a held channel's safety latch: recorded; it stays paused until resumed."""
    events.publish(Note(NoteKind.LATCH_CLEARED, f"safety latch cleared by the operator ({why}) after the "
                                                f"{tripped.reason}", tripped.test_time, time.time()))
    on_state(f"latch cleared: {why}")
