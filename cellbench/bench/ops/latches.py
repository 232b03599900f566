"""Cell latches: a cell that a safety stop ended is not run again, by any process, until an operator clears it.

A run on a real bench that ends in a safety stop latches its cell, by the cell's ID: one small JSON file in
`$CELLBENCH_STATE_DIR/latches` (beside the runs registry), written whole and renamed into place. `cellbench run`
and `cellbench start` refuse a channel whose cell is latched, before any instrument is touched, with the trip
that latched it. `cellbench clear-latch CELL --reason …` (or `resume RUN --clear-latch`, or a held channel's
`clear_latch` command) clears it: the latch file moves to `latches/cleared/` with who cleared it and why, and the
tripped run's database records a `latch cleared` event. Dry runs latch nothing: their cells are simulated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from cellbench.bench.ops.runs import state_dir
from cellbench.bench.runtime.clock import utc
from cellbench.profiles.parse import InputError

log = logging.getLogger(__name__)


class CellLatch(BaseModel):
    """A cell that a safety stop ended, and where."""

    cell_id: str
    reason: str  # the safety stop, as recorded
    run_id: str
    database: str
    channel: str
    bench: str
    since: float  # Unix time of the trip
    cleared_by: str | None = None  # who cleared it and why, once cleared
    cleared: float | None = None

    def said(self) -> str:
        """One line for an operator: what latched the cell, and how to clear it."""
        return (f"cell {self.cell_id} is latched since {utc(self.since)} by a {self.reason} (run {self.run_id}, "
                f"channel {self.channel}); look at the cell, then: cellbench clear-latch {self.cell_id} "
                "--reason 'what was checked'")


class CellLatched(InputError):
    """A run asked for a latched cell: refused before any instrument is touched (exit 1, not a typo's 2)."""


def refuse_latched(cell_ids: list[str]) -> None:
    """Raise CellLatched naming every latched cell among these, with its trip and how to clear it."""
    said = [found.said() for cell_id in dict.fromkeys(cell_ids) if (found := latched(cell_id)) is not None]
    if said:
        raise CellLatched(said)


def _folder() -> Path:
    return state_dir() / "latches"


def _path(cell_id: str, folder: Path | None = None) -> Path:
    return (folder or _folder()) / f"{quote(cell_id, safe='')}.json"


def _write(path: Path, latch: CellLatch) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(latch.model_dump_json(indent=1))
    tmp.replace(path)


def latch(latch: CellLatch) -> None:
    """Latch a cell. A failure to write is logged loudly, never raised: the run has ended in the safe state."""
    try:
        _write(_path(latch.cell_id), latch)
    except OSError as exc:
        log.error("cell %s could not be latched (%s): %s", latch.cell_id, _folder(), exc)


def latched(cell_id: str) -> CellLatch | None:
    """The cell's latch, if it has one (an unreadable latch file counts as a latch: it says so)."""
    path = _path(cell_id)
    try:
        return CellLatch.model_validate_json(path.read_bytes()[:100_000])
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as exc:
        return CellLatch(cell_id=cell_id, reason=f"safety stop (its latch file {path} cannot be read: {exc})",
                         run_id="?", database="", channel="?", bench="?", since=path.stat().st_mtime)


def clear(cell_id: str, why: str) -> CellLatch | None:
    """Clear a cell's latch (`why`: the operator's reason, and who); the latch as it was, or None if there was none.
    Kept in `latches/cleared/`, and recorded in the tripped run's database as a `latch cleared` event."""
    found = latched(cell_id)
    if found is None:
        return None
    now = time.time()
    done = found.model_copy(update={"cleared_by": why, "cleared": now})
    with contextlib.suppress(OSError):
        _write(_folder() / "cleared" / f"{quote(cell_id, safe='')}-{int(now)}.json", done)
    _path(cell_id).unlink(missing_ok=True)
    if found.database and Path(found.database).is_file():
        try:
            con = sqlite3.connect(found.database, timeout=5)
            with con:
                (test_time,) = con.execute("SELECT max(test_time) FROM events").fetchone()
                con.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                            (test_time or 0.0, now, "latch cleared",
                             f"cell latch cleared by the operator ({why}) after the {found.reason}"))
            con.close()
        except sqlite3.Error as exc:
            log.warning("%s: the clearing was not recorded in the run: %s", found.database, exc)
    return done
