"""Maccor cyclers over MacNet: JSON-RPC on TCP (default port 57570), binary messages on a second port (57560).

`MacNetBox` is one connection to one box; `MaccorChannel` is one of its channels as a `Cycler`, driven in
MacNet's direct mode: the host sets each channel's current and voltage, mutually limiting (6, 7)/(6, 8).
Currents on the wire are magnitudes with a mode (C charge, D discharge, R rest); here they are signed,
positive on charge, like every cellbench cycler. Rest is set with the binary (6, 8) message, as JSON
cannot set it on present MacNet versions (pymacnet's notes). `read_many` reads the status, voltage and
current of every channel of the box in three requests (4, 1), (4, 2), (4, 3), whatever their number.
Channels are 0-based on the wire. Sources: Maccor's MacNet help, pymacnet's messages.

What the help asks of a client, kept here: direct-mode commands to a channel at least 100 ms apart, and "command
sent too fast" or "direct mode not ready yet" waited out and sent again; a box with MacNetDirectModeWD set
suspends a direct-mode channel not updated within that many seconds, so the setpoint is sent again well within
it (the instrument's `watchdog` in the bench file); a box with user authentication takes nothing before a
(8, 1) log in (the instrument's `login_file`, 'user:password'), on each of its two connections; a JSON reply may
span several CR LF-ended lines (the help prints them so), read until the JSON object is whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field

from cellbench.drivers.errors import ConnectionLost, InstrumentError, InstrumentTimeout, ProtocolError
from cellbench.drivers.registry import DriverSpec, LoginSettings, Opened, OpenRequest, read_login
from cellbench.drivers.transport import parse_resource
from cellbench.profiles.units import Duration
from cellbench.roles import Reading

log = logging.getLogger(__name__)
JSON_PORT, BIN_PORT = 57570, 57560
ACTIVE, COMPLETED = 2, 4
RF1_CHARGE, RF1_DISCHARGE = 1, 2
NO_LIMIT = 65536.0  # "set outside range to ignore"
BIN_HEADER = struct.Struct("<HHHH")
BIN_DIRECT = struct.Struct("<ffffBB")
DIRECT_SPACING = 0.1  # s between two direct-mode commands to one channel ("at least 100 ms (10 ticks)")
DIRECT_RETRIES = 30  # times a "too fast" or "not ready yet" is waited out (3 s) before it is an error
BIN_TOO_FAST, BIN_NOT_READY = 3, 5  # (6, 8) binary result words
MAX_REPLY = 1_000_000  # bytes of a JSON reply not yet whole before the reply is taken as garbage


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

    def __init__(self, name: str, host: str, port: int, bin_port: int, timeout: float,
                 login: tuple[str, str] | None = None, watchdog: float | None = None) -> None:
        self.name, self.host, self.port, self.bin_port, self.timeout = name, host, port, bin_port, timeout
        self.login, self.watchdog = login, watchdog
        self._pending = b""  # bytes read past the end of the last JSON reply
        self._json: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._bin: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self.channels = 0
        self.share_window = 0.25  # s: channels sampled within it share one read of the whole box
        self._shared: tuple[float, list[ChannelReading]] | None = None
        self.refreshing: set[asyncio.Task[None]] = set()  # channels' watchdog refreshes, ended with the box
        self._reading: asyncio.Task[list[ChannelReading]] | None = None

    @classmethod
    async def open(cls, resource: str, *, name: str, timeout: float = 5.0, bin_port: int | None = None,
                   login: tuple[str, str] | None = None, watchdog: float | None = None) -> MacNetBox:
        res = parse_resource(resource)
        if not res.is_socket:
            raise ValueError(f"{resource}: a Maccor box is reached over MacNet on TCP (TCPIP::host::57570::SOCKET)")
        box = cls(name, res.host, res.port or JSON_PORT, bin_port or BIN_PORT, timeout, login, watchdog)
        try:
            box._json = await asyncio.wait_for(asyncio.open_connection(box.host, box.port), timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(name, f"cannot connect to MacNet at {box.host}:{box.port}: {exc}") from None
        if login is not None:  # (8, 1): a box with user authentication takes nothing else first
            user, password = login
            try:
                await box.call(8, 1, UserID=user, Password=password)
            except InstrumentError:
                await box.close()
                raise InstrumentError(name, ["MacNet log in refused (check the user and password)"],
                                      "(8, 1)") from None
        info = await box.call(1, 2)
        with _fields(name, "(1, 2)", info, "TestChannels"):
            box.channels = int(info.get("TestChannels", 0))
        return box

    async def close(self) -> None:
        for task in self.refreshing:
            task.cancel()
        self.refreshing.clear()
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
                reply = await asyncio.wait_for(self._reply(reader, what), self.timeout)
            except TimeoutError:
                raise InstrumentTimeout(self.name, what, self.timeout, self._pending[-200:]) from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise ConnectionLost(self.name, f"{what}: {exc}") from None
        if not isinstance(reply, dict) or "result" not in reply:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise InstrumentError(self.name, [f"MacNet error: {error or reply}"], what)
        result = reply["result"]
        if not isinstance(result, dict):
            raise ProtocolError(self.name, what, str(result)[:200], "a result object")
        if "Result" in result and result["Result"] not in ("OK", 0, "PASSED"):  # PASSED: (8, 1)
            raise InstrumentError(self.name, [f"MacNet: {result['Result']}"], what)
        return result

    async def _reply(self, reader: asyncio.StreamReader, what: str) -> Any:
        """One JSON value, however many lines (CR LF or LF) it spans; what follows it is kept for the next."""
        decoder = json.JSONDecoder()
        while True:
            text = self._pending.decode("utf-8", errors="replace").lstrip()
            if text:
                try:
                    value, end = decoder.raw_decode(text)
                except RecursionError:  # nested past the decoder's depth: no reply of MacNet's
                    self._pending = b""
                    raise ProtocolError(self.name, what, text[:200], "a JSON-RPC reply") from None
                except ValueError:
                    if not text.startswith(("{", "[")) or len(self._pending) > MAX_REPLY:
                        self._pending = b""
                        raise ProtocolError(self.name, what, text[:200], "a JSON-RPC reply") from None
                else:
                    self._pending = text[end:].encode()
                    return value
            chunk = await reader.read(65536)
            if not chunk:
                raise asyncio.IncompleteReadError(self._pending, None)
            self._pending += chunk

    async def binary(self, fclass: int, fnum: int, chan: int, payload: bytes) -> int:
        """One binary message and its result word."""
        what = f"MacNet binary ({fclass}, {fnum})"
        async with self._lock:
            try:
                if self._bin is None:
                    self._bin = await asyncio.wait_for(asyncio.open_connection(self.host, self.bin_port), self.timeout)
                    if self.login is not None:  # each connection logs in: (8, 1) with lengths before the texts
                        user, password = (t.encode("ascii", errors="replace")[:255] for t in self.login)
                        passed = await self._exchange(8, 1, 0, bytes([len(user)]) + user + bytes([len(password)])
                                                      + password)
                        if passed[:1] != b"\x01":
                            self._bin[1].close()
                            self._bin = None
                            raise InstrumentError(self.name, ["MacNet log in refused on the binary port"], "(8, 1)")
                return _word(await self._exchange(fclass, fnum, chan, payload))
            except TimeoutError:
                raise InstrumentTimeout(self.name, what, self.timeout, b"") from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                self._bin = None
                raise ConnectionLost(self.name, f"{what}: {exc}") from None

    async def _exchange(self, fclass: int, fnum: int, chan: int, payload: bytes) -> bytes:
        """One binary message on the open binary connection, and the data of its reply."""
        assert self._bin is not None
        reader, writer = self._bin
        writer.write(BIN_HEADER.pack(fclass, fnum, chan, len(payload)) + payload)
        await writer.drain()
        head = BIN_HEADER.unpack(await asyncio.wait_for(reader.readexactly(BIN_HEADER.size), self.timeout))
        return await asyncio.wait_for(reader.readexactly(head[3]), self.timeout)

    async def read_many(self, first: int = 0, count: int | None = None) -> list[ChannelReading]:
        """Status, voltage and current of `count` channels from `first`: three requests, whatever the count."""
        count = self.channels - first if count is None else count
        status = await self.call(4, 1, Chan=first, Len=count)
        volts = await self.call(4, 2, Chan=first, Len=count)
        amps = await self.call(4, 3, Chan=first, Len=count)
        with _fields(self.name, "(4, 1-3)", (status, volts, amps), f"Status, Voltage and Current of {count} channels"):
            read = [ChannelReading(int(s["Stat"]), int(s["RF1"]), float(v), _signed(float(i), int(s["RF1"])))
                    for s, v, i in zip(status["Status"], volts["Voltage"], amps["Current"], strict=True)]
            if len(read) != count:
                raise ValueError(f"{len(read)} channels")
            return read

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


@contextlib.contextmanager
def _fields(name: str, what: str, result: object, expected: str) -> Iterator[None]:
    """Fields read from a MacNet result: one that lacks them, or holds the wrong kind of value, is a ProtocolError
    (a reply nobody should act on), never a KeyError or a TypeError out of the driver."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise ProtocolError(name, what, str(result)[:200], expected) from None


def _wait_again(said: str) -> bool:
    """A direct-mode refusal that asks the client to wait and send again."""
    text = said.lower()
    return "too fast" in text or "not ready" in text


def _word(body: bytes) -> int:
    return int(struct.unpack("<H", body[:2])[0]) if len(body) >= 2 else -1


def _signed(current: float, rf1: int) -> float:
    return -abs(current) if rf1 == RF1_DISCHARGE else abs(current)


class MaccorChannel:
    """One channel of a Maccor box in direct mode, as a Cycler (current positive on charge)."""

    def __init__(self, box: MacNetBox, chan: int) -> None:
        self.box, self.chan = box, chan
        self.name = f"{box.name}/{chan}"
        self._on = False
        self._direct = False
        self._setpoint: tuple[float, float, str] | None = None  # (A, V, mode) last set; None at rest
        self._last_direct = -1e9  # loop time of the last direct-mode command to this channel
        self._refresh: asyncio.Task[None] | None = None

    async def identify(self) -> str:
        return f"{await self.box.identify()}, channel {self.chan}"

    async def setup(self, *, v_max: float = 5.0, v_min: float = 0.0, i_max: float = 1.0) -> None:
        """Reset a completed channel, set its safety limits, start direct mode at rest (no current)."""
        status = await self.box.call(4, 7, Chan=self.chan)
        with _fields(self.name, "(4, 7)", status, "Stat"):
            stat = int(status.get("Stat", 0))
        if stat == COMPLETED:
            await self.box.call(6, 5, Chan=self.chan)
        await self.box.call(6, 10, Chan=self.chan, VSafeMax=v_max, VSafeMin=v_min, ISafeChg=i_max, ISafeDis=i_max,
                            PBatSafeChg=i_max * v_max * 1.1, PBatSafeDis=i_max * v_max * 1.1)
        if stat != ACTIVE:
            await self._direct_json(7, TestName="Random", Current=0.0, Voltage=v_max, Power=NO_LIMIT, Resistance=0,
                                    CurrentRange=4, ChMode="C", DataTime=1.0, DataV=0, DataI=0)
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
        self._setpoint = (amps, volts, mode)
        await self._send_setpoint()
        self._on = True
        self._keep_alive()

    async def _send_setpoint(self) -> None:
        if self._setpoint is None:  # at rest: the binary (6, 8), as JSON cannot set rest
            await self._send_rest()
            return
        amps, volts, mode = self._setpoint
        await self._direct_json(8, Current=amps, Voltage=volts, Power=NO_LIMIT, Resistance=0,
                                CurrentRange=current_range(amps), ChMode=mode)
        self.box.forget()

    async def _direct_json(self, fnum: int, **params: Any) -> dict[str, Any]:
        """A direct-mode JSON command, 100 ms after the channel's last one; "too fast" and "not ready yet" waited
        out and sent again (the help's rules for (6, 7) and (6, 8))."""
        for attempt in range(DIRECT_RETRIES):
            await self._spaced()
            try:
                return await self.box.call(6, fnum, Chan=self.chan, **params)
            except InstrumentError as exc:
                if not _wait_again(str(exc)) or attempt == DIRECT_RETRIES - 1:
                    raise
            finally:
                self._last_direct = asyncio.get_running_loop().time()
        raise AssertionError("unreachable")

    async def _spaced(self) -> None:
        wait = self._last_direct + DIRECT_SPACING - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _rest(self) -> None:
        self._setpoint = None
        await self._send_rest()
        self._on = False

    async def _send_rest(self) -> None:
        payload = BIN_DIRECT.pack(0.0, 0.0, 0.0, 0.0, 4, ord("R"))
        for attempt in range(DIRECT_RETRIES):
            await self._spaced()
            result = await self.box.binary(6, 8, self.chan, payload)
            self._last_direct = asyncio.get_running_loop().time()
            if result not in (BIN_TOO_FAST, BIN_NOT_READY) or attempt == DIRECT_RETRIES - 1:
                break
        self.box.forget()
        if result not in (0, 2, 4):  # not active or not in direct mode: there is no output to rest
            raise InstrumentError(self.name, [f"MacNet binary rest: result {result}"], "(6, 8) rest")

    def _keep_alive(self) -> None:
        """With the box's watchdog set, the channel's setpoint is sent again every third of it while in direct
        mode, whatever the sample period, so the box never suspends the channel mid-step."""
        if self.box.watchdog is None or (self._refresh is not None and not self._refresh.done()):
            return
        self._refresh = asyncio.ensure_future(self._refreshing(self.box.watchdog / 3))
        self.box.refreshing.add(self._refresh)
        self._refresh.add_done_callback(self.box.refreshing.discard)

    async def _refreshing(self, every: float) -> None:
        while self._direct:
            await asyncio.sleep(max(every, DIRECT_SPACING))
            if asyncio.get_running_loop().time() - self._last_direct < every:
                continue  # a setpoint went out since: the box was updated
            try:
                await self._send_setpoint()
            except (InstrumentError, ConnectionLost) as exc:
                log.warning("%s: the direct-mode setpoint could not be refreshed: %s", self.name, exc)

    async def output(self, on: bool) -> None:
        if not on:
            await self._rest()

    async def output_is_on(self) -> bool:
        status = await self.box.call(4, 7, Chan=self.chan)
        with _fields(self.name, "(4, 7)", status, "Stat and RF1"):
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
        if self._refresh is not None:  # the box owns the connection; the channel its refresh
            self._refresh.cancel()


async def _open(req: OpenRequest) -> Opened:
    login = None
    if req.login_file:
        user, _, password = read_login(req.login_file, req.name).partition(":")
        login = (user, password)
    box = await MacNetBox.open(req.resource, name=req.name, timeout=req.timeout,
                               bin_port=req.binary_port, login=login, watchdog=req.watchdog)
    try:
        return Opened(box, await box.identify(), box.close)
    except BaseException:
        await box.close()
        raise


class MaccorSettings(LoginSettings):
    """A Maccor box over MacNet: its JSON port in `resource`, its binary port beside it."""

    durations: ClassVar[tuple[str, ...]] = (*LoginSettings.durations, "watchdog")
    driver: Literal["maccor"]
    binary_port: int | None = Field(default=None, gt=0, lt=65536, description="its binary MacNet port (by default "
                                                                              "57560, as on a box)")
    watchdog: Duration | None = Field(
        default=None, gt=0, description="the box's own watchdog on its setpoints (MacNetDirectModeWD): the driver "
                                        "refreshes them every third of it")

    def _own(self) -> dict[str, Any]:
        return {**super()._own(), "binary_port": self.binary_port, "watchdog": self.watchdog}


DRIVERS = [
    DriverSpec("maccor", ("cycler",), _open, "Maccor cycler box over MacNet (JSON on TCP 57570, binary on 57560)",
               simulator="cellbench.simulators.maccor:serve",
               rehearsal="cellbench.simulators.maccor:rehearse", extra={"port": JSON_PORT}, multi_channel=True,
               settings=MaccorSettings),
]
