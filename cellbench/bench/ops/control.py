"""A running controller's command socket: start, pause, resume or stop one channel, or clear its safety latch,
from another terminal.

Each controller on the real clock listens on a Unix socket of its own, `$CELLBENCH_STATE_DIR/control/<pid>.sock`
(mode 0600 in a 0700 folder: only the user who runs the bench may command it), says which bench and channels
it holds in `<pid>.json` beside it, and records the socket's path in the runs registry beside each of its
runs. A client sends one JSON line, a `Command`, and reads one JSON line back, a `Reply`. Commands go through
the runner (`coordinator.Coordinator.command`), never to an instrument directly; one channel's command leaves the
others running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cellbench.bench.ops.runs import state_dir
from cellbench.bench.runtime.commands import Command as Command  # control.Command: what a client sends

log = logging.getLogger(__name__)
MAX_LINE = 4096  # bytes: a command is a few dozen


class Reply(BaseModel):
    ok: bool
    message: str


Handler = Callable[[Command], tuple[bool, str]]  # the command -> (done, what to say)


class Controller(BaseModel):
    """What a running controller says of itself beside its socket, so a client finds it by channel."""

    pid: int
    bench: str
    channels: list[str]
    socket: str


def controllers() -> list[Controller]:
    """The controllers running on this machine now (their process alive)."""
    from cellbench.bench.ops.locks import alive

    found = []
    for path in (state_dir() / "control").glob("*.json"):
        try:
            c = Controller.model_validate_json(path.read_bytes()[:100_000])
        except (OSError, ValidationError):
            continue
        if alive(c.pid) and Path(c.socket).exists():
            found.append(c)
    return found


def socket_path(pid: int | None = None) -> Path:
    return state_dir() / "control" / f"{pid or os.getpid()}.sock"


@contextlib.asynccontextmanager
async def serving(handler: Handler, bench: str = "bench", channels: list[str] | None = None,
                  path: Path | None = None) -> AsyncIterator[Path | None]:
    """Take commands on this process's socket for as long as the block runs; yields its path, or None when
    no socket could be made (the run goes on without remote commands, and the log says so)."""
    path = path or socket_path()
    about = path.with_suffix(".json")

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            try:
                cmd = Command.model_validate_json(line[:MAX_LINE])
            except ValidationError as exc:
                reply = Reply(ok=False, message=f"not a command: {exc.errors()[0]['msg']}")
            else:
                done, message = handler(cmd)
                log.warning("command %s %s (%s, operator %s): %s", cmd.action, cmd.channel, cmd.reason,
                            cmd.operator or "unnamed", message, extra={"channel": cmd.channel})
                reply = Reply(ok=done, message=message)
            writer.write(reply.model_dump_json().encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    server = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket left by a dead process of the same pid
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(session, path=str(path), limit=MAX_LINE)
        finally:
            os.umask(old)
        about.write_text(Controller(pid=os.getpid(), bench=bench, channels=channels or [],
                                   socket=str(path)).model_dump_json())
    except (OSError, NotImplementedError, AttributeError) as exc:
        log.warning("no command socket (%s): channels can be stopped only by a signal to the controller", exc)
    try:
        yield path if server is not None else None
    finally:
        if server is not None:
            server.close()
            for done in (path, about):
                with contextlib.suppress(OSError):
                    done.unlink()


async def send(path: Path, command: Command, timeout: float = 10.0) -> Reply:
    """Send one command to a controller's socket and read its reply; OSError when nobody listens there."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    try:
        writer.write(command.model_dump_json().encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    try:
        return Reply.model_validate_json(line)
    except ValidationError:
        raise OSError(f"{path}: not a cellbench controller's reply: {line[:80]!r}") from None
