"""Ownership of instruments: one controller at a time, by an advisory lock per instrument.

The lock is an `flock` on a file named after the instrument's resource string, in a folder shared by
every user of the machine (`$CELLBENCH_LOCK_DIR`, by default `<tmp>/cellbench-locks`). The kernel
releases it when its holder dies however it dies, so a crashed run never leaves an instrument stuck.
Limits: it guards one machine, and one spelling of a resource (an instrument reached by a host name
and by its address is two resources to it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import tempfile
import time
from pathlib import Path

from cellbench.roles import InstrumentFault


class InstrumentBusy(InstrumentFault):
    """Another controller owns the instrument."""

    def __init__(self, instrument: str, message: str, holder_pid: int | None = None) -> None:
        super().__init__(instrument, message)
        self.holder_pid = holder_pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_dir() -> Path:
    return Path(os.environ.get("CELLBENCH_LOCK_DIR") or Path(tempfile.gettempdir()) / "cellbench-locks")


class InstrumentLock:
    """The advisory lock of one instrument, held from acquire() to release()."""

    def __init__(self, name: str, resource: str) -> None:
        self.name = name
        self.resource = resource
        key = re.sub(r"[^A-Za-z0-9.]+", "_", resource.strip().upper()).strip("_")
        self.path = lock_dir() / f"{key}.lock"
        self._fd: int | None = None

    def acquire(self, purpose: str = "") -> None:
        """Take the lock now or raise InstrumentBusy naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # shared by every user of the machine
            os.chmod(self.path.parent, 0o1777)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            pid = re.search(r"pid (\d+)", holder)
            raise InstrumentBusy(self.name, f"{self.resource} is in use by {holder}",
                                 int(pid.group(1)) if pid else None) from None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = f"cellbench pid {os.getpid()} on {socket.gethostname()} since {stamp}"
        text += f" ({purpose})" if purpose else ""
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class RunLock(InstrumentLock):
    """One writer per run database: held by the process that records the run, for as long as it does (a second
    `resume` of the same run, by whatever bench file, is refused naming the first)."""

    def __init__(self, database: Path) -> None:
        super().__init__(database.name, f"run database {database.resolve()}")

    def check(self) -> None:
        """Raise InstrumentBusy now if another process writes the run (nothing is held afterwards)."""
        self.acquire("checking")
        self.release()
