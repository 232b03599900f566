"""A run read back from its database to be continued: its metadata, profile, saved state and outage; refused, in
one line, when there is nothing to resume (no state, the profile's end reached, a dry run, a latched cell)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellbench.bench.runner.channel_run import ProfileFile
from cellbench.bench.runtime.runstate import RunState
from cellbench.profiles.parse import InputError, parse_profile
from cellbench.profiles.schema import Profile


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

    @property
    def profile_file(self) -> ProfileFile:
        return ProfileFile(self.profile, self.text, self.source, self.base)


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


def read_for_resume(database: Path, *, clear_latch: bool = False) -> tuple[dict[str, Any], RunState, float]:
    """A run's metadata, its saved state, and the Unix time of the last thing it recorded."""
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
