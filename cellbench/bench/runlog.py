"""A log file per run beside its database: what happened, in plain lines with UTC timestamps and the run ID.

The run's own records (steps, notes, faults, safety trips, from the event stream) and every `cellbench`
logger record emitted while that run's task is current go to its file, and so do records that name its channel
(`extra={"channel": ...}`: an operator's command, taken outside any run's task); records of no run or channel
in particular (a shared instrument, a stop of every channel) go to every running run's file. A log that cannot
be written (a full disk) is dropped quietly: the database is the record and has its own failure handling.
"""

from __future__ import annotations

import contextvars
import logging
import time
from pathlib import Path
from types import TracebackType

from cellbench.bench.events import Note, NoteKind, RunEvent, StepEnded, StepStarted

current_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("cellbench_run", default=None)
LOGGER = "cellbench"
_WARNINGS = {NoteKind.FAULT, NoteKind.OUTAGE, NoteKind.INTERRUPTED, NoteKind.SHORT, NoteKind.CANCELLED}
_ERRORS = {NoteKind.SAFETY, NoteKind.FAILED, NoteKind.RECORDING}


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _QuietFileHandler(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        self.dropped = getattr(self, "dropped", 0) + 1  # never a traceback on stderr mid-run


class RunLog:
    """Attach the run's log file for as long as the run lasts (a context manager); `on_event` subscribes."""

    def __init__(self, path: Path, run_id: str, channel: str | None = None) -> None:
        self.path, self.run_id, self.channel = path, run_id, channel
        self.logger = logging.getLogger(f"{LOGGER}.run")
        self._handler: logging.Handler | None = None
        self._token: contextvars.Token[str | None] | None = None
        self._level: int | None = None

    def __enter__(self) -> RunLog:
        self._token = current_run.set(self.run_id)
        try:
            handler = _QuietFileHandler(self.path, encoding="utf-8")
        except OSError:
            return self  # no log file; the run goes on
        handler.setFormatter(_UtcFormatter(f"%(asctime)s %(levelname)s [{self.run_id}] %(name)s: %(message)s"))
        handler.addFilter(self._ours)
        root = logging.getLogger(LOGGER)
        if root.getEffectiveLevel() > logging.INFO:
            self._level = root.level
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        self._handler = handler
        return self

    def _ours(self, record: logging.LogRecord) -> bool:
        run = current_run.get()
        if run is not None:
            return run == self.run_id
        channel = getattr(record, "channel", None)  # a command to one channel, from outside any run's task
        return channel is None or channel == self.channel

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handler is not None:
            root = logging.getLogger(LOGGER)
            root.removeHandler(self._handler)
            self._handler.close()
            if self._level is not None and not any(isinstance(h, _QuietFileHandler) for h in root.handlers):
                root.setLevel(self._level)
        if self._token is not None:
            current_run.reset(self._token)

    def on_event(self, event: RunEvent) -> None:
        """Steps and notes (safety trips among them) as log lines; samples are the database's."""
        if isinstance(event, StepStarted):
            self.logger.info("step %d started: %s (cycle %d, %s) at test time %.1f s", event.step_count,
                             event.step_type, event.cycle, event.path, event.test_time)
        elif isinstance(event, StepEnded):
            self.logger.info("step %d ended at test time %.1f s: %s", event.step_count, event.test_time, event.reason)
        elif isinstance(event, Note):
            level = logging.ERROR if event.kind in _ERRORS else logging.WARNING if event.kind in _WARNINGS \
                else logging.INFO
            self.logger.log(level, "%s: %s", event.kind.value, event.message)
