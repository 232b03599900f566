"""Serve a simulated line-protocol instrument over a real transport (TCP on loopback).

The server owns the wire; the instrument only turns a received line into a reply line.
Faults that a real bench sees are injected here, where they happen on a real instrument:
silence, slow replies, garbage, a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

log = logging.getLogger(__name__)


class LineInstrument(Protocol):
    """What a simulator offers the server: one reply (or none) per received line."""

    name: str

    def handle(self, line: str) -> str | AsyncIterator[str] | None: ...

if TYPE_CHECKING:
    from cellbench.simulators.cell import SolidStateCell


@dataclass
class Faults:
    """Misbehaviour to inject; every field off means a healthy instrument."""

    silent: bool = False  # swallow commands, never answer
    delay: float = 0.0  # seconds before each reply
    garbage: bool = False  # answer with bytes that are not the reply
    drop: bool = False  # close the connection on the next line
    stuck: bool = False  # answer every query with the reply it last gave to it (a frozen reading)


class SimServer:
    """A running TCP server for one simulated instrument."""

    def __init__(
        self, instrument: LineInstrument, *, read_termination: bytes = b"\n", write_termination: bytes = b"\n"
    ) -> None:
        self.instrument = instrument
        self.faults = Faults()
        self._read_term = read_termination
        self._write_term = write_termination
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._said: dict[str, str] = {}  # the last reply to each query (for the stuck fault)
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def resource(self) -> str:
        """The VISA resource string a client uses to reach this instrument."""
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> SimServer:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    def reply_to(self, raw: bytes) -> bytes | AsyncIterator[bytes] | None:
        """What the instrument sends back for one received line (faults applied), or None.

        An instrument that streams (a potentiostat running a script) returns an async iterator of
        lines; they are sent as it yields them.
        """
        line = raw.decode("ascii", errors="replace").strip("\r\n")
        reply = self.instrument.handle(line)
        if reply is None or self.faults.silent:
            return None
        if not isinstance(reply, str):
            return self._stream(reply)
        if self.faults.stuck and line in self._said:
            reply = self._said[line]
        self._said[line] = reply
        return self._encode(reply)

    def _encode(self, reply: str) -> bytes:
        payload = b"\x8f\x00#garbage" if self.faults.garbage else reply.encode("ascii")
        return payload + self._write_term

    async def _stream(self, lines: AsyncIterator[str]) -> AsyncIterator[bytes]:
        async for line in lines:
            if not self.faults.silent:
                yield self._encode(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while True:
                try:
                    raw = await reader.readuntil(self._read_term)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if self.faults.drop:
                    return
                reply = self.reply_to(raw[: -len(self._read_term)])
                if reply is None:
                    continue
                if self.faults.delay:
                    await asyncio.sleep(self.faults.delay)
                if isinstance(reply, bytes):
                    writer.write(reply)
                    await writer.drain()
                else:  # a stream goes on while further lines (an abort) are read
                    task = asyncio.ensure_future(self._write_stream(reply, writer))
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()


    async def _write_stream(self, lines: AsyncIterator[bytes], writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            async for chunk in lines:
                writer.write(chunk)
                await writer.drain()


class PtySimServer(SimServer):
    """The same instrument on a pseudo-terminal: a real serial line for pyserial and VISA ASRL clients."""

    def __init__(self, instrument: LineInstrument, **kw: bytes) -> None:
        super().__init__(instrument, **kw)
        self._master = -1
        self._slave = -1
        self.device = ""
        self._buffer = b""
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def resource(self) -> str:
        return f"ASRL{self.device}::INSTR"

    async def start(self, host: str = "", port: int = 0) -> PtySimServer:
        import os
        import tty

        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing: bytes pass as on a serial cable
        self.device = os.ttyname(self._slave)
        os.set_blocking(self._master, False)
        asyncio.get_running_loop().add_reader(self._master, self._readable)
        return self

    def _readable(self) -> None:
        import os

        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, OSError):
            return
        self._buffer += data
        while (end := self._buffer.find(self._read_term)) >= 0:
            raw, self._buffer = self._buffer[:end], self._buffer[end + len(self._read_term):]
            reply = self.reply_to(raw)
            if reply is not None:
                sending = self._send(reply) if isinstance(reply, bytes) else self._send_stream(reply)
                task = asyncio.ensure_future(sending)
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _send(self, reply: bytes) -> None:
        import os

        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        with contextlib.suppress(OSError):
            os.write(self._master, reply)

    async def _send_stream(self, lines: AsyncIterator[bytes]) -> None:
        async for chunk in lines:
            await self._send(chunk)

    async def close(self) -> None:
        import os

        if self._master >= 0:
            asyncio.get_running_loop().remove_reader(self._master)
            for task in list(self._pending):
                task.cancel()
            os.close(self._master)
            os.close(self._slave)
            self._master = self._slave = -1


StreamClient = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamServers:
    """TCP listeners for simulators with their own framing (binary, JSON): each client a tracked task, every
    listener and client closed by `close()`, so a test or `sim serve` leaves no half-open connection. A client
    coroutine just serves its stream; a dropped connection ends it quietly and its writer is closed here."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._clients: set[asyncio.Task[Any]] = set()

    async def listen(self, client: StreamClient, host: str, port: int) -> int:
        """Serve `client` on host:port (0: a free one); the port it listens on."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._clients.add(task)
            try:
                await client(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # the client went away, or close() ended it: the end of this client, not an error to log
            finally:
                writer.close()
                self._clients.discard(task)

        server = await asyncio.start_server(handle, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers = []


@dataclass(frozen=True)
class ServeOptions:
    """How `cellbench sim serve` asks for a simulated instrument."""

    host: str = "127.0.0.1"
    port: int = 0
    serial: bool = False  # a pseudo-terminal serial line instead of TCP
    soc: float = 0.5
    seed: int = 0
    cell: str = "pellet"  # a preset of simulators.parameters
    channels: int = 8  # of a multi-channel cycler box
    bin_port: int = 0  # a second port (MacNet's binary messages)
    login: str | None = None  # user:password a simulated cycler accepts (Arbin CTI)
    temperature_c: float = 25.0  # of the simulated cell (and of the air around it)
    faults: tuple[str, ...] = ()  # line instruments: silent, garbage, drop, stuck, delay=SECONDS
    short_on_usr1: float | None = None  # ohms: a lithium short across the cell when the server gets SIGUSR1


def cell_of(options: ServeOptions) -> SolidStateCell:
    """The simulated cell `sim serve` was asked for."""
    from cellbench.simulators.cell import SolidStateCell
    from cellbench.simulators.parameters import PRESETS

    cell = SolidStateCell(PRESETS[options.cell], soc=options.soc, temperature_c=options.temperature_c)
    if options.short_on_usr1 is not None:  # a short at a moment the rehearsal chooses: `kill -USR1 PID`
        import signal

        def short() -> None:
            log.warning("SIGUSR1: a short of %g ohm across the cell", options.short_on_usr1)
            cell.inject_short(float(options.short_on_usr1 or 0.0))

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, short)
    return cell


def faults_of(names: tuple[str, ...]) -> Faults:
    """Faults from their names as `sim serve --fault` takes them; ValueError naming a wrong one."""
    faults = Faults()
    for name in names:
        key, _, value = name.partition("=")
        if key == "delay":
            try:
                faults.delay = float(value)
            except ValueError:
                raise ValueError(f"fault {name!r}: give the delay in seconds, e.g. delay=0.5") from None
        elif key in ("silent", "garbage", "drop", "stuck") and not value:
            setattr(faults, key, True)
        else:
            raise ValueError(f"unknown fault {name!r} (expected silent, garbage, drop, stuck or delay=SECONDS)")
    return faults


@contextlib.asynccontextmanager
async def serve_lines(instrument: LineInstrument, options: ServeOptions, *, crlf: bool = False) -> AsyncIterator[str]:
    """Serve a line instrument on TCP or a pty until the block ends; yields its resource string."""
    kw = {"read_termination": b"\r\n", "write_termination": b"\r\n"} if crlf else {}
    server: SimServer = PtySimServer(instrument, **kw) if options.serial else SimServer(instrument, **kw)
    server.faults = faults_of(options.faults)
    await server.start(options.host, options.port)
    try:
        yield server.resource
    finally:
        await server.close()
