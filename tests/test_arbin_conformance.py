"""Arbin CTI as the vendor's document says it, not as our simulator and driver agree: frames built byte by byte
from "ArbinCTI_Protocol v1.1" (header, dwLen, command codes, argument layouts, checksum, each feedback's result
table), served from a raw socket to our driver, and our simulator's bytes read back the document's way.

Page 1 of the document: `dwLen = Command + Command args + Checksum for requests`, `dwLen = Header + Command +
Command args + Checksum for feedback`; the checksum adds every byte before it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest

from cellbench.drivers.arbin import ArbinCTI
from cellbench.drivers.errors import InstrumentError, ProtocolError
from cellbench.simulators.arbin import ArbinServer, ArbinSim
from cellbench.simulators.cell import SolidStateCell

# THIRD_PARTY_HEADER.Token, "always contains 0x11dddddddddddddd" (page 1): a little-endian ulong, so seven 0xDD then
# 0x11 on the wire (the prose's "a first byte of 0x11" reads the number, not the wire; Arbin's captures agree)
TOKEN = struct.pack("<Q", 0x11DDDDDDDDDDDDDD)


def checksum(data: bytes) -> bytes:
    return struct.pack("<H", sum(data) & 0xFFFF)


def feedback(code: int, args: bytes) -> bytes:
    """A feedback as page 1 lays it out: header (token, dwLen of the whole frame), command, args, checksum."""
    total = 12 + 8 + len(args) + 2
    head = TOKEN + struct.pack("<I", total) + struct.pack("<II", code, 0)
    return head + args + checksum(head + args)


def login_feedback(channels: int) -> bytes:
    """THIRD_PARTY_USER_LOGIN_CMD_FEEDBACK (page 2): Result (1 = success), IP_Address[4], SN[16], Note[256], four
    wchar[1024] texts, Email wchar[64], Call wchar[16], ITAC, Version, IsAllowToControl, dwChannelLength (the
    channel count: 4 + 4 + 16 + 256 + 8192 + 128 + 32 + 12 = byte 8644 of the arguments), dwUserType, dwPicLength:
    8656 bytes of arguments, 8678 in all."""
    args = bytearray(8656)
    struct.pack_into("<I", args, 0, 1)
    args[8:24] = b"AR-0042".ljust(16, b"\0")
    struct.pack_into("<I", args, 8644, channels)
    return feedback(0xEEBA0001, bytes(args))


def channel_feedback(index: int, status: int, volts: float, amps: float) -> bytes:
    """THIRD_PARTY_GET_CHANNELS_INFO_FEEDBACK (pages 3-5) for one channel: ChannelNum 1, ChannelIndex, then
    THIRD_PARTY_STATUS_INFOMATION: Status (short), m_bCommFailure, Schedule wchar[200], Testname wchar[72],
    ExitCondition[100], StepAndCycleformat[64], Barcode wchar[72], CANCfgName and SMBCfgName wchar[200],
    MasterChannel (ushort: TestTime at byte 1665 of the arguments), TestTime and StepTime (double), Voltage,
    Current, ... (12 floats), 14 ushort counts: 1757 bytes of arguments with no aux values, 1779 in all."""
    args = bytearray(1779 - 22)
    struct.pack_into("<IIh", args, 0, 1, index, status)
    struct.pack_into("<d", args, 1665, 12.5)  # test time
    struct.pack_into("<5f", args, 1681, volts, amps, volts * amps, 1e-4, 0.0)
    return feedback(0xEEBA0003, bytes(args))


def result_feedback(code: int, index: int, result: int) -> bytes:
    """THIRD_PARTY_*_FEED_BACK: int dwIvChannelGlobalIndex, byte btResult, 101 reserved bytes (128 in all)."""
    return feedback(code, struct.pack("<iB", index, result) + bytes(101))


async def raw_cycler(answer: Callable[[int, bytes], bytes], seen: list[bytes]) -> tuple[asyncio.Server, int]:
    """A socket that reads requests the document's way (dwLen counts what follows it) and answers what
    `answer(command code, request)` gives, byte for byte."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(12)
                rest = await reader.readexactly(struct.unpack_from("<I", head, 8)[0])
                request = head + rest
                seen.append(request)
                writer.write(answer(struct.unpack_from("<I", rest, 0)[0], request))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_page_1_our_driver_logs_in_and_reads_feedbacks_whose_dwlen_is_the_whole_frame() -> None:
    """The feedback sizes of the document's structures (login 8678, channel info 1779, the others 128 bytes) with
    dwLen equal to them: our driver reads each whole and waits for nothing more (it once waited for two bytes a
    real cycler never sends, and its login timed out)."""
    seen: list[bytes] = []

    def answer(code: int, request: bytes) -> bytes:
        if code == 0xEEAB0001:
            return login_feedback(4)
        if code == 0xEEAB0003:
            only = struct.unpack_from("<h", request, 20)[0]
            chans = range(4) if only == -1 else [only]
            return b"".join(channel_feedback(c, 7 if c == 2 else 0, 3.7 + c / 100, 3.5e-4 * (c == 2)) for c in chans)
        if code == 0xBB150001:  # set meta variable: the channel is not running
            return result_feedback(0xBB510001, struct.unpack_from("<i", request, 20)[0], 0x12)
        return result_feedback(0xBB130001, 0, 0)

    server, port = await raw_cycler(answer, seen)
    assert [len(f) for f in (login_feedback(4), channel_feedback(0, 0, 3.7, 0.0), result_feedback(0, 0, 0))] == \
        [8678, 1779, 128]
    try:
        cti = await asyncio.wait_for(ArbinCTI.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="arbin", timeout=2.0,
                                                   login="admin:000000"), 5.0)
        assert cti.channels == 4 and cti.serial == "AR-0042"
        one = await cti.status(2)
        assert one.status == 7 and one.voltage == pytest.approx(3.72, abs=1e-6)
        assert one.current == pytest.approx(3.5e-4, rel=1e-6) and one.test_time == 12.5
        # OnlyChannel = -1 (page 3): one request, a feedback for every channel
        before = len(seen)
        every = await cti.statuses()
        assert len(seen) == before + 1 and [s.voltage for s in every] == pytest.approx([3.70, 3.71, 3.72, 3.73])
        assert await cti.output_is_on()  # channel 2 is charging (status 7), read in that one request
        with pytest.raises(InstrumentError, match=r"set meta variable: the channel is not running \(0x12\)"):
            await cti.set_meta_variable(1, 1, 0.5)
        await cti.close()
    finally:
        server.close()
    login, info = seen[0], seen[1]
    # the requests, as page 1 and page 2 lay them out: dwLen counts command, args and checksum
    assert login[:8] == TOKEN and struct.unpack_from("<III", login, 8) == (74, 0xEEAB0001, 0)
    assert login[20:52] == b"admin".ljust(32, b"\0") and login[52:84] == b"000000".ljust(32, b"\0")
    assert len(login) == 12 + 74 and login[-2:] == checksum(login[:-2])
    assert struct.unpack_from("<IIIhh", info, 8) == (50, 0xEEAB0003, 0, 2, 1) and len(info) == 62
    assert info[-2:] == checksum(info[:-2])


async def test_a_feedback_with_a_wrong_checksum_or_length_is_a_protocol_error() -> None:
    def bad_sum(code: int, request: bytes) -> bytes:
        good = login_feedback(2) if code == 0xEEAB0001 else channel_feedback(0, 0, 3.7, 0.0)
        return good if code == 0xEEAB0001 else good[:-2] + bytes([good[-2] ^ 0xFF, good[-1]])

    server, port = await raw_cycler(bad_sum, [])
    try:
        cti = await ArbinCTI.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="arbin", timeout=2.0, login="a:b")
        with pytest.raises(ProtocolError, match="checksum"):
            await cti.status(0)
        await cti.close()
    finally:
        server.close()
    server, port = await raw_cycler(lambda code, request: TOKEN + struct.pack("<I", 5) + bytes(8), [])
    try:
        with pytest.raises(ProtocolError, match="length"):
            await ArbinCTI.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="arbin", timeout=2.0, login="a:b")
    finally:
        server.close()


async def test_our_simulator_answers_the_documents_way() -> None:
    """The simulator's feedbacks read back with a reader written from page 1: dwLen is the frame's length and
    the checksum its last two bytes; result codes from each feedback's table (pages 6-11)."""
    sim = ArbinSim([SolidStateCell(soc=0.3) for _ in range(3)], asyncio.get_running_loop().time)
    server = await ArbinServer(sim).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    def request(code: int, args: bytes) -> bytes:
        body = struct.pack("<II", code, 0) + args
        head = TOKEN + struct.pack("<I", len(body) + 2)
        return head + body + checksum(head + body)

    async def ask(code: int, args: bytes, count: int = 1) -> list[bytes]:
        writer.write(request(code, args))
        await writer.drain()
        frames = []
        for _ in range(count):
            head = await asyncio.wait_for(reader.readexactly(12), 2.0)
            whole = head + await asyncio.wait_for(reader.readexactly(struct.unpack_from("<I", head, 8)[0] - 12), 2.0)
            assert whole[-2:] == checksum(whole[:-2])
            frames.append(whole)
        return frames

    try:
        (login,) = await ask(0xEEAB0001, b"admin".ljust(32, b"\0") + b"000000".ljust(32, b"\0"))
        assert len(login) == 8678 and struct.unpack_from("<I", login, 20)[0] == 1
        every = await ask(0xEEAB0003, struct.pack("<hhI", -1, 1, 0) + bytes(32), count=3)
        assert [len(f) for f in every] == [1779] * 3
        assert [struct.unpack_from("<I", f, 24)[0] for f in every] == [0, 1, 2]  # ChannelIndex
        # THIRD_PARTY_SET_MV_VALUE (page 11): index, MV_Type 1, MV_MetaCode (52: MV_UD1), 16 reserved, MV_ValueType 1,
        # MV_Data, 16 reserved: 52 bytes
        set_mv = struct.pack("<iii", 1, 1, 52) + bytes(16) + struct.pack("<if", 1, 0.5) + bytes(16)
        (refused,) = await ask(0xBB150001, set_mv)  # page 11: 0x12 the channel is not running
        assert len(refused) == 128 and refused[24] == 0x12
        # THIRD_PARTY_ASSIGN_SDU (page 10): index, AssignSduAll, ScheduleName wchar[200], flCapacity, ItemId
        # wchar[72], 16 floats, 32 reserved: 649 bytes
        tail = bytes(4 + 144 + 64 + 32)
        (empty,) = await ask(0xBB210001, struct.pack("<i", 1) + b"\0" + bytes(400) + tail)
        assert empty[24] == 0x12  # page 10: the schedule name is empty
        name = "Formation.sdx".encode("utf-16-le").ljust(400, b"\0")
        (assigned,) = await ask(0xBB210001, struct.pack("<i", 1) + b"\0" + name + tail)
        assert assigned[24] == 0
        # CTI_REQUEST_SCHEDULE_START (Instructions v4.5): TestName wchar[72], TotalChnToStart, the channels (ushort)
        start = "t".encode("utf-16-le").ljust(144, b"\0") + struct.pack("<IH", 1, 1)
        (started,) = await ask(0xBB320004, start)
        assert started[24] == 0 and struct.unpack_from("<i", started, 20)[0] == -1  # page 8: -1 on success
        (again,) = await ask(0xBB210001, struct.pack("<i", 1) + b"\0" + name + tail)
        assert again[24] == 0x14  # page 10: the channel is running
        bad_code = struct.pack("<iii", 1, 1, 99) + bytes(16) + struct.pack("<if", 1, 0.5) + bytes(16)
        (unknown,) = await ask(0xBB150001, bad_code)
        assert unknown[24] == 0x11  # page 11: the meta code does not exist
    finally:
        writer.close()
        await server.close()
