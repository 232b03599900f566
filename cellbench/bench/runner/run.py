"""Run orchestration: a profile on every channel of a bench, each channel recorded in its own run file."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cellbench.bench.ops import control, guardian, latches
from cellbench.bench.ops.locks import InstrumentBusy, RunLock
from cellbench.bench.ops.mqtt import MqttBridge
from cellbench.bench.runner.channel_run import About, ChannelResult, ChannelRun, ProfileFile, ProgressCallback
from cellbench.bench.runner.config import BenchConfig
from cellbench.bench.runner.coordinator import STOP_SIGNALS, Coordinator
from cellbench.bench.runner.instruments import Instruments
from cellbench.bench.runner.resume import ResumeReady, prepare_resume, read_for_resume
from cellbench.bench.runtime.clock import Clock
from cellbench.bench.runtime.commands import Command
from cellbench.bench.runtime.runstate import RunStatus
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

# what the faces and the tests take from the runner
__all__ = ["ChannelResult", "ProfileFile", "ProgressCallback", "ResumeReady", "channel_problems",
           "channel_range_problems", "exit_code", "prepare_resume", "profile_problems", "read_for_resume", "reserve",
           "resume_run", "run_bench", "run_ids"]
log = logging.getLogger(__name__)



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
        if ref is None or len(users := bench.sharing(ref)) < 2 or bench.instruments[ref].owner_channel == channel:
            continue
        owner = bench.instruments[ref].owner_channel
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


def exit_code(results: list[ChannelResult]) -> int:
    """0 when every channel completed; 128 + the signal's number when a signal stopped the run; 1 otherwise."""
    for r in results:
        if r.outcome.status is RunStatus.INTERRUPTED:
            for sig in STOP_SIGNALS:
                if sig.name in r.outcome.reason:
                    return 128 + int(sig)
    return 0 if all(r.outcome.completed for r in results) else 1




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

    def job(instruments: Instruments, coordinator: Coordinator, name: str, pf: ProfileFile, path: Path,
            allowed: bool = allow_density) -> Any:
        own = bench.only(name)  # each run records its own slice of the bench, not every channel's
        extra = {"bench": own.model_dump(mode="json"), "bench_as_written": own.as_written(), **common,
                 "profile_source": pf.source, "total_steps": pf.profile.executed_step_count(),
                 "base_dir": str(Path.cwd() / pf.base_dir)}  # base_dir: for a resume
        notices = instruments.notices_for(name)
        if allowed and (dense := _density_said(bench, name, pf.profile)):
            extra["current_density_allowed"] = True
            notices = [*notices, f"allowed by the operator (--allow-current-density): {dense}"]
        return ChannelRun(instruments.channel(name), pf, clock, path, coordinator, on_progress, extra, notices,
                          supervise=supervise,
                          about=About(bench.name, _text(common.get("operator")), bench.notify, on_start)).run()

    def start(instruments: Instruments, coordinator: Coordinator, cmd: Command, why: str) -> tuple[bool, str]:
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

    def go_on(instruments: Instruments, coordinator: Coordinator, name: str, database: Path,
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
        coordinator.launch(ChannelRun(instruments.channel(name), ready.profile_file, clock, database, coordinator,
                                      on_progress, {}, instruments.notices_for(name), ready.state, ready.outage,
                                      supervise, about, why).run())
        return True, f"channel '{name}' resumes run {database.stem} where it stood"

    def jobs(instruments: Instruments, coordinator: Coordinator, paths: dict[str, Path]) -> list[Any]:
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
    jobs: Callable[[Instruments, Coordinator, dict[str, Path]], list[Any]],
    handle_signals: bool,
) -> list[ChannelResult]:
    """Open the bench's instruments (owning them), start a guardian on a real bench, run every channel's job
    to its end with signals handled, and close everything; the first error of a channel is raised after."""
    coordinator = Coordinator()
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

    def job(instruments: Instruments, coordinator: Coordinator, paths: dict[str, Path]) -> list[Any]:
        return [ChannelRun(instruments.channel(name), ready.profile_file, clock, database, coordinator, on_progress,
                           {}, instruments.notices_for(name), ready.state, ready.outage,
                           about=About(whole.name, _text(meta.get("operator")), whole.notify, on_start)).run()]

    (result,) = await _on_bench(one, clock, lambda: {name: database}, job, handle_signals)
    return result


def _said(exc: InputError) -> str:
    """An InputError's problems as one reply line (the first three)."""
    more = len(exc.problems) - 3
    return "; ".join(exc.problems[:3]) + (f" (and {more} more)" if more > 0 else "")




def _text(value: object) -> str | None:
    return None if value is None else str(value)
