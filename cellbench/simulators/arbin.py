"""Simulated Arbin cycler speaking CTI (the Console TCP/IP Interface): binary messages on TCP port 9031.

Schedules run on the cycler itself; the host logs in, assigns a schedule to a channel, starts and stops
it, reads the channel's status and sets its meta variables. Every message: an 8-byte header
0x11DDDDDDDDDDDDDD, a 4-byte length dwLen, a 4-byte command code, a 4-byte extended code, the body, and a
2-byte checksum (the sum of the bytes before it). As the CTI protocol document (v1.1, page 1) says and Arbin's
captured frames show, a request's dwLen counts what follows it and a feedback's the whole frame (login 8678
bytes, channel info 1779, the others 128). Result codes are the document's, per feedback. Sources: Arbin's
CTI protocol documents and the field layouts published with the Battery Data Alliance's pycti-arbin.

Whatever schedule is assigned, the simulated one (there is no schedule file interpreter) is a charge at C/10 of
the channel's cell up to 4.2 V, held there until the current falls to C/100, then ten minutes of rest, then
Finished. Meta variables steer it while it runs: MV_UD1 > 0 is the charge current in A, MV_UD2 > 0 the upper
voltage in V.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbench.simulators.box import Box
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.server import ServeOptions, StreamServers, cell_of

HEADER = 0x11DDDDDDDDDDDDDD
LOGIN, CHANNEL_INFO = 0xEEAB0001, 0xEEAB0003
ASSIGN, START, STOP, SET_MV = 0xBB210001, 0xBB320004, 0xBB310001, 0xBB150001
REPLY = {LOGIN: (0xEEBA0001, 8678), CHANNEL_INFO: (0xEEBA0003, 1779), ASSIGN: (0xBB120001, 128),
         START: (0xBB230004, 128), STOP: (0xBB130001, 128), SET_MV: (0xBB510001, 128)}
IDLE, CHARGE, REST, FINISHED = 0, 2, 4, 15  # channel status codes
FINAL_REST = 600.0  # s of rest that end the simulated schedule
MV_CODES = {52: 1, 53: 2, 54: 3, 55: 4, **{105 + k: 5 + k for k in range(12)}}  # meta code -> MV_UD number
MAX_BODY = 1_000_000


@dataclass
class ArbinChannel:
    cell: SolidStateCell
    status: int = IDLE
    schedule: str = ""
    test_name: str = ""
    test_time: float = 0.0
    step_time: float = 0.0
    current: float = 0.0
    voltage: float = 0.0
    charge_ah: float = 0.0
    discharge_ah: float = 0.0
    charge_wh: float = 0.0
    discharge_wh: float = 0.0
    meta: dict[int, float] = field(default_factory=dict)


def frame(code: int, length: int, fields: list[tuple[int, str, Any]]) -> bytes:
    """A feedback of `length` bytes in all, its checksum the last two (dwLen says `length`)."""
    body = bytearray(length - 2)
    struct.pack_into("<QLLL", body, 0, HEADER, length, code, 0)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, body, offset, value)
    return bytes(body) + struct.pack("<H", sum(body) & 0xFFFF)


def text(value: str, size: int, encoding: str = "utf-16-le") -> bytes:
    return value.encode(encoding)[:size].ljust(size, b"\0")


class ArbinSim(Box[ArbinChannel]):
    """One Arbin cycler: its channels, their cells, the CTI messages it answers, and one login."""

    name = "arbin"

    def __init__(self, cells: list[SolidStateCell], now: Callable[[], float], *, username: str = "admin",
                 password: str = "000000") -> None:
        super().__init__([ArbinChannel(cell, voltage=cell.ocv()) for cell in cells], now)
        self.username, self.password = username, password

    def _step(self, ch: ArbinChannel, dt: float) -> None:
        current = 0.0
        if ch.status == CHARGE:
            e, r = ch.cell.thevenin(dt)
            amps = ch.meta.get(1, 0.0) if ch.meta.get(1, 0.0) > 0 else 0.1 * ch.cell.params.capacity_ah
            top = ch.meta.get(2, 0.0) if ch.meta.get(2, 0.0) > 0 else 4.2
            current = min(amps, max(0.0, (top - e) / r))
            if e + current * r >= top - 1e-4 and current < 0.01 * ch.cell.params.capacity_ah:
                ch.status, current, ch.step_time = REST, 0.0, 0.0  # the simulated schedule's charge is done
        ch.voltage = ch.cell.apply_current(current, dt)
        ch.current = current
        if ch.status in (CHARGE, REST):
            ch.test_time += dt
            ch.step_time += dt
            ch.charge_ah += current * dt / 3600.0
            ch.charge_wh += current * ch.voltage * dt / 3600.0
            if ch.status == REST and ch.step_time >= FINAL_REST:
                ch.status = FINISHED

    def answer(self, code: int, body: bytes, logged_in: bool) -> tuple[bytes, bool]:
        """The reply to one message (its command code and the bytes after the length field); the login state."""
        self.advance()
        if code == LOGIN:
            user = body[8:40].split(b"\0", 1)[0].decode(errors="replace")
            password = body[40:72].split(b"\0", 1)[0].decode(errors="replace")
            ok = (user, password) == (self.username, self.password)
            result = 3 if ok and logged_in else 1 if ok else 2
            reply = frame(*REPLY[LOGIN], [(20, "<I", result), (24, "4s", b"\x7f\0\0\1"),
                                          (28, "16s", text("SIM-ARBIN-0001", 16, "ascii")),
                                          (8656, "<I", 1), (8660, "<I", 1), (8664, "<I", len(self.channels)),
                                          (8668, "<I", 1)])
            return reply, ok
        if code not in REPLY:
            return b"", logged_in  # an unknown command: no answer (the client times out)
        reply_code, length = REPLY[code]
        if not logged_in:
            return frame(reply_code, length, [(24, "c", bytes([16]))]), False
        if code == CHANNEL_INFO:
            chan = struct.unpack_from("<h", body, 8)[0]
            if chan == -1:  # OnlyChannel = -1: a feedback for every channel
                return b"".join(self._channel_info(c) for c in range(len(self.channels))), True
            return self._channel_info(chan), True
        # the channel: a 2-byte index after the test name in a start, a 4-byte one first in the others
        chan = struct.unpack_from("<H", body, 156)[0] if code == START else struct.unpack_from("<i", body, 8)[0]
        if not 0 <= chan < len(self.channels):
            return frame(reply_code, length, [(20, "<i", chan), (24, "c", bytes([16]))]), True
        ch = self.channels[chan]
        result = 0
        running = ch.status in (CHARGE, REST)
        if code == ASSIGN:
            name = body[13:413].decode("utf-16-le", errors="replace").rstrip("\0")
            result = 0x14 if running else 0x12 if not name else 0  # running; the schedule name is empty
            if not result:
                ch.schedule = name
        elif code == START:
            if running:
                result = 0x12  # running or unsafe
            elif not ch.schedule:
                result = 0x15  # no schedule assigned
            else:
                ch.test_name = body[8:152].decode("utf-16-le", errors="replace").rstrip("\0")
                ch.status, ch.test_time, ch.step_time, ch.meta = CHARGE, 0.0, 0.0, {}
                ch.charge_ah = ch.discharge_ah = ch.charge_wh = ch.discharge_wh = 0.0
        elif code == STOP:
            ch.status, ch.current = IDLE, 0.0
        elif code == SET_MV:
            meta_code = struct.unpack_from("<i", body, 16)[0]
            if not running:
                result = 0x12  # the channel is not running
            elif meta_code not in MV_CODES:
                result = 0x11  # the meta code does not exist
            else:
                ch.meta[MV_CODES[meta_code]] = struct.unpack_from("<f", body, 40)[0]
        # a start that succeeded says channel -1; every other feedback names the channel asked for
        index = -1 if code == START and result == 0 else chan
        return frame(reply_code, length, [(20, "<i", index), (24, "c", bytes([result]))]), True

    def _channel_info(self, chan: int) -> bytes:
        reply_code, length = REPLY[CHANNEL_INFO]
        if not 0 <= chan < len(self.channels):
            return frame(reply_code, length, [(20, "<I", 0), (24, "<I", max(chan, 0))])
        ch = self.channels[chan]
        return frame(reply_code, length, [
            (20, "<I", 1), (24, "<I", chan), (28, "<h", ch.status), (30, "<B", 0),
            (31, "400s", text(ch.schedule, 400)), (431, "144s", text(ch.test_name, 144)),
            (1683, "<H", chan), (1685, "<d", ch.test_time), (1693, "<d", ch.step_time),
            (1701, "<f", ch.voltage), (1705, "<f", ch.current), (1709, "<f", ch.voltage * ch.current),
            (1713, "<f", ch.charge_ah), (1717, "<f", ch.discharge_ah), (1721, "<f", ch.charge_wh),
            (1725, "<f", ch.discharge_wh), (1729, "<f", ch.cell.dc_resistance()),
        ])


async def _client(sim: ArbinSim, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    logged_in = False
    while True:
        head = await reader.readexactly(12)
        magic, length = struct.unpack("<QL", head)
        if magic != HEADER or not 8 <= length <= MAX_BODY:
            break  # not CTI: drop the connection
        body = await reader.readexactly(length)
        code = struct.unpack_from("<L", body, 0)[0]
        reply, logged_in = sim.answer(code, body, logged_in)
        if reply:
            writer.write(reply)
            await writer.drain()


class ArbinServer:
    def __init__(self, sim: ArbinSim) -> None:
        self.sim = sim
        self.host, self.port = "127.0.0.1", 0
        self._listeners = StreamServers()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> ArbinServer:
        self.host = host
        self.port = await self._listeners.listen(lambda r, w: _client(self.sim, r, w), host, port)
        return self

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    async def close(self) -> None:
        await self._listeners.close()


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated Arbin cycler for `cellbench sim serve arbin --port 9031 --login user:password`."""
    user, _, password = (options.login or "admin:000000").partition(":")
    cells = [cell_of(options) for _ in range(options.channels)]
    server = await ArbinServer(ArbinSim(cells, asyncio.get_running_loop().time, username=user,
                                        password=password)).start(options.host, options.port)
    try:
        yield f"a simulated {options.channels}-channel Arbin cycler (CTI) at {server.resource}, login {user}"
    finally:
        await server.close()


async def rehearse(r: Rehearsal) -> Rehearsed:
    """An Arbin box with a channel on each cell it is given, logged in to with the rehearsal's own credentials."""
    folder = Path(r.stack.enter_context(tempfile.TemporaryDirectory(prefix="cellbench-rehearsal-")))
    (folder / "login").write_text("rehearsal:rehearsal")
    server = ArbinServer(ArbinSim(r.cells, r.time, username="rehearsal", password="rehearsal"))
    await server.start()
    r.stack.push_async_callback(server.close)
    return Rehearsed(server.resource, host=server.sim, settings={"login_file": folder / "login"})
