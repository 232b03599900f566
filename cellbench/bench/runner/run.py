"""Run orchestration: a profile on every channel of a bench, each channel recorded in its own run file."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cellbench.bench.ops import control, guardian, latches, runs
from cellbench.bench.ops.locks import InstrumentBusy, RunLock
from cellbench.bench.ops.mqtt import ChannelLink, MqttBridge
from cellbench.bench.ops.runlog import RunLog
from cellbench.bench.runner.config import BenchConfig
from cellbench.bench.runner.instruments import Instruments
from cellbench.bench.runner.states import IDLE_SAID, Action, ChannelState, Refused, transition
from cellbench.bench.runtime.channel import Channel
from cellbench.bench.runtime.clock import Clock
from cellbench.bench.runtime.commands import Command
from cellbench.bench.runtime.engine import Engine, Interrupted, Outcome, Paused, Progress, RecordingFailed
from cellbench.bench.runtime.events import EventBus, Note, NoteKind, SampleTaken
from cellbench.bench.runtime.runstate import RunState, RunStatus
from cellbench.bench.runtime.store import RunStore, shared_failure
from cellbench.bench.runtime.supervisor import Supervisor, watch_held
from cellbench.drivers.registry import driver
from cellbench.profiles.checks import (
    Problem,
    cell_problems,
    density_problems,
    instrument_problems,
    pressure_settings,
    range_problems,
    settings,
)
from cellbench.profiles.parse import InputError, locate, parse_profile, read_text
from cellbench.profiles.schema import Profile
from cellbench.roles import Reading

ProgressCallback = Callable[[str, Progress], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelResult:
    channel: str
    database: Path
    outcome: Outcome


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


def channel_range_problems(bench: BenchConfig, channel: str, profile: Profile) -> list[Problem]:
    """Currents the profile asks of the channel's cell beyond what its cycler can source."""
    ch = bench.channels[channel]
    spec = driver(bench.instruments[ch.cycler].driver)
    if spec.max_current is None:
        return []
    return range_problems(profile, bench.cells[ch.cell].capacity, spec.max_current, f"{spec.name} '{ch.cycler}'")


def channel_problems(bench: BenchConfig, channel: str, profile: Profile) -> list[Problem]:
    """What the profile asks of the channel that its instruments cannot do (besides the cell's window)."""
    ch = bench.channels[channel]
    spec = driver(bench.instruments[ch.cycler].driver)
    found = instrument_problems(profile, has_chamber=ch.chamber is not None, has_press=ch.press is not None,
                                has_potentiostat=ch.potentiostat is not None, runs_schedules=spec.runs_schedules,
                                host_driven=spec.host_driven, cycler=f"{spec.name} '{ch.cycler}'")
    found += channel_range_problems(bench, channel, profile)
    if ch.press is not None and not driver(bench.instruments[ch.press].driver).sets_pressure:
        found += pressure_settings(profile)
    for quantity, ref in (("temperature", ch.chamber), ("pressure", ch.press)):
        if ref is None or len(users := bench.sharing(ref)) < 2 or bench.instruments[ref].owner == channel:
            continue
        owner = bench.instruments[ref].owner
        found += settings(profile, quantity, f"'{ref}' is shared by {', '.join(users)} and "
                          + (f"set by its owner, channel '{owner}'" if owner else
                             "names no owner: give it 'owner: CHANNEL' in the bench file, the channel whose profile "
                             "sets it"))
    return found


def run_ids(bench: BenchConfig, started: float | None = None) -> dict[str, str]:
    """Each channel's run ID: the start in UTC (ISO 8601 basic, with the zone) and the cell's ID, with the
    channel's name too where two channels of the bench carry cells of one ID. It names the run's files."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    ids = {name: bench.cell_id(name) for name in bench.channels}
    out = {}
    for name, cell in ids.items():
        label = re.sub(r"[^A-Za-z0-9._+-]+", "-", cell).strip("-.")[:60] or "cell"
        shared = list(ids.values()).count(cell) > 1
        out[name] = f"{stamp}-{label}-{re.sub(r'[^A-Za-z0-9._+-]+', '-', name)[:40]}" if shared else f"{stamp}-{label}"
    return out


def reserve(runs_dir: Path, stem: str) -> Path:
    """Create the run's database file exclusively: two runs never share a file, even started in the same second."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = runs_dir / (f"{stem}.sqlite" if n == 1 else f"{stem}-{n}.sqlite")
        try:
            with path.open("xb"):
                return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{runs_dir}: no free name for run {stem}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_code(results: list[ChannelResult]) -> int:
    """0 when every channel completed; 128 + the signal's number when a signal stopped the run; 1 otherwise."""
    for r in results:
        if r.outcome.status is RunStatus.INTERRUPTED:
            for sig in STOP_SIGNALS:
                if sig.name in r.outcome.reason:
                    return 128 + int(sig)
    return 0 if all(r.outcome.completed for r in results) else 1


class _Coordinator:
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


@dataclass(frozen=True)
class ProfileFile:
    """A profile as a channel runs it: the model, its text (recorded), where it came from, its folder."""

    profile: Profile
    text: str
    source: str = "<profile>"
    base_dir: Path = Path(".")


async def run_bench(
    bench: BenchConfig,
    profile: Profile | None,
    profile_text: str,
    clock: Clock,
    *,
    runs_dir: Path = Path("runs"),
    on_progress: ProgressCallback | None = None,
    extra_metadata: dict[str, object] | None = None,
    profile_source: str = "<profile>",
    base_dir: Path = Path("."),
    handle_signals: bool = True,
    supervise: bool | None = None,
    on_start: Callable[[str, Path], None] | None = None,
    channel_profiles: dict[str, ProfileFile] | None = None,
    keep_open: bool = False,
    allow_density: bool = False,
) -> list[ChannelResult]:
    """Run a profile on every channel of the bench at once (or each channel its own, `channel_profiles`); one
    database per channel. With `keep_open` the controller stays when its runs have ended, until a signal, and
    takes new runs on its idle channels (`cellbench start`); channels with no profile start idle.

    Raises InputError, before any instrument is touched, when a profile asks a cell for
    voltages outside its window. With `handle_signals` (on the main thread), SIGINT, SIGTERM and
    SIGHUP end every channel in the safe state, recorded `interrupted`. One channel's failure never
    stops another, but a storage failure stops them all (they share the disk). Each channel has a safety
    supervisor beside its engine (`supervise`; by default on the real clock only: on the virtual clock it
    would read the instruments once a simulated second).
    """
    shared = ProfileFile(profile, profile_text, profile_source, base_dir) if profile is not None else None
    runs_of = {name: (channel_profiles or {}).get(name) or shared for name in bench.channels}
    if (missing := [name for name, pf in runs_of.items() if pf is None]) and not keep_open:
        raise InputError([f"channel '{name}' has no profile: name one for it in the bench file, or give one "
                          "for every channel" for name in missing])
    problems: dict[int, tuple[ProfileFile, list[tuple[tuple[str | int, ...], str]]]] = {}
    for name, pf in runs_of.items():
        if pf is not None and (said := profile_problems(bench, name, pf.profile, allow_density=allow_density)):
            problems.setdefault(id(pf), (pf, []))[1].extend(said)
    if problems:
        raise InputError([line for pf, said in problems.values() for line in locate(pf.text, pf.source, said)])
    if not clock.virtual:  # a cell a safety stop ended stays stopped, whoever runs it next, until cleared
        latches.refuse_latched([bench.cell_id(name) for name, pf in runs_of.items() if pf is not None])
    common = {"operator": bench.operator, "comment": bench.comment, **(extra_metadata or {})}

    def job(instruments: Instruments, coordinator: _Coordinator, name: str, pf: ProfileFile, path: Path,
            allowed: bool = allow_density) -> Any:
        own = bench.only(name)  # each run records its own slice of the bench, not every channel's
        extra = {"bench": own.model_dump(mode="json"), "bench_as_written": own.as_written(), **common,
                 "profile_source": pf.source, "total_steps": pf.profile.executed_step_count(),
                 "base_dir": str(Path.cwd() / pf.base_dir)}  # base_dir: for a resume
        notices = instruments.notices_for(name)
        if allowed and (dense := _density_said(bench, name, pf.profile)):
            extra["current_density_allowed"] = True
            notices = [*notices, f"allowed by the operator (--allow-current-density): {dense}"]
        return _run_channel(instruments.channel(name), pf.profile, pf.text, clock, path, on_progress, extra,
                            pf.base_dir, coordinator, notices, supervise=supervise,
                            about=About(bench.name, _text(common.get("operator")), bench.notify, on_start))

    def start(instruments: Instruments, coordinator: _Coordinator, cmd: Command, why: str) -> tuple[bool, str]:
        """A new run on an idle channel of the running bench (the operator's `cellbench start`), or one of its
        runs continued where it stood (`cellbench resume RUN`)."""
        name, source, database = cmd.channel, cmd.profile, cmd.database
        if name not in bench.channels:
            return False, f"the bench has no channel '{name}' (it has {', '.join(bench.channels)})"
        if database is not None:
            return go_on(instruments, coordinator, name, Path(database), why)
        assert source is not None
        where = Path(source)
        try:
            pf = ProfileFile(parse_profile(read_text(where, "profile"), where.name, where.parent),
                             read_text(where, "profile"), where.name, where.parent)
            if said := profile_problems(bench, name, pf.profile, allow_density=cmd.allow_density):
                raise InputError(locate(pf.text, pf.source, said))
            if not clock.virtual:
                latches.refuse_latched([bench.cell_id(name)])
        except InputError as exc:
            return False, _said(exc)
        try:
            path = reserve(runs_dir, run_ids(bench)[name])
        except OSError as exc:  # a full disk, a folder that cannot be written: said to the operator, nothing runs
            return False, f"no run file could be made in {runs_dir}: {exc}"
        if coordinator.guard is not None:
            coordinator.guard(path)
        coordinator.launch(job(instruments, coordinator, name, pf, path, cmd.allow_density))
        return True, f"channel '{name}' starts '{pf.profile.name}', recording to {path}"

    def go_on(instruments: Instruments, coordinator: _Coordinator, name: str, database: Path,
              why: str) -> tuple[bool, str]:
        """Continue a run of this bench's idle channel in its own database, where it stood."""
        try:
            ready = prepare_resume(database)
            recorded = ready.meta.get("bench")
            on = str(recorded.get("name", bench.name)) if isinstance(recorded, dict) else bench.name
            if on != bench.name or ready.channel != name:
                raise InputError([f"{database.name} is a run of channel '{ready.channel}' on bench '{on}', not of "
                                  f"channel '{name}' of bench '{bench.name}'"])
            allowed = bool(ready.meta.get("current_density_allowed"))  # as when the run was started
            if said := profile_problems(bench, name, ready.profile, allow_density=allowed):
                raise InputError(locate(ready.text, ready.source, said))
            if not clock.virtual:
                RunLock(database).check()
                latches.refuse_latched([bench.cell_id(name)])
        except InputError as exc:
            return False, _said(exc)
        except InstrumentBusy as exc:
            return False, str(exc)
        if coordinator.guard is not None:
            coordinator.guard(database)
        about = About(bench.name, _text(ready.meta.get("operator")), bench.notify, on_start)
        coordinator.launch(_run_channel(instruments.channel(name), ready.profile, ready.text, clock, database,
                                        on_progress, {}, ready.base, coordinator, instruments.notices_for(name),
                                        resume=ready.state, outage=ready.outage, supervise=supervise, about=about,
                                        why=why))
        return True, f"channel '{name}' resumes run {database.stem} where it stood"

    def jobs(instruments: Instruments, coordinator: _Coordinator, paths: dict[str, Path]) -> list[Any]:
        coordinator.keep_open = keep_open
        coordinator.starter = functools.partial(start, instruments, coordinator)
        return [job(instruments, coordinator, name, pf, paths[name]) for name, pf in runs_of.items()
                if pf is not None]

    rids = run_ids(bench)
    return await _on_bench(bench, clock, lambda: {n: reserve(runs_dir, rids[n]) for n, pf in runs_of.items()
                                                  if pf is not None}, jobs, handle_signals)


def _density_said(bench: BenchConfig, channel: str, profile: Profile) -> str:
    """What the density check would refuse of the profile on the channel ('' when nothing), one line."""
    cell = bench.cells[bench.channels[channel].cell]
    limit = cell.charge_density_limit
    found = [] if limit is None else density_problems(profile, cell.capacity, cell.area, limit,
                                                      bench.channels[channel].cell)
    return "; ".join(message.split(": plating")[0] for _, message in found[:3])


def profile_problems(bench: BenchConfig, channel: str, profile: Profile, *, allow_density: bool = False,
                     tagged: bool = True) -> list[tuple[tuple[str | int, ...], str]]:
    """Everything that stops the profile from running on the channel: the cell's window and its charging
    current density (unless `allow_density`), its instruments; each message ends with the cell or channel it
    concerns (unless not `tagged`: the caller says where)."""
    ch = bench.channels[channel]
    cell = bench.cells[ch.cell]
    cell_tag, channel_tag = (f" (cell '{ch.cell}')", f" (channel '{channel}')") if tagged else ("", "")
    said = [(path, message + cell_tag) for path, message in cell_problems(profile, cell.voltage_min,
                                                                         cell.voltage_max)]
    if not allow_density and (limit := cell.charge_density_limit) is not None:
        said += density_problems(profile, cell.capacity, cell.area, limit, ch.cell)
    return said + [(path, message + channel_tag) for path, message in channel_problems(bench, channel, profile)]


async def _on_bench(
    bench: BenchConfig,
    clock: Clock,
    paths: Callable[[], dict[str, Path]],
    jobs: Callable[[Instruments, _Coordinator, dict[str, Path]], list[Any]],
    handle_signals: bool,
) -> list[ChannelResult]:
    """Open the bench's instruments (owning them), start a guardian on a real bench, run every channel's job
    to its end with signals handled, and close everything; the first error of a channel is raised after."""
    coordinator = _Coordinator()
    coordinator.channels = list(bench.channels)
    coordinator.hold_on_trip = bench.on_safety_stop == "hold" and not clock.virtual
    if handle_signals:
        coordinator.catch_signals()
    if bench.mqtt is not None and not clock.virtual:
        try:
            coordinator.mqtt = MqttBridge(bench.mqtt, bench.name, coordinator.command,
                                          coordinator.set_variable)
        except ValueError as exc:  # the password file cannot be read: said before anything is touched
            coordinator.release_signals()
            raise InputError([f"bench '{bench.name}': {exc}"]) from None
    try:
        # the operator's commands to one channel, from another terminal: the controller of a real bench only
        commands = (control.serving(coordinator.command, bench.name, list(bench.channels))
                    if handle_signals and not clock.virtual else _no_commands())
        async with commands as coordinator.control, Instruments(bench) as instruments:
            where = paths()
            # on a real bench a guardian process turns the outputs off if this process dies a hard death
            watchdog = None if clock.virtual else await asyncio.to_thread(
                guardian.spawn, instruments.cyclers(), list(where.values()), bench.notify)
            beating: asyncio.Future[None] | None = None
            if watchdog is not None:
                guarded = list(where.values())  # every database the guardian records in, later runs' too
                keeper = [watchdog]

                def guard(path: Path) -> None:
                    guarded.append(path)
                    guardian.watch_also(keeper[0], path)

                def respawn() -> Any:
                    keeper[0] = guardian.spawn(instruments.cyclers(), guarded, bench.notify)
                    return keeper[0]

                coordinator.guard = guard
                beating = asyncio.ensure_future(_beat(keeper, respawn))
            coordinator.opened = True
            try:
                # every channel runs to its own end (and any run started later) before the connections close
                for one in jobs(instruments, coordinator, where):
                    coordinator.launch(one)
                results = await coordinator.finish()
            finally:
                if beating is not None:
                    beating.cancel()
                    await asyncio.gather(beating, return_exceptions=True)
                    watchdog = keeper[0]
                if watchdog is not None:
                    await asyncio.to_thread(guardian.dismiss, watchdog)
    finally:
        coordinator.release_signals()
        if coordinator.mqtt is not None:
            coordinator.mqtt.close()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, ChannelResult)]


async def _beat(keeper: list[Any], respawn: Callable[[], Any]) -> None:
    """From the control loop itself, at guardian.BEAT_EVERY: the loop is working. A controller stopped (SIGSTOP)
    or hung stops beating, and its guardian stops it and turns the outputs off. A guardian found dead (killed,
    crashed) is replaced at once: the outputs are never left without one."""
    while True:
        if keeper[0].poll() is not None:
            log.error("the guardian (pid %d) is gone (exit %s); a new one takes over", keeper[0].pid,
                      keeper[0].returncode)
            new = await asyncio.to_thread(respawn)
            log.warning("a new guardian (pid %d) watches the outputs", new.pid)
        guardian.beat(keeper[0])
        await asyncio.sleep(guardian.BEAT_EVERY)


@contextlib.asynccontextmanager
async def _no_commands() -> AsyncIterator[None]:
    yield None


async def resume_run(
    database: Path,
    clock: Clock,
    *,
    bench: BenchConfig | None = None,
    on_progress: ProgressCallback | None = None,
    handle_signals: bool = True,
    clear_latch: bool = False,
    on_start: Callable[[str, Path], None] | None = None,
) -> ChannelResult:
    """Continue a run in its own database from its saved state, on its bench (or `bench`, if the instruments moved).

    Raises InputError when there is nothing to resume: no saved state, a run that ended by reaching the
    end of its profile, or a dry run (its simulated instruments lived and died with its process).
    """
    ready = prepare_resume(database, clear_latch=clear_latch)
    meta = ready.meta
    if bench is None and "bench_as_written" not in meta:
        raise InputError([f"{database}: the run does not record its bench; name it with --bench"])
    try:
        whole = bench or BenchConfig.model_validate(meta["bench_as_written"])
    except ValueError as exc:
        raise InputError([f"{database}: the bench it recorded cannot be read ({str(exc).splitlines()[0]}); "
                          "name one with --bench"]) from None
    name = ready.channel
    if name not in whole.channels:
        raise InputError([f"{database}: the bench has no channel '{name}' (it has {', '.join(whole.channels)})"])
    one = whole.only(name)  # with its notify command, broker and safety-stop rule
    if not clock.virtual:
        RunLock(database).check()  # another process records the run: refused before an instrument is touched
    if not clock.virtual:
        if clear_latch:
            latches.clear(whole.cell_id(name), "resume --clear-latch: the cell checked")
        else:
            latches.refuse_latched([whole.cell_id(name)])

    def job(instruments: Instruments, coordinator: _Coordinator, paths: dict[str, Path]) -> list[Any]:
        return [_run_channel(instruments.channel(name), ready.profile, ready.text, clock, database,
                             on_progress, {}, ready.base, coordinator, instruments.notices_for(name),
                             resume=ready.state, outage=ready.outage,
                             about=About(whole.name, _text(meta.get("operator")), whole.notify, on_start))]

    (result,) = await _on_bench(one, clock, lambda: {name: database}, job, handle_signals)
    return result


@dataclass(frozen=True)
class ResumeReady:
    """A run read back for continuing: its metadata, profile (text, source, folder), state and outage."""

    meta: dict[str, Any]
    channel: str
    profile: Profile
    text: str
    source: str
    base: Path
    state: RunState
    outage: tuple[float, float]  # Unix times: the last thing recorded, and now


def prepare_resume(database: Path, *, clear_latch: bool = False) -> ResumeReady:
    """Everything a resume needs from a run's database; InputError when there is nothing to resume."""
    meta, state, last_unix = read_for_resume(database, clear_latch=clear_latch)
    if meta.get("clock") == "virtual":
        raise InputError([f"{database}: a dry run on the simulated bench cannot be resumed; run it again"])
    base = Path(str(meta.get("base_dir", ".")))
    source = str(meta.get("profile_source", "<profile>"))
    profile = parse_profile(str(meta["profile_text"]), source, base)
    return ResumeReady(meta, str(meta["channel"]), profile, str(meta["profile_text"]), source, base, state,
                       (last_unix, time.time()))


def _said(exc: InputError) -> str:
    """An InputError's problems as one reply line (the first three)."""
    more = len(exc.problems) - 3
    return "; ".join(exc.problems[:3]) + (f" (and {more} more)" if more > 0 else "")


def _found_held(name: str, coordinator: _Coordinator, events: EventBus, held: Outcome,
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


def read_for_resume(database: Path, *, clear_latch: bool = False) -> tuple[dict[str, Any], RunState, float]:
    """A run's metadata, its saved state, and the Unix time of the last thing it recorded."""
    import json
    import sqlite3

    if not database.is_file():
        raise InputError([f"{database}: no run database there"])
    con = sqlite3.connect(f"file:{database.resolve()}?mode=ro", uri=True)
    try:
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        row = con.execute("SELECT state FROM run_state WHERE id = 1").fetchone()
        last = con.execute('SELECT max(t) FROM (SELECT max("Unix Time / s") AS t FROM samples '
                           "UNION ALL SELECT max(unix_time) FROM events)").fetchone()[0]
        # latched: the run's last end was a safety stop, and nothing resumed it after (an operator cleared it)
        ended = con.execute("SELECT message FROM events WHERE kind IN ('end', 'resumed') ORDER BY rowid DESC "
                            "LIMIT 1").fetchone()
    except (sqlite3.DatabaseError, ValueError) as exc:  # not SQLite, not our tables, or mangled JSON
        raise InputError([f"{database}: not a cellbench run database ({exc})"]) from None
    finally:
        con.close()
    missing = [k for k in ("profile_text", "channel", "clock") if k not in meta]
    if missing:
        raise InputError([f"{database}: not a cellbench run database (no {', '.join(missing)} in its metadata)"])
    if row is None:
        raise InputError([f"{database}: the run saved no state to resume from"])
    if ended is not None and str(ended[0]).startswith("safety stop") and not clear_latch:
        raise InputError([f"{database}: the run ended in a {ended[0]}; it stays stopped until an operator "
                          "has looked at the cell and clears the latch (resume --clear-latch)"])
    try:
        state = RunState.model_validate_json(row[0])
    except ValueError as exc:
        raise InputError([f"{database}: its saved run state cannot be read ({str(exc).splitlines()[0]})"]) from None
    if state.finished:
        raise InputError([f"{database}: the run reached the end of its profile; there is nothing to resume"])
    return meta, state, float(last or time.time())


async def _run_channel(channel: Channel, profile: Profile, profile_text: str, clock: Clock, path: Path,
                       *args: Any, **kw: Any) -> ChannelResult:
    """A run of one channel recorded in `path`, by one writer: on a real bench the run database's lock is taken
    before anything is written (InstrumentBusy, nothing written, when another process records it) and held to
    the end."""
    if clock.virtual:  # a dry run's file is new and its own: never resumed, never shared
        return await _recorded_run(channel, profile, profile_text, clock, path, *args, **kw)
    writer = RunLock(path)
    writer.acquire("recording the run")
    try:
        return await _recorded_run(channel, profile, profile_text, clock, path, *args, **kw)
    finally:
        writer.release()


async def _recorded_run(
    channel: Channel,
    profile: Profile,
    profile_text: str,
    clock: Clock,
    path: Path,
    on_progress: ProgressCallback | None,
    extra: dict[str, object],
    base_dir: Path,
    coordinator: _Coordinator | None = None,
    notices: list[str] | None = None,
    *,
    resume: RunState | None = None,
    outage: tuple[float, float] | None = None,
    supervise: bool | None = None,
    about: About | None = None,
    why: str | None = None,
) -> ChannelResult:
    about = about or About()
    if why is not None:  # continued by an operator's command: who and why, in the run's events
        notices = [*(notices or []), f"resumed by command: {why}"]
    if about.on_start is not None:
        about.on_start(channel.name, path)
    entry = runs.begin(path, channel=channel.name, cell_id=channel.cell_id or channel.name, bench=about.bench,
                       profile=profile.name, clock="virtual" if clock.virtual else "real", operator=about.operator,
                       control=None if coordinator is None or coordinator.control is None else str(coordinator.control))

    told: list[asyncio.Future[None]] = []  # notify commands run while the run goes on

    def on_state(state: str, reason: str) -> None:  # paused, latched (held after a safety stop), or running again
        runs.save(entry.model_copy(update={"state": runs.PAUSED if state == LATCHED else state, "reason": reason}))
        if state == LATCHED and about.notify:  # someone must come and look at the cell: told now, not at the end
            told.append(asyncio.ensure_future(notify(about.notify, {**entry.model_dump(), "state": state,
                                                                     "reason": reason, "latched": time.time()})))

    with RunLog(path.with_suffix(".log"), path.stem, channel.name) as run_log:
        log.info("%s %s on channel %s (cell %s), recording to %s", "resuming" if resume else "starting",
                 profile.name, channel.name, entry.cell_id, path)
        try:
            result = await _channel_run(channel, profile, profile_text, clock, path, on_progress, extra, base_dir,
                                        coordinator, notices, resume, outage, supervise, run_log, on_state)
        except BaseException as exc:  # the registry must not say `running` for a run that is not
            runs.end(entry, RunStatus.FAILED.value, f"failed: {type(exc).__name__}: {exc}")
            raise
        outcome = result.outcome
        log.info("%s: %s after %.1f s of test time", channel.name, outcome.reason, outcome.test_time)
        if coordinator is not None:
            coordinator.ended[channel.name] = (path.stem, outcome.reason, time.time())
        if clock.virtual:
            runs.end(entry, outcome.status.value, outcome.reason)
        else:  # a file written and renamed: off the control loop, where other channels are sampling
            await asyncio.to_thread(runs.end, entry, outcome.status.value, outcome.reason)
            if outcome.status is RunStatus.SAFETY_STOP:  # the cell is not run again until an operator clears it
                await asyncio.to_thread(latches.latch, latches.CellLatch(
                    cell_id=entry.cell_id, reason=outcome.reason, run_id=path.stem, database=entry.database,
                    channel=channel.name, bench=about.bench, since=time.time()))
        await asyncio.gather(*told)
        if about.notify:
            await notify(about.notify, {**entry.model_dump(), "state": outcome.status.value,
                                        "reason": outcome.reason, "test_time": outcome.test_time,
                                        "ended": time.time()})
    return result


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


def _text(value: object) -> str | None:
    return None if value is None else str(value)


async def _channel_run(
    channel: Channel,
    profile: Profile,
    profile_text: str,
    clock: Clock,
    path: Path,
    on_progress: ProgressCallback | None,
    extra: dict[str, object],
    base_dir: Path,
    coordinator: _Coordinator | None,
    notices: list[str] | None,
    resume: RunState | None,
    outage: tuple[float, float] | None,
    supervise: bool | None,
    run_log: RunLog,
    on_state: Callable[[str, str], None],
) -> ChannelResult:
    cell = channel.cell
    loop = asyncio.get_running_loop()
    events = EventBus()
    coordinator = coordinator or _Coordinator()

    running: list[Engine] = []  # the engine of the present pass: telemetry on its own cadence, a storage fault

    def stop_this(why: RecordingFailed) -> None:
        for engine in running:
            engine.stop(why)
        if (held := coordinator.held.get(channel.name)) is not None and not held.done():  # paused: stopped too
            held.set_result(("stop", str(why)))

    def failed(exc: BaseException) -> None:  # on the writer thread
        why = RecordingFailed(f"{path.name}: {exc}")
        if shared_failure(exc):  # the disk's: every channel on it meets it, and stops now rather than at its next write
            loop.call_soon_threadsafe(coordinator.stop_all, why)
        else:  # this database's own (locked past the grace, damaged): this channel alone
            loop.call_soon_threadsafe(stop_this, why)

    if clock.virtual:
        store = RunStore(path, durable=False, on_failure=failed)
    else:  # its file opened and its tables made off the loop: a thousand channels start without queueing on it
        store = await loop.run_in_executor(_openers(), functools.partial(RunStore, path, durable=True,
                                                                         on_failure=failed))
    link: ChannelLink | None = None
    ticker: asyncio.Future[None] | None = None
    ended: Outcome | None = None  # how the run ended, for the MQTT status
    try:
        if resume is not None:
            store.set_metadata(last_resumed_unix_time=time.time())
        else:
            store.set_metadata(
                cellbench_version=cellbench_version(),
                run_id=path.stem,
                channel=channel.name,
                cell_id=channel.cell_id or channel.name,
                cell={**cell.model_dump(mode="json"), "volume_cm3": cell.volume_cm3,
                      "active_mass_g": cell.active_mass_g},
                instruments=channel.identity,
                profile_name=profile.name,
                profile_text=profile_text,
                clock="virtual" if clock.virtual else "real",
                **extra,
            )
        events.subscribe(store.record)
        events.subscribe(run_log.on_event)
        if coordinator.mqtt is not None:
            link = coordinator.mqtt.link(channel.name, path.stem, channel.cell_id or channel.name,
                                         path.with_suffix(".outbox.sqlite"))
            events.subscribe(link.on_event)
        last: list[Progress] = []  # the channel's latest progress, told once more with how its run stopped

        def progress(p: Progress) -> None:
            last[:] = [p]
            assert on_progress is not None
            on_progress(channel.name, p)

        def stopped(how: str) -> None:
            if on_progress is not None and last:
                on_progress(channel.name, dataclasses.replace(last[0], ended=how))
        watch = not clock.virtual if supervise is None else supervise
        if link is not None and not clock.virtual:
            ticker = asyncio.ensure_future(_telemetry(link, running))
        while True:  # one pass, or one per pause: the operator may pause and resume the channel
            engine = Engine(profile, channel, events, clock, on_progress=progress if on_progress else None,
                            base_dir=base_dir, notices=notices)
            running[:] = [engine]
            coordinator.add(engine)
            watcher = asyncio.ensure_future(Supervisor(engine, channel, profile, clock).run()) if watch else None
            try:
                outcome = await engine.run(resume, outage)
            finally:
                coordinator.done(engine)
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
            ended = outcome
            latched = (outcome.status is RunStatus.SAFETY_STOP and coordinator.hold_on_trip
                       and coordinator.stopping is None)
            stopped(LATCHED if latched else outcome.status.value)
            if outcome.status is not RunStatus.PAUSED and not latched:
                break
            log.warning("%s: %s", channel.name, outcome.reason + (" (held, latched)" if latched else ""))
            on_state(LATCHED if latched else RunStatus.PAUSED.value, outcome.reason)
            if latched:
                coordinator.latched[channel.name] = (outcome.reason, functools.partial(
                    _latch_cleared, events, outcome, functools.partial(on_state, RunStatus.PAUSED.value)))
            held = asyncio.ensure_future(watch_held(
                channel, profile, clock, found=functools.partial(_found_held, channel.name, coordinator, events,
                                                                 outcome, on_state),
                seen=functools.partial(coordinator.saw, channel.name))) if watch else None
            try:
                action, why = await coordinator.hold(channel.name)
            finally:
                coordinator.open_circuit.pop(channel.name, None)
                if held is not None:
                    held.cancel()
                    await asyncio.gather(held, return_exceptions=True)
            # every stop and resume of a held channel is an event with its reason (and who asked)
            events.publish(Note(NoteKind.INTERRUPTED if action == "stop" else NoteKind.NOTICE,
                                why if action == "stop" else f"resume asked: {why}", outcome.test_time, time.time()))
            if (latch := coordinator.latched.pop(channel.name, None)) is not None:  # stopped, latched: it stands
                if outcome.status is RunStatus.PAUSED:  # latched while paused: the run ends in that safety stop
                    outcome = Outcome(False, latch[0], outcome.test_time, outcome.steps, outcome.cycles,
                                      RunStatus.SAFETY_STOP)
                    ended = outcome
                    events.publish(Note(NoteKind.END, outcome.reason, outcome.test_time, time.time()))
                stopped(outcome.status.value)
                break
            if action == "stop":
                outcome = Outcome(False, f"interrupted: {why}", outcome.test_time, outcome.steps, outcome.cycles,
                                  RunStatus.INTERRUPTED)
                ended = outcome
                stopped(outcome.status.value)
                events.publish(Note(NoteKind.END, outcome.reason, outcome.test_time, time.time()))
                break
            log.info("%s: resumed by the operator (%s)", channel.name, why)
            on_state(runs.RUNNING, "")
            resume, outage, notices = engine.state, None, None
    finally:
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if link is not None:
            await link.close(_mqtt_state(ended), None if ended is None else ended.reason)
        # the last batch is committed off the control loop on the real clock (other channels keep sampling)
        if clock.virtual:
            store.close()
        else:
            await asyncio.to_thread(store.close)
    return ChannelResult(channel.name, path, outcome)

