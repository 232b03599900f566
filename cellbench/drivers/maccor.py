"""Maccor cyclers over MacNet: JSON-RPC on TCP (default port 57570), binary messages on a second port (57560).

`MacNetBox` is one connection to one box; `MaccorChannel` is one of its channels as a `Cycler`, driven in
MacNet's direct mode: the host sets each channel's current and voltage, mutually limiting (6, 7)/(6, 8).
Currents on the wire are magnitudes with a mode (C charge, D discharge, R rest); here they are signed,
positive on charge, like every cellbench cycler. Rest is set with the binary (6, 8) message, as JSON
cannot set it on present MacNet versions (pymacnet's notes). `read_many` reads the status, voltage and
current of every channel of the box in three requests (4, 1), (4, 2), (4, 3), whatever their number.
Channels are 0-based on the wire. Sources: Maccor's MacNet help, pymacnet's messages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any

from cellbench.bench.roles import Reading
from cellbench.drivers.errors import ConnectionLost, InstrumentError, InstrumentTimeout, ProtocolError
from cellbench.drivers.registry import DriverSpec, Opened, OpenRequest
from cellbench.drivers.transport import parse_resource

JSON_PORT, BIN_PORT = 57570, 57560
ACTIVE, COMPLETED = 2, 4
RF1_CHARGE, RF1_DISCHARGE = 1, 2
NO_LIMIT = 65536.0  # "set outside range to ignore"
BIN_HEADER = struct.Struct("<HHHH")
BIN_DIRECT = struct.Struct("<ffffBB")


def current_range(amps: float) -> int:
    """MacNet's current range for a current (1 to 4), as pymacnet picks it."""
    a = abs(amps)
    return 4 if a == 0 else 1 if a < 150e-6 else 2 if a < 5e-3 else 3 if a < 0.150 else 4


@dataclass(frozen=True)
class ChannelReading:
    stat: int
    rf1: int
    voltage: float
    current: float  # signed, positive on charge


class MacNetBox:
    """One Maccor box: a JSON connection (and a binary one opened when first needed), one request at a time."""

    model = "Maccor cycler (MacNet)"

    def __init__(self, name: str, host: str, port: int, bin_port: int, timeout: float) -> None:
        self.name, self.host, self.port, self.bin_port, self.timeout = name, host, port, bin_port, timeout
        self._json: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._bin: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self.channels = 0
        self.share_window = 0.25  # s: channels sampled within it share one read of the whole box
        self._shared: tuple[float, list[ChannelReading]] | None = None
        self._reading: asyncio.Task[list[ChannelReading]] | None = None

    @classmethod
    async def open(cls, resource: str, *, name: str, timeout: float = 5.0, bin_port: int | None = None) -> MacNetBox:
        res = parse_resource(resource)
        if not res.is_socket:
            raise ValueError(f"{resource}: a Maccor box is reached over MacNet on TCP (TCPIP::host::57570::SOCKET)")
        box = cls(name, res.host, res.port or JSON_PORT, bin_port or BIN_PORT, timeout)
        try:
            box._json = await asyncio.wait_for(asyncio.open_connection(box.host, box.port), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(name, f"cannot connect to MacNet at {box.host}:{box.port}: {exc}") from None
        info = await box.call(1, 2)
        box.channels = int(info.get("TestChannels", 0))
        return box

    async def close(self) -> None:
        for link in (self._json, self._bin):
            if link is not None:
                link[1].close()
        self._json = self._bin = None

    async def identify(self) -> str:
        version = await self.call(1, 1)
        return (f"{self.model}, {self.channels} channels, MacTest32 {version.get('MacTest32EXEversionMajor')}."
                f"{version.get('MacTest32EXEversionMinor')}")

    async def call(self, fclass: int, fnum: int, **params: Any) -> dict[str, Any]:
        """One JSON-RPC request and its result; a MacNet 'Result' other than OK is an InstrumentError."""
        what = f"MacNet ({fclass}, {fnum})"
        request = {"jsonrpc": "2.0", "method": "MacNet", "params": {"FClass": fclass, "FNum": fnum, **params},
                   "id": next(self._ids)}
        async with self._lock:
            if self._json is None:
                raise ConnectionLost(self.name, "the MacNet connection is closed")
            reader, writer = self._json
            try:
                writer.write(json.dumps(request).encode() + b"\r\n")
                await writer.drain()
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.timeout)
            except TimeoutError:
                raise InstrumentTimeout(self.name, what, self.timeout, b"") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise ConnectionLost(self.name, f"{what}: {exc}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise ProtocolError(self.name, what, raw.decode(errors="replace")[:200], "a JSON-RPC reply") from None
        if not isinstance(reply, dict) or "result" not in reply:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise InstrumentError(self.name, [f"MacNet error: {error or reply}"], what)
        result = reply["result"]
        if not isinstance(result, dict):
            raise ProtocolError(self.name, what, str(result)[:200], "a result object")
        if "Result" in result and result["Result"] not in ("OK", 0):
            raise InstrumentError(self.name, [f"MacNet: {result['Result']}"], what)
        return result

    async def binary(self, fclass: int, fnum: int, chan: int, payload: bytes) -> int:
        """One binary message and its result word."""
        what = f"MacNet binary ({fclass}, {fnum})"
        async with self._lock:
            try:
                if self._bin is None:
                    self._bin = await asyncio.wait_for(asyncio.open_connection(self.host, self.bin_port), self.timeout)
                reader, writer = self._bin
                writer.write(BIN_HEADER.pack(fclass, fnum, chan, len(payload)) + payload)
                await writer.drain()
                head = BIN_HEADER.unpack(await asyncio.wait_for(reader.readexactly(BIN_HEADER.size), self.timeout))
                body = await asyncio.wait_for(reader.readexactly(head[3]), self.timeout)
            except TimeoutError:
                raise InstrumentTimeout(self.name, what, self.timeout, b"") from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                self._bin = None
                raise ConnectionLost(self.name, f"{what}: {exc}") from None
        return int(struct.unpack("<H", body[:2])[0]) if len(body) >= 2 else -1

    async def read_many(self, first: int = 0, count: int | None = None) -> list[ChannelReading]:
        """Status, voltage and current of `count` channels from `first`: three requests, whatever the count."""
        count = self.channels - first if count is None else count
        status = (await self.call(4, 1, Chan=first, Len=count))["Status"]
        volts = (await self.call(4, 2, Chan=first, Len=count))["Voltage"]
        amps = (await self.call(4, 3, Chan=first, Len=count))["Current"]
        return [ChannelReading(int(s["Stat"]), int(s["RF1"]), float(v), _signed(float(i), int(s["RF1"])))
                for s, v, i in zip(status, volts, amps, strict=True)]

    async def shared_read(self) -> list[ChannelReading]:
        """Every channel's reading, read once for all the channels that ask within `share_window` seconds: N
        channels sampled each period cost three requests to the box, not N. The read is a task of its own:
        one channel cancelled mid-read (its run stopped) does not cancel the read the others wait for."""
        loop = asyncio.get_running_loop()
        if self._reading is None:
            if self._shared is not None and loop.time() - self._shared[0] <= self.share_window:
                return self._shared[1]
            self._reading = asyncio.ensure_future(self._read_and_share())
        return await asyncio.shield(self._reading)

    async def _read_and_share(self) -> list[ChannelReading]:
        try:
            readings = await self.read_many()
            self._shared = (asyncio.get_running_loop().time(), readings)
            return readings
        finally:
            self._reading = None

    def forget(self) -> None:
        """A setpoint changed: the next read is a fresh one."""
        self._shared = None

    async def output(self, on: bool) -> None:
        """Every channel of the box that is sourcing, to rest (what a guardian or a connect-time check does)."""
        if on:
            raise ValueError("a box's outputs are turned on channel by channel")
        for k, reading in enumerate(await self.read_many()):
            if reading.stat == ACTIVE and reading.current != 0:
                await self.channel(k).output(False)

    async def output_is_on(self) -> bool:
        """Whether any channel of the box sources or sinks current."""
        return any(r.stat == ACTIVE and r.current != 0 for r in await self.read_many())

    def channel(self, number: int) -> MaccorChannel:
        """Channel `number` (0-based, as on the wire) as a Cycler."""
        if not 0 <= number < self.channels:
            raise ValueError(f"{self.name} has channels 0 to {self.channels - 1}, not {number}")
        return MaccorChannel(self, number)


def _signed(current: float, rf1: int) -> float:
    return -abs(current) if rf1 == RF1_DISCHARGE else abs(current)


class MaccorChannel:
    """One channel of a Maccor box in direct mode, as a Cycler (current positive on charge)."""

    def __init__(self, box: MacNetBox, chan: int) -> None:
        self.box, self.chan = box, chan
        self.name = f"{box.name}/{chan}"
        self._on = False
        self._direct = False

    async def identify(self) -> str:
        return f"{await self.box.identify()}, channel {self.chan}"

    async def setup(self, *, v_max: float = 5.0, v_min: float = 0.0, i_max: float = 1.0) -> None:
        """Reset a completed channel, set its safety limits, start direct mode at rest (no current)."""
        status = await self.box.call(4, 7, Chan=self.chan)
        if int(status.get("Stat", 0)) == COMPLETED:
            await self.box.call(6, 5, Chan=self.chan)
        await self.box.call(6, 10, Chan=self.chan, VSafeMax=v_max, VSafeMin=v_min, ISafeChg=i_max, ISafeDis=i_max,
                            PBatSafeChg=i_max * v_max * 1.1, PBatSafeDis=i_max * v_max * 1.1)
        if int(status.get("Stat", 0)) != ACTIVE:
            await self.box.call(6, 7, Chan=self.chan, TestName="Random", Current=0.0, Voltage=v_max,
                                Power=NO_LIMIT, Resistance=0, CurrentRange=4, ChMode="C", DataTime=1.0, DataV=0,
                                DataI=0)
        self._direct = True

    async def source_current(self, amps: float, *, voltage_limit: float) -> None:
        """Charge (amps > 0) up to voltage_limit then hold it; discharge without a floor (the engine's limits end
        the step); zero rests."""
        if amps == 0:
            await self._rest()
            return
        mode, limit = ("C", voltage_limit) if amps > 0 else ("D", 0.0)
        await self._set(abs(amps), limit, mode)

    async def source_voltage(self, volts: float, *, current_limit: float) -> None:
        """Hold a voltage with the current mutually limited: charging toward it from below, discharging from above."""
        reading = await self.measure()
        await self._set(abs(current_limit), volts, "C" if volts >= reading.voltage else "D")

    async def _set(self, amps: float, volts: float, mode: str) -> None:
        if not self._direct:  # the first setpoint of a run starts direct mode on the channel
            await self.setup(v_max=max(volts, 5.0), v_min=0.0, i_max=max(amps * 1.5, 0.01))
        await self.box.call(6, 8, Chan=self.chan, Current=amps, Voltage=volts, Power=NO_LIMIT, Resistance=0,
                            CurrentRange=current_range(amps), ChMode=mode)
        self.box.forget()
        self._on = True

    async def _rest(self) -> None:
        payload = BIN_DIRECT.pack(0.0, 0.0, 0.0, 0.0, 4, ord("R"))
        result = await self.box.binary(6, 8, self.chan, payload)
        self.box.forget()
        if result not in (0, 2, 4):  # not active or not in direct mode: there is no output to rest
            raise InstrumentError(self.name, [f"MacNet binary rest: result {result}"], "(6, 8) rest")
        self._on = False

    async def output(self, on: bool) -> None:
        if not on:
            await self._rest()

    async def output_is_on(self) -> bool:
        status = await self.box.call(4, 7, Chan=self.chan)
        return int(status["Stat"]) == ACTIVE and int(status["RF1"]) in (RF1_CHARGE, RF1_DISCHARGE)

    async def status(self) -> Reading:
        """This channel alone, by its full status (4, 7)."""
        status = await self.box.call(4, 7, Chan=self.chan)
        try:
            return Reading(float(status["Voltage"]), _signed(float(status["Current"]), int(status["RF1"])))
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(self.name, "(4, 7)", str(status)[:200], "a status with Voltage and Current") from None

    async def measure(self) -> Reading:
        """This channel's voltage and current from the box's shared read (see MacNetBox.shared_read)."""
        reading = (await self.box.shared_read())[self.chan]
        return Reading(reading.voltage, reading.current)

    async def close(self) -> None:
        return None  # the box owns the connection


async def _open(req: OpenRequest) -> Opened:
    box = await MacNetBox.open(req.resource, name=req.name, timeout=req.timeout,
                               bin_port=req.address if req.address else None)
    try:
        return Opened(box, await box.identify(), box.close)
    except BaseException:
        await box.close()
        raise


DRIVERS = [
    DriverSpec("maccor", ("cycler",), _open, "Maccor cycler box over MacNet (JSON on TCP 57570, binary on 57560)",
               simulator="cellbench.simulators.maccor:serve", extra={"port": JSON_PORT}, multi_channel=True),
]
