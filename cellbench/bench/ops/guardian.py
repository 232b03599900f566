"""The guardian: a small watchdog process that turns outputs off when the controller dies a hard death.

A run on the real clock starts one guardian (`python -m cellbench.bench.ops.guardian`) in a session of its
own, tells it on its standard input which cyclers the run drives and where the run records (and, line by
line, where each run started later on the same controller records), and keeps that pipe open. The
guardian ignores SIGINT, SIGTERM and SIGHUP (the controller handles those itself and then says `done`).
When the pipe closes without `done` — the controller was killed (SIGKILL, out of memory, a crash in a C
extension) — the guardian takes each instrument's lock, connects, turns the output off, checks that it
reads off, and records that in the run's database. It needs nothing of the dead process: the kernel
closed its connections and released its locks.

The guarantee and its limits are in docs/unattended.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from cellbench.bench.ops.locks import InstrumentBusy, InstrumentLock, alive
from cellbench.drivers.registry import OpenRequest, driver

log = logging.getLogger("cellbench.guardian")

ACT_WITHIN = 10.0  # s: how long the guardian keeps trying to reach an instrument after the controller died
BEAT_EVERY = 1.0  # s: the controller's control loop tells the guardian it is working
HUNG_AFTER = 15.0  # s without a beat from a controller that is still alive: it is hung (SIGSTOP, a deadlock)
NOTIFY_TIMEOUT = 30.0  # s a notify command may take before it is killed (as the controller's)


def spawn(cyclers: list[tuple[str, OpenRequest]], databases: list[Path],
          notify: list[str] | None = None) -> subprocess.Popen[str]:
    """Start a guardian for these cyclers (driver name, how to open it) and run databases; after a hard death it
    runs the bench's `notify` command for each run, as the controller would have at the run's end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellbench.bench.ops.guardian"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=None, text=True, start_new_session=True,
    )
    assert proc.stdin is not None
    spec = {"cyclers": [{"driver": d, **asdict(r)} for d, r in cyclers], "databases": [str(p) for p in databases],
            "parent": os.getpid(), "notify": notify}
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return proc


def watch_also(proc: subprocess.Popen[str], database: Path) -> None:
    """A run started later on the same controller (`cellbench start`): its database is recorded in too."""
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"database": str(database)}) + "\n")
        proc.stdin.flush()
    except (OSError, AssertionError) as exc:  # the guardian is gone: the outputs are still the guardian's to
        log.error("the guardian was not told of %s: %s", database, exc)  # turn off, if it can; said here


def beat(proc: subprocess.Popen[str]) -> None:
    """The control loop is working: said to the guardian (a line on its pipe). A controller that stops saying it
    (stopped, hung) is stopped by the guardian and its outputs turned off."""
    try:
        assert proc.stdin is not None
        proc.stdin.write("beat\n")
        proc.stdin.flush()
    except (OSError, AssertionError, ValueError) as exc:
        log.error("the guardian was not told the controller is working: %s", exc)


def dismiss(proc: subprocess.Popen[str]) -> None:
    """The controller ended cleanly (its outputs are off): the guardian may go."""
    try:
        assert proc.stdin is not None
        proc.stdin.write("done\n")
        proc.stdin.close()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired, AssertionError):
        proc.kill()


async def make_safe(spec: dict[str, Any]) -> list[str]:
    """Turn every cycler's output off, all at once (an unreachable one, tried for ACT_WITHIN, holds up no
    other); what was done, one line per instrument, in the bench's order."""
    tries = []
    for item in [dict(c) for c in spec["cyclers"]]:
        name = item.pop("driver")
        tries.append(_off(name, OpenRequest(**item), spec["parent"]))
    return list(await asyncio.gather(*tries))


async def _off(driver_name: str, request: OpenRequest, parent: int) -> str:
    lock = InstrumentLock(request.name, request.resource)
    deadline = time.monotonic() + ACT_WITHIN
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            lock.acquire("guardian")
        except InstrumentBusy as busy:
            # the dead controller's lock goes a moment after its pipe closes; a live holder is a new run
            if busy.holder_pid is not None and busy.holder_pid != parent and alive(busy.holder_pid):
                return f"{request.name}: another controller (pid {busy.holder_pid}) holds it now and acts on it"
            await asyncio.sleep(0.02)
            continue
        try:
            opened = await driver(driver_name).open(request)
            try:
                await opened.driver.output(False)
                if not await opened.driver.output_is_on():
                    return f"{request.name}: output turned off by the guardian"
            finally:
                await opened.close()
        except Exception as exc:  # the instrument may still be closing the dead controller's connection
            last = exc
        finally:
            lock.release()
        await asyncio.sleep(0.2)
    blind = driver(driver_name).blind_off
    if blind is not None:  # the instrument takes commands but does not answer: say it anyway
        try:
            await blind(request)
            return f"{request.name}: output-off sent by the guardian, unconfirmed ({last})"
        except Exception as exc:
            last = exc
    return f"{request.name}: the guardian could not turn the output off: {last}"


def record(databases: list[str], lines: list[str], why: str = "the controller died") -> list[dict[str, Any]]:
    """The guardian's lines as events of every run; each run's notify payload (state `interrupted`)."""
    now = time.time()
    told = []
    for db in databases:
        try:
            con = sqlite3.connect(db, timeout=5)
            with con:
                # stamped at the run's last test time: the time the controller was dead is no test time
                (test_time,) = con.execute(
                    'SELECT max(t) FROM (SELECT max("Test Time / s") AS t FROM samples '
                    "UNION ALL SELECT max(test_time) FROM events)").fetchone()
                con.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                                [(test_time, now, "guardian", f"{why}; {line}") for line in lines])
                meta = {k: v for k, v in con.execute("SELECT key, value FROM meta WHERE key IN "
                                                     "('run_id', 'channel', 'cell_id', 'profile_name')")}
            con.close()
        except sqlite3.Error as exc:
            log.error("%s: %s", db, exc)
            meta = {}
        about = {}
        for key, value in meta.items():
            with contextlib.suppress(ValueError):
                about[key] = json.loads(value)
        told.append({**about, "database": db, "state": "interrupted",
                     "reason": f"{why} (" + "; ".join(lines) + ")", "ended": now})
    return told


def notify_all(command: list[str] | None, payloads: list[dict[str, Any]]) -> None:
    """Run the bench's notify command once per run, its payload as JSON on standard input (a failure logged)."""
    for payload in payloads if command else []:
        assert command is not None
        try:
            done = subprocess.run(command, input=json.dumps(payload) + "\n", text=True, capture_output=True,
                                  timeout=NOTIFY_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("the notify command %s failed: %s", command[0], exc)
            continue
        if done.returncode:
            log.error("the notify command %s failed (exit %s): %s", command[0], done.returncode,
                      done.stderr.strip()[-300:])


def _lines(fd: int, hung_after: float) -> Any:
    """The pipe's lines as they come; None when none came for `hung_after` seconds; the end at EOF."""
    import select

    buffer = b""
    while True:
        ready, _, _ = select.select([fd], [], [], hung_after)
        if not ready:
            yield None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode(errors="replace")


def watch(stdin: TextIO, hung_after: float = HUNG_AFTER) -> int:
    lines = _lines(stdin.fileno(), hung_after)
    first = next((line for line in lines if line is not None), None)
    if first is None:
        return 1  # the controller died before it said anything: nothing to act on
    spec = json.loads(first)
    why = "the controller died"
    for line in lines:
        if line is None:  # alive (or a zombie) but silent: hung or stopped; it must not wake up and source on
            if alive(spec["parent"]):
                why = f"the controller stopped working for {hung_after:g} s (hung or stopped): the guardian killed it"
                with contextlib.suppress(OSError):
                    os.kill(spec["parent"], signal.SIGKILL)
            continue  # its pipe closes with it
        if line.strip() == "done":
            return 0
        with contextlib.suppress(ValueError, TypeError, KeyError):  # a run started later: its database
            spec["databases"].append(str(json.loads(line)["database"]))
    said = asyncio.run(make_safe(spec))
    for line in said:
        log.warning("%s", line)
    notify_all(spec.get("notify"), record(spec["databases"], said, why))
    return 1


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cellbench guardian: %(message)s")
    sys.exit(watch(sys.stdin))


if __name__ == "__main__":
    main()
