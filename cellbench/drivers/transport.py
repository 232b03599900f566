"""Transports: a line-oriented, locked, resynchronising channel to one instrument.

Made from a VISA resource string. ``TCPIP::host::port::SOCKET`` and ``ASRL<device>::INSTR``
go through a native asyncio path by default (no thread, and fast-forwardable on the virtual
clock); everything, those included with ``backend="visa"``, can go through pyvisa with the
pyvisa-py backend, each session on its own worker thread because pyvisa blocks.

Every transport holds one lock, so a command and its reply never interleave with another
caller's. A query that times out leaves a reply owed; before the next exchange the transport
waits (up to its timeout) for that late reply and discards it, then drops anything buffered, so
a late answer never answers the next question.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

from cellbench.drivers.errors import ConnectionLost, InstrumentTimeout
from cellbench.drivers.registry import Opened, OpenRequest

log = logging.getLogger(__name__)
D = TypeVar("D")

Backend = Literal["auto", "native", "visa"]


class Transport(Protocol):
    """What a driver needs from the wire."""

    name: str
    resource: str

    async def write(self, command: str) -> None: ...

    async def query(self, command: str) -> str: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Resource:
    """A parsed VISA resource string."""

    text: str
    interface: str  # TCPIP, ASRL, GPIB, USB
    host: str = ""
    port: int = 0
    device: str = ""
    resource_class: str = "INSTR"

    @property
    def is_socket(self) -> bool:
        return self.interface == "TCPIP" and self.resource_class == "SOCKET"


_TCPIP_SOCKET = re.compile(r"^TCPIP\d*::([^:]+)::(\d+)::SOCKET$", re.IGNORECASE)
_ASRL = re.compile(r"^ASRL(.+?)(?:::INSTR)?$", re.IGNORECASE)


def parse_resource(text: str) -> Resource:
    """Split a resource string into its parts; raise ValueError naming what is wrong."""
    t = text.strip()
    if m := _TCPIP_SOCKET.match(t):
        return Resource(t, "TCPIP", host=m.group(1), port=int(m.group(2)), resource_class="SOCKET")
    if m := _ASRL.match(t):
        return Resource(t, "ASRL", device=m.group(1))
    head = t.split("::", 1)[0].upper().rstrip("0123456789")
    if head in ("TCPIP", "GPIB", "USB", "VXI", "PXI"):
        return Resource(t, head, resource_class=t.rsplit("::", 1)[-1].upper())
    raise ValueError(
        f"{text!r} is not a VISA resource string (expected e.g. TCPIP::127.0.0.1::5025::SOCKET, "
        "ASRL/dev/ttyUSB0::INSTR, GPIB0::24::INSTR)"
    )


def serial_device(device: str) -> str:
    """The OS path of an ASRL device part: ``/dev/pts/7`` stays, ``3`` becomes COM3 / /dev/ttyS2."""
    if device.startswith(("/", "COM", "com")):
        return device
    if device.isdigit():
        import sys

        return f"COM{device}" if sys.platform.startswith("win") else f"/dev/ttyS{int(device) - 1}"
    return device


class LineTransport(ABC):
    """The lock, the timeout and the resynchronisation, shared by every wire."""

    def __init__(
        self,
        name: str,
        resource: str,
        *,
        timeout: float = 5.0,
        read_termination: str = "\n",
        write_termination: str = "\n",
    ) -> None:
        self.name = name
        self.resource = resource
        self.timeout = timeout
        self.read_termination = read_termination.encode()
        self.write_termination = write_termination.encode()
        self._lock = asyncio.Lock()
        self._owed = 0  # replies of timed-out queries that may still arrive
        # stale bytes may wait on the line: before the first exchange, after a command with no reply expected
        # (one that answers all the same), after an interrupt; a completed query leaves the line clean
        self._suspect = True

    async def write(self, command: str) -> None:
        async with self._lock:
            await self._resync()
            await self._send(command.encode("ascii") + self.write_termination)
            self._suspect = True

    async def query(self, command: str) -> str:
        async with self._lock:
            if self._owed or self._suspect or self._has_buffered():  # (the common case: a clean line, no await)
                await self._resync()
            try:
                line = await self._exchange(command.encode("ascii") + self.write_termination, self.timeout)
            except TimeoutError:
                self._owed += 1
                raise InstrumentTimeout(self.name, command, self.timeout, self._partial()) from None
            return line.decode("ascii", errors="replace").strip()

    async def query_lines(
        self, command: str, until: Callable[[str], bool], timeout: float | None = None
    ) -> list[str]:
        """Send a command and read reply lines until one satisfies `until` (that line included)."""
        async with self._lock:
            await self._resync()
            await self._send(command.encode("ascii") + self.write_termination)
            return await self._read_lines(command, until, self.timeout if timeout is None else timeout)

    async def interrupt(self, command: str) -> None:
        """Send at once, past the lock: for an abort while another caller waits on a long reply."""
        self._suspect = True
        await self._send(command.encode("ascii") + self.write_termination)

    async def _read_lines(self, command: str, until: Callable[[str], bool], timeout: float) -> list[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lines: list[str] = []
        while True:
            try:
                raw = await self._receive(max(deadline - loop.time(), 0.0))
            except TimeoutError:
                self._owed += 1
                got = ("\n".join(lines).encode() + b"\n" + self._partial()) if lines else self._partial()
                raise InstrumentTimeout(self.name, command.split("\n")[0], timeout, got) from None
            line = raw.decode("ascii", errors="replace").rstrip("\r")
            lines.append(line)
            if until(line):
                return lines

    async def _resync(self) -> None:
        while self._owed:
            try:
                late = await self._receive(self.timeout)
            except TimeoutError:
                log.warning("%s: a late reply never came; the session is taken as clear", self.name)
                self._owed = 0
                break
            log.info("%s: discarded a late reply %r", self.name, late)
            self._owed -= 1
            self._suspect = True
        if self._owed == 0 and (self._suspect or self._has_buffered()):
            await self._discard_buffered()
            self._suspect = False

    def _has_buffered(self) -> bool:
        """Whether bytes are known to wait unread (where the transport can tell without waiting)."""
        return False

    async def _exchange(self, data: bytes, timeout: float) -> bytes:
        """Send one command and receive one reply (a transport may do both in one go)."""
        await self._send(data)
        return await self._receive(timeout)

    @abstractmethod
    async def _send(self, data: bytes) -> None: ...

    @abstractmethod
    async def _receive(self, timeout: float) -> bytes:
        """One reply without its terminator; TimeoutError when it does not complete in time."""

    @abstractmethod
    def _partial(self) -> bytes: ...

    @abstractmethod
    async def _discard_buffered(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> LineTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Wire(asyncio.Protocol):
    """A byte stream's receiving side: what arrives is gathered, and a waiting reader is woken when a
    terminator may have completed a line (no stream reader between: one loop pass per reply)."""

    def __init__(self, term: bytes) -> None:
        self.term = term
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: str | None = None  # why the connection is gone
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None
        self.paused = False  # reading paused: nobody was reading, and more than UNREAD_LIMIT waited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        # the terminator may straddle two chunks: look from just before this one
        if self.waiter is not None and self.buf.find(self.term, -len(data) - len(self.term) + 1) >= 0:
            _wake(self.waiter)
        elif self.waiter is None and len(self.buf) > UNREAD_LIMIT and isinstance(self.transport, asyncio.ReadTransport):
            # an instrument talking on its own with nobody reading (a fault, a flood): the kernel holds the rest
            self.transport.pause_reading()
            self.paused = True

    def resume(self) -> None:
        """Read again (a reader is about to wait, or stale bytes are being dropped)."""
        if self.paused and isinstance(self.transport, asyncio.ReadTransport):
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.lost = "the instrument closed the connection"
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = f"read failed: {exc}" if exc is not None else "the connection was closed"
        if self.waiter is not None:
            _wake(self.waiter)
        if not self.closed.done():
            self.closed.set_result(None)


UNREAD_LIMIT = 1 << 20  # bytes gathered while nobody reads, before the socket is left unread


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StreamTransport(LineTransport):
    """A native asyncio byte stream: a TCP socket, or a serial line (pyserial-asyncio-fast), read by a protocol
    of our own."""

    def __init__(self, name: str, resource: str, transport: asyncio.Transport, wire: _Wire, **kw: object) -> None:
        super().__init__(name, resource, **kw)  # type: ignore[arg-type]
        self._transport, self._wire = transport, wire

    async def _send(self, data: bytes) -> None:
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._wire.lost is not None or self._transport.is_closing():
            raise ConnectionLost(self.name, f"write failed: {self._wire.lost or 'the connection is closing'}")
        try:
            self._transport.write(data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise ConnectionLost(self.name, f"write failed: {exc}") from exc

    async def _receive(self, timeout: float) -> bytes:
        wire, term = self._wire, self.read_termination
        buf = wire.buf
        if (end := buf.find(term)) < 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (end := buf.find(term)) < 0:
                if wire.lost is not None:
                    raise ConnectionLost(self.name, wire.lost)
                if loop.time() >= deadline:
                    raise TimeoutError
                wire.waiter = loop.create_future()
                wire.resume()
                expiry = loop.call_at(deadline, _wake, wire.waiter)  # (a handle, not a task per read)
                try:
                    await wire.waiter
                finally:
                    expiry.cancel()
                    wire.waiter = None
        line = bytes(buf[:end])
        del buf[: end + len(term)]
        return line

    async def _exchange(self, data: bytes, timeout: float) -> bytes:
        self._write(data)  # (a socket's write does not wait: no coroutine for it)
        return await self._receive(timeout)

    def _partial(self) -> bytes:
        return bytes(self._wire.buf)

    def _has_buffered(self) -> bool:
        return bool(self._wire.buf)

    async def _discard_buffered(self) -> None:
        # bytes already in the kernel are stale too: one pass lets the loop see the socket readable (its read
        # runs after us in that pass), the second lets that read run; then everything is dropped
        self._wire.buf.clear()
        self._wire.resume()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self._wire.buf.clear()

    async def close(self) -> None:
        self._transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._wire.closed), 1.0)


class _Worker:
    """One thread that owns a blocking session: calls run there in order, their results come back to the loop.
    (A ThreadPoolExecutor's work items and wrapped futures cost as much as a short exchange itself.)"""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args, future = item
            loop = future.get_loop()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine, whatever it is
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.put((fn, args, future))
        return await future

    def shutdown(self) -> None:
        self._calls.put(None)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class VisaTransport(LineTransport):
    """pyvisa + pyvisa-py, the session confined to one worker thread."""

    def __init__(self, name: str, resource: str, *, baud_rate: int | None = None, **kw: object) -> None:
        super().__init__(name, resource, **kw)  # type: ignore[arg-type]
        self._executor = _Worker(f"visa-{name}")
        self._baud_rate = baud_rate
        self._session: Any = None
        self._timeout_ms = int(self.timeout * 1000)  # the session's read timeout, as last set

    async def _call(self, fn: object, *args: object) -> object:
        return await self._executor.call(fn, *args)  # type: ignore[arg-type]

    async def open(self) -> VisaTransport:
        import pyvisa

        def _open() -> object:
            rm = pyvisa.ResourceManager("@py")
            kwargs: dict[str, Any] = {
                "read_termination": self.read_termination.decode(),
                "write_termination": "",
                "timeout": int(self.timeout * 1000),
            }
            if self._baud_rate:
                kwargs["baud_rate"] = self._baud_rate
            return rm.open_resource(self.resource, **kwargs)

        try:
            self._session = await self._call(_open)
        except Exception as exc:
            self._executor.shutdown()  # its thread ends: a cable pulled for hours must not leave one per attempt
            raise ConnectionLost(self.name, f"cannot open {self.resource}: {exc}") from exc
        return self

    async def _send(self, data: bytes) -> None:
        try:
            assert self._session is not None
            await self._call(self._session.write_raw, data)
        except Exception as exc:
            raise ConnectionLost(self.name, f"write failed: {exc}") from exc

    async def _receive(self, timeout: float) -> bytes:
        return await self._exchange(b"", timeout)

    async def _exchange(self, data: bytes, timeout: float) -> bytes:
        """The write and the read in one hop to the session's thread (two hops cost as much as the exchange)."""
        import pyvisa

        def _write_read() -> bytes:
            session = self._session
            assert session is not None
            if data:
                try:
                    session.write_raw(data)
                except Exception as exc:
                    raise ConnectionLost(self.name, f"write failed: {exc}") from exc
            if self._timeout_ms != (ms := max(1, int(timeout * 1000))):  # (reading pyvisa's costs a call into
                session.timeout = self._timeout_ms = ms                   # the session: kept here)
            return bytes(session.read_raw())

        try:
            reply = await self._call(_write_read)
        except pyvisa.errors.VisaIOError as exc:
            if exc.error_code == pyvisa.constants.StatusCode.error_timeout:
                raise TimeoutError from exc
            raise ConnectionLost(self.name, f"read failed: {exc}") from exc
        except ConnectionLost:
            raise
        except Exception as exc:  # pyvisa-py lets the socket's own errors through (connection refused, reset)
            raise ConnectionLost(self.name, f"read failed: {exc}") from exc
        assert isinstance(reply, bytes)
        return reply.removesuffix(self.read_termination)

    def _partial(self) -> bytes:
        return b""

    async def _discard_buffered(self) -> None:
        with contextlib.suppress(TimeoutError, ConnectionLost):
            while True:
                await self._receive(0.02)

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._call(self._session.close)
            self._session = None
        self._executor.shutdown()


async def open_transport(
    resource: str,
    *,
    name: str | None = None,
    timeout: float = 5.0,
    read_termination: str = "\n",
    write_termination: str = "\n",
    backend: Backend = "auto",
    baud_rate: int = 9600,
) -> LineTransport:
    """Open the wire named by a VISA resource string."""
    res = parse_resource(resource)
    label = name or resource
    kw = {"timeout": timeout, "read_termination": read_termination, "write_termination": write_termination}
    native = backend == "native" or (backend == "auto" and (res.is_socket or res.interface == "ASRL"))
    if native and res.is_socket:
        term = read_termination.encode()
        try:
            sock, wire = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: _Wire(term), res.host, res.port), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(label, f"cannot connect to {res.host}:{res.port}: {exc}") from exc
        return StreamTransport(label, resource, sock, wire, **kw)
    if native and res.interface == "ASRL":
        import serial_asyncio_fast

        term = read_termination.encode()
        try:
            line, serial_wire = await serial_asyncio_fast.create_serial_connection(
                asyncio.get_running_loop(), lambda: _Wire(term), serial_device(res.device), baudrate=baud_rate)
        except Exception as exc:
            raise ConnectionLost(label, f"cannot open serial port {res.device}: {exc}") from exc
        return StreamTransport(label, resource, line, cast(_Wire, serial_wire), **kw)
    if native:
        raise ValueError(f"{resource}: no native transport for {res.interface}; use backend 'visa'")
    return await VisaTransport(label, resource, baud_rate=baud_rate if res.interface == "ASRL" else None, **kw).open()


async def open_line_driver(
    req: OpenRequest,
    make: Callable[[LineTransport], D],
    identify: Callable[[D], Awaitable[str]],
    *,
    termination: str = "\n",
) -> Opened:
    """Open a line instrument's wire, make its driver and identify it; the wire is closed if that fails."""
    transport = await open_transport(req.resource, name=req.name, timeout=req.timeout, backend=req.backend,
                                     baud_rate=req.baud_rate, read_termination=termination,
                                     write_termination=termination)
    try:
        driver = make(transport)
        return Opened(driver, await identify(driver), transport.close)
    except BaseException:
        await transport.close()
        raise
