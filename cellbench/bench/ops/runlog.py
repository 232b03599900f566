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

from cellbench.bench.runtime.events import Note, NoteKind, RunEvent, StepEnded, StepStarted

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


class _Router(logging.Handler):
    """One handler on the `cellbench` logger for every run of the process: a record goes to the run whose task is
    current (a dictionary look-up), to the runs of the channel it names, or to every run. A filter per run on its
    own handler once made each of a thousand runs look at each of the others' lines (start-up grew with N²)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, tuple[logging.Handler, str | None]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        run = current_run.get()
        if run is not None:
            found = self.runs.get(run)
            targets = [found[0]] if found is not None else []
        else:
            channel = getattr(record, "channel", None)  # a command to one channel, from outside any run's task
            targets = [h for h, ch in self.runs.values() if channel is None or ch == channel]
        for handler in targets:
            if record.levelno >= handler.level:
                handler.handle(record)


_router = _Router()
_saved_level: list[int] = []  # the `cellbench` logger's level before the first run raised it to INFO


class RunLog:
    """Attach the run's log file for as long as the run lasts (a context manager); `on_event` subscribes."""

    def __init__(self, path: Path, run_id: str, channel: str | None = None) -> None:
        self.path, self.run_id, self.channel = path, run_id, channel
        self.logger = logging.getLogger(f"{LOGGER}.run")
        self._handler: logging.Handler | None = None
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> RunLog:
        self._token = current_run.set(self.run_id)
        try:
            handler = _QuietFileHandler(self.path, encoding="utf-8")
        except OSError:
            return self  # no log file; the run goes on
        handler.setFormatter(_UtcFormatter(f"%(asctime)s %(levelname)s [{self.run_id}] %(name)s: %(message)s"))
        root = logging.getLogger(LOGGER)
        if not _router.runs:
            if root.getEffectiveLevel() > logging.INFO:
                _saved_level.append(root.level)
                root.setLevel(logging.INFO)
            root.addHandler(_router)
        _router.runs[self.run_id] = (handler, self.channel)
        self._handler = handler
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handler is not None:
            _router.runs.pop(self.run_id, None)
            self._handler.close()
            if not _router.runs:
                root = logging.getLogger(LOGGER)
                root.removeHandler(_router)
                while _saved_level:
                    root.setLevel(_saved_level.pop())
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
