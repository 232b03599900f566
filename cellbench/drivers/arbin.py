"""Arbin cyclers over CTI (the Console TCP/IP Interface), binary messages on TCP port 9031.

`ArbinCTI` is one logged-in connection to one cycler: channel status (readings), assigning a schedule,
starting and stopping it, setting meta variables. Schedules run on the cycler: CTI has no host-driven
setpoints, so `ArbinChannel` (a channel as a `Cycler` and `OnBoard`) starts schedules, steers them through
meta variables, reads and stops, but refuses a current or a voltage in one line.

Frame (CTI protocol document v1.1, page 1): 0x11DDDDDDDDDDDDDD, a 4-byte length `dwLen`, command code, extended
code, body, a 2-byte checksum (sum of the bytes before it). A request's dwLen counts what follows it (command,
arguments, checksum); a feedback's counts the whole frame, header included, as Arbin's captured feedback frames
show (pycti-arbin's spoofer packs two bytes more; its client reads the document's way). Login from the
instrument's `login_file` in the bench file ('user:password') or $ARBIN_CTI_USERNAME / $ARBIN_CTI_PASSWORD.
Sources: Arbin's CTI documents, pycti-arbin's field layouts.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass
from typing import Literal

from cellbench.drivers.errors import ConnectionLost, InstrumentError, InstrumentTimeout, ProtocolError
from cellbench.drivers.registry import DriverSpec, LoginSettings, Opened, OpenRequest, read_login
from cellbench.drivers.transport import parse_resource
from cellbench.roles import Reading

HEADER = 0x11DDDDDDDDDDDDDD
LOGIN, CHANNEL_INFO, ASSIGN, START, STOP, SET_MV = (0xEEAB0001, 0xEEAB0003, 0xBB210001, 0xBB320004, 0xBB310001,
                                                    0xBB150001)
# channel status codes in which no schedule runs: Idle, Unsafe, Error, Finished, Empty, Idle from MCU; in every
# other one (charge, rest, transition, start, pause, go stop, ...) a schedule is under way and may source
STOPPED = {0: "Idle", 8: "Unsafe", 14: "Error", 15: "Finished", 19: "Empty", 20: "Idle from MCU"}
FAULTED = (8, 14)
MV_CODES = {1: 52, 2: 53, 3: 54, 4: 55, **{5 + k: 105 + k for k in range(12)}}
# each feedback's result codes, as the CTI protocol document (v1.1) tables them
RESULTS = {
    "assign schedule": {0x10: "the channel does not exist", 0x11: "the monitor window is in use",
                        0x12: "the schedule name is empty", 0x13: "the schedule was not found",
                        0x14: "the channel is running", 0x15: "the channel is downloading another schedule",
                        0x16: "a batch file is open", 0x17: "the assignment failed"},
    "start": {0x10: "invalid channel index", 0x11: "someone controls the monitor window (Start/Resume is open)",
              0x12: "the channel is running or unsafe", 0x13: "the channel is not connected to its DAQ",
              0x14: "the schedule does not fit the system's configuration", 0x15: "no schedule assigned",
              0x16: "the schedule's version does not match MITS"},
    "stop": {0x10: "the channel does not exist", 0x11: "someone else controls the monitor window"},
    "set meta variable": {0x10: "setting the meta variable failed", 0x11: "no such meta code",
                          0x12: "the channel is not running", 0x13: "no such meta code in MITS Pro 7"},
}
MAX_FEEDBACK = 1_000_000  # bytes: the longest feedback is a few kB (login 8678)
# each request's feedback: its command code (the captured frames': the request's second byte, nibbles swapped) and
# the shortest frame that holds every field read from it (login: the channel count at 8664; channel info: the
# readings at 1701-1720; the others: the result at 24), checksum included
FEEDBACK = {LOGIN: (0xEEBA0001, 8670), CHANNEL_INFO: (0xEEBA0003, 1723), ASSIGN: (0xBB120001, 27),
            START: (0xBB230004, 27), STOP: (0xBB130001, 27), SET_MV: (0xBB510001, 27)}


def message(code: int, size: int, fields: list[tuple[int, str, object]]) -> bytes:
    """A request of `size` bytes after the length field (as CTI counts it), checksum included."""
    body = bytearray(12 + size - 2)
    struct.pack_into("<QLLL", body, 0, HEADER, size, code, 0)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, body, offset, value)
    return bytes(body) + struct.pack("<H", sum(body) & 0xFFFF)


@dataclass(frozen=True)
class ChannelStatus:
    status: int
    test_time: float
    voltage: float
    current: float
    charge_ah: float
    discharge_ah: float


class ArbinCTI:
    model = "Arbin cycler (CTI)"

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.name, self.timeout = name, timeout
        self._reader, self._writer = reader, writer
        self._lock = asyncio.Lock()
        self.channels = 0
        self.serial = ""

    @classmethod
    async def open(cls, resource: str, *, name: str, timeout: float = 5.0, login: str | None = None) -> ArbinCTI:
        res = parse_resource(resource)
        if not res.is_socket:
            raise ValueError(f"{resource}: an Arbin cycler is reached by CTI on TCP (TCPIP::host::9031::SOCKET)")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(res.host, res.port or 9031), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(name, f"cannot connect to CTI at {res.host}:{res.port}: {exc}") from None
        cti = cls(name, reader, writer, timeout)
        user, _, password = (login or f"{os.environ.get('ARBIN_CTI_USERNAME', '')}:"
                                      f"{os.environ.get('ARBIN_CTI_PASSWORD', '')}").partition(":")
        reply = await cti.ask(message(LOGIN, 74, [(20, "32s", user.encode()), (52, "32s", password.encode())]))
        result = struct.unpack_from("<I", reply, 20)[0]
        if result not in (1, 3):
            await cti.close()
            raise InstrumentError(name, ["CTI login refused (check the user and password)"], "login")
        cti.serial = reply[28:44].split(b"\0", 1)[0].decode("ascii", errors="replace")
        cti.channels = struct.unpack_from("<I", reply, 8664)[0]
        return cti

    async def close(self) -> None:
        self._writer.close()

    async def identify(self) -> str:
        return f"{self.model} {self.serial}, {self.channels} channels"

    async def ask(self, request: bytes, feedbacks: int = 1) -> bytes:
        """Send one message and read its feedback whole (`feedbacks` of them, for a request about every
        channel); the last one is returned, all of them by `ask_all`."""
        return (await self.ask_all(request, feedbacks))[-1]

    async def ask_all(self, request: bytes, feedbacks: int = 1) -> list[bytes]:
        expected = FEEDBACK.get(struct.unpack_from("<L", request, 12)[0])
        async with self._lock:
            try:
                self._writer.write(request)
                await self._writer.drain()
                return [await self._feedback(expected) for _ in range(max(feedbacks, 1))]
            except TimeoutError:
                raise InstrumentTimeout(self.name, "CTI", self.timeout, b"") from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise ConnectionLost(self.name, f"CTI: {exc}") from None

    async def _feedback(self, expected: tuple[int, int] | None = None) -> bytes:
        """One feedback frame: its dwLen counts the whole frame, checksum included; the checksum is checked, and
        (`expected`) that it answers the request, long enough for the fields read from it. A frame that is not is
        a ProtocolError: never a field read out of bounds."""
        head = await asyncio.wait_for(self._reader.readexactly(12), self.timeout)
        magic, length = struct.unpack("<QL", head)
        if magic != HEADER or not 22 <= length <= MAX_FEEDBACK:
            raise ProtocolError(self.name, "CTI", head.hex(), "a CTI header with a feedback's length")
        frame = head + await asyncio.wait_for(self._reader.readexactly(length - 12), self.timeout)
        if struct.unpack_from("<H", frame, length - 2)[0] != sum(frame[:-2]) & 0xFFFF:
            raise ProtocolError(self.name, "CTI", frame[-2:].hex(), "the frame's checksum")
        if expected is not None:
            code, shortest = expected
            if struct.unpack_from("<L", frame, 12)[0] != code or length < shortest:
                raise ProtocolError(self.name, "CTI", frame[:24].hex(),
                                    f"a feedback 0x{code:08X} of at least {shortest} bytes")
        return frame

    async def status(self, chan: int) -> ChannelStatus:
        return _channel_status(self.name, await self.ask(message(CHANNEL_INFO, 50, [(20, "<h", chan),
                                                                                   (22, "<h", 1)])), chan)

    async def statuses(self) -> list[ChannelStatus]:
        """Every channel's status in one request (OnlyChannel = -1: a feedback per channel)."""
        replies = await self.ask_all(message(CHANNEL_INFO, 50, [(20, "<h", -1), (22, "<h", 1)]), self.channels)
        by_index = sorted(replies, key=lambda reply: struct.unpack_from("<I", reply, 24)[0])  # ChannelIndex
        return [_channel_status(self.name, reply, chan) for chan, reply in enumerate(by_index)]

    async def _command(self, request: bytes, what: str) -> None:
        result = (await self.ask(request))[24]
        if result != 0:
            said = RESULTS[what].get(result, f"result 0x{result:02X}")
            raise InstrumentError(self.name, [f"CTI {what}: {said} (0x{result:02X})"], what)

    async def assign_schedule(self, chan: int, schedule: str) -> None:
        await self._command(message(ASSIGN, 659, [(20, "<i", chan), (25, "400s", schedule.encode("utf-16-le"))]),
                            "assign schedule")

    async def start(self, chan: int, test_name: str) -> None:
        await self._command(message(START, 160, [(20, "144s", test_name.encode("utf-16-le")), (164, "<I", 1),
                                                 (168, "<H", chan)]), "start")

    async def stop(self, chan: int) -> None:
        await self._command(message(STOP, 116, [(20, "<I", chan)]), "stop")

    async def set_meta_variable(self, chan: int, number: int, value: float) -> None:
        if number not in MV_CODES:
            raise ValueError(f"meta variable {number} is not 1 to 16")
        await self._command(message(SET_MV, 62, [(20, "<I", chan), (24, "<i", 1), (28, "<i", MV_CODES[number]),
                                                 (48, "<i", 1), (52, "<f", value)]), "set meta variable")

    async def output(self, on: bool) -> None:
        """Stop every running channel (what a guardian or a connect-time check does): one status request for all."""
        for chan, st in enumerate(await self.statuses()):
            if st.status not in STOPPED:
                await self.stop(chan)

    async def output_is_on(self) -> bool:
        return any(st.status not in STOPPED for st in await self.statuses())

    def channel(self, number: int) -> ArbinChannel:
        if not 0 <= number < self.channels:
            raise ValueError(f"{self.name} has channels 0 to {self.channels - 1}, not {number}")
        return ArbinChannel(self, number)


def _channel_status(name: str, reply: bytes, chan: int) -> ChannelStatus:
    if struct.unpack_from("<I", reply, 20)[0] < 1:
        raise InstrumentError(name, [f"no channel {chan}"], "channel info")
    status = struct.unpack_from("<h", reply, 28)[0]
    test_time = struct.unpack_from("<d", reply, 1685)[0]
    v, i, _, qc, qd = struct.unpack_from("<5f", reply, 1701)
    return ChannelStatus(status, test_time, v, i, qc, qd)


class ArbinChannel:
    """One channel of an Arbin as a Cycler: it reads and stops; its schedule is the cycler's."""

    def __init__(self, cti: ArbinCTI, chan: int) -> None:
        self.cti, self.chan, self.name = cti, chan, f"{cti.name}/{chan}"
        self._read: ChannelStatus | None = None  # the status the last measure() read, until it is used once

    async def identify(self) -> str:
        return f"{await self.cti.identify()}, channel {self.chan}"

    async def source_current(self, amps: float, *, voltage_limit: float) -> None:
        raise InstrumentError(self.name, ["an Arbin runs its own schedules: CTI sets no current from the host"],
                              "source current")

    async def source_voltage(self, volts: float, *, current_limit: float) -> None:
        raise InstrumentError(self.name, ["an Arbin runs its own schedules: CTI sets no voltage from the host"],
                              "source voltage")

    async def output(self, on: bool) -> None:
        if not on:
            await self.cti.stop(self.chan)

    async def output_is_on(self) -> bool:
        return (await self.cti.status(self.chan)).status not in STOPPED

    async def start_schedule(self, name: str, *, test_name: str, variables: dict[int, float]) -> None:
        """Assign the schedule, start it under the test's name, then set its meta variables (CTI sets them on a
        running channel only)."""
        await self.cti.assign_schedule(self.chan, name)
        await self.cti.start(self.chan, test_name)
        for number, value in sorted(variables.items()):
            await self.cti.set_meta_variable(self.chan, number, value)

    async def set_variable(self, number: int, value: float) -> None:
        await self.cti.set_meta_variable(self.chan, number, value)

    async def schedule_running(self) -> bool:
        """From the status the sample's own measure() just read (one request per sample), else a new read."""
        read, self._read = self._read, None
        status = (read or await self.cti.status(self.chan)).status
        if status in FAULTED:
            raise InstrumentError(self.name, [f"the cycler stopped the schedule: channel status {STOPPED[status]}"],
                                  "channel info")
        return status not in STOPPED

    async def measure(self) -> Reading:
        status = self._read = await self.cti.status(self.chan)
        return Reading(status.voltage, status.current)


async def _open(req: OpenRequest) -> Opened:
    login = read_login(req.login_file, req.name) if req.login_file else None
    cti = await ArbinCTI.open(req.resource, name=req.name, timeout=req.timeout, login=login)
    try:
        return Opened(cti, await cti.identify(), cti.close)
    except BaseException:
        await cti.close()
        raise


class ArbinSettings(LoginSettings):
    """An Arbin cycler over CTI (MITS Pro's console port)."""

    driver: Literal["arbin"]


DRIVERS = [
    DriverSpec("arbin", ("cycler",), _open, "Arbin cycler over CTI (TCP 9031): reads, schedules, meta variables",
               simulator="cellbench.simulators.arbin:serve",
               rehearsal="cellbench.simulators.arbin:rehearse", extra={"port": 9031}, multi_channel=True,
               runs_schedules=True, host_driven=False, settings=ArbinSettings),
]
