"""Transports under the faults a bench meets: silence, late replies, garbage, drops, concurrent callers."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from cellbench.drivers.errors import ConnectionLost, InstrumentTimeout, ProtocolError
from cellbench.drivers.smu import Keithley2450
from cellbench.drivers.transport import Backend, open_transport, parse_resource
from cellbench.simulators.server import SimServer


def test_resource_strings_parse_into_their_parts() -> None:
    r = parse_resource("TCPIP0::127.0.0.1::5025::SOCKET")
    assert (r.interface, r.host, r.port, r.is_socket) == ("TCPIP", "127.0.0.1", 5025, True)
    assert parse_resource("ASRL/dev/pts/7::INSTR").device == "/dev/pts/7"
    assert parse_resource("GPIB0::24::INSTR").interface == "GPIB"
    with pytest.raises(ValueError, match="not a VISA resource string"):
        parse_resource("http://example")


@pytest.mark.parametrize("backend", ["native", "visa"])
async def test_an_instrument_that_stops_answering_raises_a_timeout_naming_it_and_the_command(
    smu_sim: SimServer, backend: Backend
) -> None:
    io = await open_transport(smu_sim.resource, name="cycler-3", timeout=0.3, backend=backend)
    try:
        assert "2450" in await io.query("*IDN?")
        smu_sim.faults.silent = True
        with pytest.raises(InstrumentTimeout) as info:
            await io.query(":MEAS:VOLT?")
        message = str(info.value)
        assert "cycler-3" in message and ":MEAS:VOLT?" in message and "got nothing" in message
        smu_sim.faults.silent = False
        assert "2450" in await io.query("*IDN?")  # and the session still works after
    finally:
        await io.close()


@pytest.mark.parametrize("backend", ["native", "visa"])
async def test_a_late_reply_never_answers_the_next_query(smu_sim: SimServer, backend: Backend) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=0.3, backend=backend)
    try:
        smu_sim.faults.delay = 0.5
        with pytest.raises(InstrumentTimeout):
            await io.query("*IDN?")  # its reply arrives 0.2 s after we gave up on it
        smu_sim.faults.delay = 0.0
        assert await io.query(":SOUR:FUNC?") == "VOLT"
        assert await io.query("*OPC?") == "1"
    finally:
        await io.close()


async def test_garbage_is_a_protocol_error_with_the_offending_line(smu_sim: SimServer) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=0.5)
    try:
        smu_sim.faults.garbage = True
        with pytest.raises(ProtocolError, match="garbage"):
            await Keithley2450(io).measure()
    finally:
        await io.close()


async def test_a_dropped_connection_is_reported_as_lost(smu_sim: SimServer) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=0.5)
    try:
        smu_sim.faults.drop = True
        with pytest.raises(ConnectionLost, match="closed the connection"):
            await io.query("*IDN?")
    finally:
        await io.close()


async def test_nobody_listening_is_reported_with_the_address() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionLost, match=f"127.0.0.1:{port}"):
        await open_transport(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout=0.5)


async def test_failed_visa_opens_leave_no_thread_behind() -> None:
    """A pulled cable: the bench retries opening for hours; each failed VISA attempt's session thread ends."""
    import threading

    for _ in range(5):
        with pytest.raises(ConnectionLost, match="cannot open"):
            await open_transport("ASRL/dev/cellbench-unplugged::INSTR", name="gone", timeout=0.5, backend="visa")
    await asyncio.sleep(0.2)
    assert [t.name for t in threading.enumerate() if t.name == "visa-gone"] == []


async def test_concurrent_callers_never_get_each_others_replies(smu_sim: SimServer) -> None:
    io = await open_transport(smu_sim.resource, name="smu", timeout=2.0)
    try:
        await io.write(":SOUR:CURR:VLIM 4.2")

        async def ask(command: str, expected: str) -> None:
            for _ in range(20):
                assert await io.query(command) == expected

        await asyncio.gather(
            ask("*IDN?", smu_sim.instrument.idn),  # type: ignore[attr-defined]
            ask(":SOUR:CURR:VLIM?", "4.200000E+00"),
            ask("*OPC?", "1"),
            ask(":SYST:ERR?", '0,"No error;0;0 0"'),
        )
    finally:
        await io.close()


@pytest.mark.parametrize("backend", ["native", "visa"])
async def test_bytes_that_arrived_unread_before_the_first_query_never_answer_it(backend: Backend) -> None:
    """An instrument that says something on its own as the session opens (a greeting, the end of an earlier
    session's reply) while the loop is busy elsewhere: those bytes wait in the kernel, unread, when the first
    query goes out. They are stale, and the query gets its own reply."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    arrived = threading.Event()

    def instrument() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"STALE greeting\n")
            arrived.set()
            for line in lines:
                conn.sendall(b"reply to " + line)

    threading.Thread(target=instrument, daemon=True).start()
    io = await open_transport(f"TCPIP::127.0.0.1::{port}::SOCKET", name="smu", timeout=2, backend=backend)
    try:
        assert arrived.wait(5)
        time.sleep(0.2)  # noqa: ASYNC251  (the loop busy elsewhere, on purpose: the greeting is in, unread)
        assert await io.query("*IDN?") == "reply to *IDN?"
        assert await io.query(":MEAS:VOLT?") == "reply to :MEAS:VOLT?"
    finally:
        await io.close()
        listener.close()


async def test_an_instrument_that_floods_while_nobody_reads_does_not_fill_the_memory() -> None:
    """Bytes with no end of line pour in between queries (a fault, a hostile peer): past a bound the socket is
    left unread (the kernel and the sender wait), rather than the controller's memory taking them all."""
    import socket
    import threading

    from cellbench.drivers import transport

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sent = [0]

    def instrument() -> None:
        conn, _ = listener.accept()
        conn.settimeout(2.0)
        with conn, contextlib.suppress(OSError):
            while sent[0] < 64 << 20:  # it stops when it can no longer send (the reader left it unread)
                sent[0] += conn.send(b"x" * 65536)

    threading.Thread(target=instrument, daemon=True).start()
    io = await open_transport(f"TCPIP::127.0.0.1::{port}::SOCKET", name="smu", timeout=1, backend="native")
    try:
        await asyncio.sleep(1.5)
        held = len(io._wire.buf)  # type: ignore[attr-defined]
        assert sent[0] > 2 * transport.UNREAD_LIMIT  # it did flood
        assert held <= transport.UNREAD_LIMIT + (1 << 18), held
        assert sent[0] < 64 << 20  # and it was held back: the rest never left the sender
    finally:
        await io.close()
        listener.close()
