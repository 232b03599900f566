"""The runs registry: every run on this machine, its state and where its files are, for `cellbench runs` and
`cellbench status` from any terminal.

One small JSON file per run in `$CELLBENCH_STATE_DIR/runs` (by default `$XDG_STATE_HOME/cellbench/runs`,
that is `~/.local/state/cellbench/runs`), written whole and renamed into place, so a reader never sees
half of one. The run's database stays the record: the registry only points at it. A run whose entry says
`running` but whose process is gone (killed, a reboot) is shown `interrupted`. The registry never stops a
run: when it cannot be written the run goes on and the log says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cellbench.bench.ops.locks import alive
from cellbench.bench.runtime.clock import utc as utc  # runs.utc: the faces write times as the registry does

log = logging.getLogger(__name__)
RUNNING = "running"
PAUSED = "paused"


_elsewhere: list[Path] = []  # registry_in's folders, innermost last


@contextlib.contextmanager
def registry_in(folder: Path) -> Iterator[Path]:
    """Runs started in the block register in `folder`, not in the machine's registry: a duration estimate's or a
    CI plugin's throwaway dry runs, whose databases are gone with their temporary folder."""
    _elsewhere.append(folder)
    try:
        yield folder
    finally:
        _elsewhere.remove(folder)


def state_dir() -> Path:
    """Where cellbench keeps what outlives a run on this machine (the runs registry)."""
    if _elsewhere:
        return _elsewhere[-1]
    if env := os.environ.get("CELLBENCH_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cellbench"


class RunEntry(BaseModel):
    """One run of one channel, as the registry knows it."""

    run_id: str
    channel: str
    cell_id: str
    bench: str
    profile: str
    state: str  # running, or a RunStatus value: completed, interrupted, failed, safety stop, recording failed
    reason: str = ""
    database: str
    log: str | None = None
    clock: str = "real"
    pid: int
    host: str
    started: float  # Unix time
    ended: float | None = None
    operator: str | None = None
    control: str | None = None  # the controller's command socket (pause, resume, stop), while it runs

    @property
    def gone(self) -> bool:
        """Registered as running by a process of this machine that no longer exists."""
        return self.state in (RUNNING, PAUSED) and self.host == socket.gethostname() and not alive(self.pid)

    def shown(self) -> RunEntry:
        """The entry as it should be read: a run whose process died is interrupted."""
        if not self.gone:
            return self
        return self.model_copy(update={"state": "interrupted",
                                       "reason": f"the controller (pid {self.pid}) is gone; resume it"})


def _path(run_id: str, root: Path | None = None) -> Path:
    return (root or state_dir()) / "runs" / f"{run_id}.json"


def save(entry: RunEntry, root: Path | None = None) -> None:
    """Write the entry whole (a temporary file renamed over the old one); a failure is logged, never raised."""
    path = _path(entry.run_id, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(entry.model_dump_json(indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.warning("the runs registry (%s) could not be written: %s", path.parent, exc)


def begin(database: Path, **about: str | None) -> RunEntry:
    """Register a run (re)starting now in this process, recording to `database` with its log beside it."""
    entry = RunEntry(run_id=database.stem, database=os.path.abspath(database),
                     log=os.path.abspath(database.with_suffix(".log")), state=RUNNING, pid=os.getpid(),
                     host=socket.gethostname(), started=time.time(), **about)
    save(entry)
    return entry


def forget(entry: RunEntry, root: Path | None = None) -> None:
    """Remove a run from the registry (its database and log are left alone)."""
    with contextlib.suppress(FileNotFoundError):
        _path(entry.run_id, root).unlink()


def end(entry: RunEntry, state: str, reason: str) -> None:
    save(entry.model_copy(update={"state": state, "reason": reason, "ended": time.time()}))


def entries(root: Path | None = None) -> list[RunEntry]:
    """Every registered run, newest first, as it should be read (see `RunEntry.shown`); unreadable files skipped."""
    folder = (root or state_dir()) / "runs"
    found = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            found.append(RunEntry.model_validate_json(path.read_bytes()[:100_000]).shown())
        except (OSError, ValidationError, ValueError):
            continue
    return sorted(found, key=lambda e: e.started, reverse=True)


def select(runs: Iterable[RunEntry], *, state: str | None = None, cell: str | None = None,
           since: float | None = None) -> list[RunEntry]:
    return [e for e in runs if (state is None or e.state == state) and (cell is None or e.cell_id == cell)
            and (since is None or e.started >= since)]


@dataclass(frozen=True)
class Live:
    """What a running channel's database says now."""

    entry: RunEntry
    step_count: int | None = None
    total_steps: int | None = None
    step_type: str | None = None
    cycle: int | None = None
    voltage: float | None = None
    current: float | None = None
    temperature_c: float | None = None  # the cell's (T1) where it has one, else the chamber air's
    pressure_mpa: float | None = None
    test_time: float | None = None
    remaining_s: float | None = None  # at most this long left in the step, from its time and capacity limits
    cell_temperature_c: float | None = None  # T1: the press platen's thermocouple at the cell
    chamber_temperature_c: float | None = None  # the chamber's air
    reading_age_s: float | None = None  # how long ago its newest reading was taken (wall clock)

    def as_dict(self) -> dict[str, object]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "entry"}
        return {**self.entry.model_dump(), **out}


def live(entry: RunEntry, now: float | None = None) -> Live:
    """Read the run's latest sample from its database (read-only, beside its writer)."""
    try:
        con = sqlite3.connect(f"file:{Path(entry.database).resolve()}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return Live(entry)
    try:
        row = con.execute(
            'SELECT "Step Count / 1", "Step Type", "Cycle Count / 1", "Voltage / V", "Current / A", '
            '"Surface Temperature T1 / degC", "Ambient Temperature / degC", "Applied Pressure / Pa", '
            '"Test Time / s", "Unix Time / s" FROM samples ORDER BY rowid DESC LIMIT 1').fetchone()
        meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('total_steps', 'profile_text', "
                                "'profile_source', 'base_dir')"))
        saved = con.execute("SELECT state FROM run_state WHERE id = 1").fetchone()
    except sqlite3.Error:
        return Live(entry)
    finally:
        con.close()
    total = _json_number(meta.get("total_steps"))
    if row is None:
        return Live(entry, total_steps=None if total is None else int(total))
    step, kind, cycle, v, i, t1, ambient, pa, t, unix = row
    if entry.state == PAUSED:
        i = 0.0  # paused (or held latched): the output is off, whatever the last sample carried
    remaining = None if saved is None or t is None else step_remaining(meta, saved[0], t, i)
    age = None if unix is None else max((time.time() if now is None else now) - unix, 0.0)
    return Live(entry, step, None if total is None else int(total), kind, cycle, v, i,
                t1 if t1 is not None else ambient, None if pa is None else pa / 1e6, t, remaining, t1, ambient, age)


@functools.lru_cache(maxsize=256)
def _program(text: str, source: str, base: str) -> Any:
    """A run's recorded profile compiled, once per profile (a watched `status` asks every few seconds for every
    channel); None when it cannot be read back. Arguments: the metadata's JSON texts."""
    from cellbench.profiles.parse import InputError, parse_profile
    from cellbench.profiles.program import compile_profile

    try:
        return compile_profile(parse_profile(json.loads(text), str(json.loads(source)), Path(str(json.loads(base)))))
    except (InputError, ValueError, TypeError):
        return None


def step_remaining(meta: dict[str, str], state_json: str, test_time: float, current: float | None) -> float | None:
    """The most the running step has left (s), from its limits a clock can judge: its time limit or a rest's
    duration, a step capacity at the present current, and the profile's or a loop's time budget. None when only
    a voltage, current or other reading can end it (or the profile cannot be read back)."""
    from cellbench.bench.runtime.runstate import RunState
    from cellbench.profiles.schema import body_of

    try:
        state = RunState.model_validate_json(state_json)
        program = _program(meta["profile_text"], meta.get("profile_source", '""'), meta.get("base_dir", '"."'))
    except (ValueError, KeyError, TypeError):
        return None
    if program is None:
        return None
    if state.step is None or not 0 <= state.step.pc < len(program.instrs):
        return None
    elapsed = test_time - state.step.start
    body = body_of(program.instrs[state.step.pc].node)
    bounds = [b.deadline - test_time for b in state.budgets]
    if (duration := getattr(body, "duration", None)) is not None:
        bounds.append(float(duration) - elapsed)
    for limit in getattr(body, "until", []):
        if limit.kind == "time":
            bounds.append(limit.value - elapsed)
        elif limit.kind == "step_capacity" and current:
            totals = state.step.totals
            done = (totals.charge_ah if current > 0 else totals.discharge_ah) + abs(current) * max(
                test_time - state.test_time, 0.0) / 3600.0
            bounds.append((limit.value - done) / abs(current) * 3600.0)
    return max(min(bounds), 0.0) if bounds else None


def _json_number(text: str | None) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        value = json.loads(text) if text is not None else None
        return float(value) if isinstance(value, (int, float)) else None
    return None
