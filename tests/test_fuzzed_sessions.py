"""Cycler sessions against a server that answers with anything (hypothesis): the MacNet and CTI drivers either
work or raise an InstrumentFault (a ProtocolError for a frame or reply nobody should act on), never a KeyError,
a struct.error or an IndexError out of the driver. Over real loopback TCP: each example serves its replies from
an asyncio server, which closes the connection when they run out (a ConnectionLost, not a timeout)."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellbench.drivers.arbin import FEEDBACK, HEADER, ArbinCTI
from cellbench.drivers.maccor import MacNetBox
from cellbench.roles import InstrumentFault


async def _serve_replies(replies: list[bytes], read: int) -> tuple[asyncio.Server, int]:
    """A server that answers each chunk it receives with the next reply, then closes."""
    queue = list(replies)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while queue:
                if not await reader.read(read):
                    break
                writer.write(queue.pop(0))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client hung up on a reply it refused
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _session(replies: list[bytes], read: int, work: Any) -> None:
    async def main() -> None:
        server, port = await _serve_replies(replies, read)
        try:
            await work(port)
        except InstrumentFault:
            pass  # a refusal the engine knows how to handle
        finally:
            server.close()

    asyncio.run(main())


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["Stat", "RF1", "Status", "Voltage", "Current", "TestChannels", "Result",
                                         "x"]), inner, max_size=5), max_leaves=20)
MACNET_REPLY = (
    st.builds(lambda r: json.dumps({"jsonrpc": "2.0", "id": 1, "result": r}).encode() + b"\r\n", JSON)
    | st.builds(lambda n: json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
        "TestChannels": n, "Status": [{"Stat": 1, "RF1": 1}] * max(n, 0), "Voltage": [3.7] * max(n, 0),
        "Current": [0.001] * max(n, 0)}}).encode() + b"\r\n", st.integers(-2, 4))
    | st.binary(max_size=40).map(lambda b: b + b"\r\n")
    | st.just(b"[" * 5000 + b"\r\n")
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MACNET_REPLY, min_size=1, max_size=6))
def test_a_macnet_session_against_any_replies_works_or_raises_an_instrument_fault(replies: list[bytes]) -> None:
    async def work(port: int) -> None:
        box = await MacNetBox.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="box", timeout=0.2)
        try:
            await box.read_many()
            if box.channels > 0:
                await box.channel(0).output_is_on()
                await box.channel(0).measure()
        finally:
            await box.close()

    _session(replies, 65536, work)


def _frame(code: int, body: bytes) -> bytes:
    """A well-formed feedback: header, whole-frame length, code, extended code, body, checksum."""
    head = struct.pack("<QLLL", HEADER, 12 + 8 + len(body) + 2, code, 0) + body
    return head + struct.pack("<H", sum(head) & 0xFFFF)


CODES = [code for code, _ in FEEDBACK.values()]
CTI_REPLY = (
    st.builds(_frame, st.sampled_from(CODES), st.binary(max_size=64))
    | st.builds(lambda code, n: _frame(code, bytes(n)), st.sampled_from(CODES), st.sampled_from([4, 8700, 1760]))
    | st.builds(lambda code, n, tail: _frame(code, bytes(n))[:-2] + tail, st.sampled_from(CODES),
                st.sampled_from([8, 8700]), st.binary(min_size=2, max_size=2))
    | st.binary(max_size=40)
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CTI_REPLY, min_size=1, max_size=5))
def test_a_cti_session_against_any_frames_works_or_raises_an_instrument_fault(replies: list[bytes]) -> None:
    async def work(port: int) -> None:
        cti = await ArbinCTI.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="arbin", timeout=0.2, login="a:b")
        try:
            if cti.channels:
                await cti.status(0)
                await cti.stop(0)
                await cti.set_meta_variable(0, 1, 1.5)
        finally:
            await cti.close()

    _session(replies, 65536, work)


def test_a_cti_frame_with_a_wrong_checksum_or_for_another_request_is_a_protocol_error() -> None:
    """The captured frames' rules, by construction: a bad checksum, and a well-formed frame answering another
    request, are refused by name."""
    from cellbench.roles import ProtocolError

    login = _frame(FEEDBACK[0xEEAB0001][0], bytes(8700))
    said: list[str] = []
    for replies in ([login[:-2] + bytes([login[-2] ^ 1, login[-1]])], [_frame(0xBB130001, bytes(8700))]):
        async def work(port: int) -> None:
            await ArbinCTI.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="arbin", timeout=0.2, login="a:b")

        async def main(replies: list[bytes] = replies) -> None:
            server, port = await _serve_replies(replies, 65536)
            try:
                await work(port)
            except ProtocolError as exc:
                said.append(str(exc))
            finally:
                server.close()

        asyncio.run(main())
    assert len(said) == 2 and "checksum" in said[0] and "0xEEBA0001" in said[1], said
