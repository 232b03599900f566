"""Simulated Maccor cycler box speaking MacNet: JSON-RPC on one TCP port, binary messages on another.

Each of its channels (8 by default) has its own simulated cell. Direct mode (6, 7)/(6, 8) sets a
channel's current, voltage and mode, mutually limiting as the manual says: charging at a current until
the voltage reaches its setting, then holding it; discharging at a current down to the voltage setting.
Readings and status come one channel at a time (4, 7) or many per request (4, 1), (4, 2), (4, 3).
JSON requests may arrive with or without line ends and indented; every reply is indented over several CR LF-ended
lines, as the help prints them. Channels are 0-based on the wire. As strict as the help: a direct-mode (6, 8)
less than 100 ms after the channel's last direct-mode command is refused ("command sent too fast", binary 3), and
one within DIRECT_READY_S of its (6, 7) too ("direct mode is not ready yet", 5); with a watchdog
(MacNetDirectModeWD) a direct-mode channel not updated within it is suspended; with a login set, nothing but
(8, 1) is taken on a connection before it logs in; binary function class 0 echoes the message.
Sources: Maccor's MacNet help ("Remote Control - MacNet", shipped in the
pymacnet repository) and pymacnet's messages. Limits of the model: a test started with a procedure
(6, 2) is accepted and runs at rest (no schedule interpreter); no data files, no archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cellbench.simulators.box import Box
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.server import ServeOptions, StreamServers, cell_of

AVAILABLE, ACTIVE, SUSPENDED, COMPLETED, PROBLEM = 0, 2, 3, 4, 5  # Stat codes (4, 1)
RF1_CHARGE, RF1_DISCHARGE, RF1_REST, RF1_AVAILABLE = 1, 2, 4, 0  # RF1: what the controller board does
BIN_HEADER = struct.Struct("<HHHH")  # FClass, FNum, Chan, Len
BIN_DIRECT = struct.Struct("<ffffBB")  # Current, Voltage, Power, Resistance, CurrentRange, ChMode
MAX_REQUEST = 1_000_000  # bytes of a JSON request not yet complete before the connection is dropped
DIRECT_SPACING = 0.1  # s: "at least 100 ms (10 ticks) between commands"
DIRECT_READY_S = 0.25  # s after (6, 7) before its pseudo test procedure takes (6, 8) (est.)
TOO_FAST = "Command sent too fast. There must be at least 100 ms (10 ticks) between commands"
NOT_READY = "Direct mode is not ready yet"


@dataclass
class MaccorChannel:
    cell: SolidStateCell
    stat: int = AVAILABLE
    rf1: int = RF1_AVAILABLE
    mode: str = "R"
    current: float = 0.0  # A, a magnitude; the mode gives the direction
    voltage: float = 0.0  # V: the limit the current works against (CCCV on charge, the floor on discharge)
    direct: bool = False
    test_name: str = ""
    procedure: str = ""
    test_time: float = 0.0
    step_time: float = 0.0
    capacity: float = 0.0  # Ah of the present step
    energy: float = 0.0  # Wh of the present step
    step: int = 0
    cycle: int = 0
    records: int = 0
    safety: dict[str, float] = field(default_factory=dict)
    variables: list[float] = field(default_factory=lambda: [0.0] * 16)
    reading: tuple[float, float] = (0.0, 0.0)  # (signed current, voltage) at the last integration
    direct_at: float = -1e9  # box time of the channel's last direct-mode command
    direct_started: float = -1e9  # box time of its (6, 7)


class MaccorSim(Box[MaccorChannel]):
    """One Maccor box: its channels, their cells, and the MacNet messages it answers."""

    name = "maccor"

    def __init__(self, cells: list[SolidStateCell], now: Callable[[], float], *, watchdog_s: float = 0.0,
                 login: tuple[str, str] | None = None) -> None:
        super().__init__([MaccorChannel(cell) for cell in cells], now)
        for ch in self.channels:
            ch.reading = (0.0, ch.cell.ocv())
        self.watchdog_s = watchdog_s  # MacNetDirectModeWD: 0 is off
        self.login = login  # (user, password) when user authentication is on

    # --- physics --------------------------------------------------------------------------
    def _solve(self, ch: MaccorChannel, dt: float) -> float:
        """The signed current the channel drives over the next dt: its setting, mutually limited by its voltage."""
        if ch.stat != ACTIVE or ch.mode == "R" or ch.current == 0:
            return 0.0
        e, r = ch.cell.thevenin(dt)
        if ch.mode == "C":
            return max(0.0, min(ch.current, (ch.voltage - e) / r))
        return min(0.0, max(-ch.current, (ch.voltage - e) / r))

    def _step(self, ch: MaccorChannel, dt: float) -> None:
        if (self.watchdog_s > 0 and ch.direct and ch.stat == ACTIVE
                and self._t + dt - ch.direct_at > self.watchdog_s):  # not updated within MacNetDirectModeWD
            ch.stat, ch.rf1 = SUSPENDED, RF1_REST
        current = self._solve(ch, dt)
        voltage = ch.cell.apply_current(current, dt)
        ch.reading = (current, voltage)
        if ch.stat == ACTIVE:
            ch.test_time += dt
            ch.step_time += dt
            ch.capacity += abs(current) * dt / 3600.0
            ch.energy += abs(current * voltage) * dt / 3600.0
            ch.rf1 = RF1_CHARGE if current > 0 else RF1_DISCHARGE if current < 0 else RF1_REST
            self._check_safety(ch)

    def _check_safety(self, ch: MaccorChannel) -> None:
        current, voltage = ch.reading
        s = ch.safety
        if not s:
            return
        if (voltage > s.get("VSafeMax", 1e9) or voltage < s.get("VSafeMin", -1e9)
                or current > abs(s.get("ISafeChg", 1e9)) or -current > abs(s.get("ISafeDis", 1e9))):
            ch.stat, ch.rf1, ch.mode, ch.current = PROBLEM, RF1_AVAILABLE, "R", 0.0  # tripped: output off

    # --- the messages ---------------------------------------------------------------------
    def answer(self, request: Any, session: dict[str, bool] | None = None) -> dict[str, Any]:
        """The reply to one JSON-RPC request (a dict), as MacNet gives it; `session` is the connection's state
        (whether it has logged in)."""
        self.advance()
        session = {} if session is None else session
        if not isinstance(request, dict) or not isinstance(request.get("params"), dict):
            return {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"},
                    "id": request.get("id") if isinstance(request, dict) else None}
        p = request["params"]
        key = (p.get("FClass"), p.get("FNum"))
        if key == (8, 1):
            passed = self.login is None or (str(p.get("UserID")), str(p.get("Password"))) == self.login
            session["in"] = passed
            return {"jsonrpc": "2.0", "result": {"FClass": 8, "FNum": 1, "Result": "PASSED" if passed else "FAILED"},
                    "id": request.get("id")}
        if self.login is not None and not session.get("in"):
            return {"jsonrpc": "2.0", "error": {"code": -32001, "message": "user authentication is on: log in "
                                                                          "with (8, 1) first"}, "id": request.get("id")}
        handler = self._handlers().get(key)
        if handler is None:
            return {"jsonrpc": "2.0", "error": {"code": -32601, "message": f"unknown MacNet function {key}"},
                    "id": request.get("id")}
        try:
            result = handler(p)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            return {"jsonrpc": "2.0", "error": {"code": -32602, "message": f"invalid params: {exc}"},
                    "id": request.get("id")}
        return {"jsonrpc": "2.0", "result": {"FClass": key[0], "FNum": key[1], **result}, "id": request.get("id")}

    def _handlers(self) -> dict[tuple[int, int], Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            (1, 1): lambda p: {"APIVersion": 1, "MacTest32EXEversionMajor": 3, "MacTest32EXEversionMinor": 3,
                               "MacTest32EXEversionBuild": 0, "MacTest32ExeDT": "2026-01-01T00:00:00"},
            (1, 2): lambda p: {"SystemID": "cellbench simulated Maccor", "SystemType": 0, "ControllerBoards": 1,
                               "TestChannels": len(self.channels), "AuxBoards": 0, "AuxChannels": 0},
            (4, 1): lambda p: self._many(p, "Status", lambda ch: {"RF1": ch.rf1, "RF2": 128, "Stat": ch.stat}),
            (4, 2): lambda p: self._many(p, "Voltage", lambda ch: ch.reading[1]),
            (4, 3): lambda p: self._many(p, "Current", lambda ch: abs(ch.reading[0])),
            (4, 4): lambda p: {"Chan": self._chan(p), "Len": 1,
                               "AuxValues": [round(self.channels[self._chan(p)].cell.temperature_c, 3)]},
            (4, 7): self._status,
            (4, 8): lambda p: {"Chan": self._chan(p), "Flags": 0,
                               "VARs": list(self.channels[self._chan(p)].variables)},
            (6, 2): self._start_procedure,
            (6, 3): lambda p: self._set_stat(p, SUSPENDED, from_stats=(ACTIVE,)),
            (6, 4): lambda p: self._set_stat(p, ACTIVE, from_stats=(SUSPENDED,)),
            (6, 5): self._reset,
            (6, 7): self._start_direct,
            (6, 8): self._set_direct,
            (6, 9): self._set_variable,
            (6, 10): self._set_safety,
        }

    def _chan(self, p: dict[str, Any]) -> int:
        chan = int(p["Chan"])
        if not 0 <= chan < len(self.channels):
            raise ValueError(f"no channel {chan} (0 to {len(self.channels) - 1})")
        return chan

    def _many(self, p: dict[str, Any], name: str, value: Callable[[MaccorChannel], Any]) -> dict[str, Any]:
        # -1 (pymacnet sends it for "all channels") and 65535 ("all selected") read from the first channel
        first = 0 if int(p["Chan"]) in (-1, 65535) else self._chan(p)
        count = int(p.get("Len", 1))
        if not 1 <= count <= 128 or first + count > len(self.channels):
            raise ValueError(f"{count} channels from {first}: beyond the box's {len(self.channels)}")
        return {"Chan": first, "Len": count, name: [value(ch) for ch in self.channels[first:first + count]]}

    def _status(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        ch = self.channels[chan]
        ch.records += 1
        return {"Chan": chan, "RF1": ch.rf1, "RF2": 128, "Stat": ch.stat, "LastRecNum": ch.records,
                "Cycle": ch.cycle, "Step": ch.step, "TestTime": ch.test_time, "StepTime": ch.step_time,
                "Capacity": ch.capacity, "Energy": ch.energy, "Current": abs(ch.reading[0]),
                "Voltage": ch.reading[1], "TesterTime": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _begin(self, ch: MaccorChannel, name: str) -> None:
        ch.stat, ch.test_name, ch.test_time, ch.step_time = ACTIVE, name or "Random", 0.0, 0.0
        ch.capacity = ch.energy = 0.0
        ch.step, ch.cycle = 1, 0

    def _start_procedure(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        ch = self.channels[chan]
        if ch.stat not in (AVAILABLE,):
            return {"Chan": chan, "Result": "Channel is not available"}
        self._begin(ch, str(p.get("TestName", "")))
        ch.procedure, ch.direct, ch.mode = str(p.get("ProcName", "")), False, "R"
        return {"Chan": chan, "Result": "OK"}

    def _set_stat(self, p: dict[str, Any], stat: int, from_stats: tuple[int, ...]) -> dict[str, Any]:
        chan = self._chan(p)
        ch = self.channels[chan]
        if ch.stat not in from_stats:
            return {"Chan": chan, "Result": "The channel is not active"}
        ch.stat = stat
        ch.rf1 = RF1_REST if stat == SUSPENDED else ch.rf1
        return {"Chan": chan, "Result": "OK"}

    def _reset(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        ch = self.channels[chan]
        ch.stat, ch.rf1, ch.mode, ch.current, ch.direct = AVAILABLE, RF1_AVAILABLE, "R", 0.0, False
        ch.reading = (0.0, ch.cell.ocv())
        return {"Chan": chan, "Result": "OK"}

    def _start_direct(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        ch = self.channels[chan]
        if ch.stat != AVAILABLE:
            return {"Chan": chan, "Result": "The channel is not available"}
        self._begin(ch, str(p.get("TestName", "")))
        ch.direct = True
        ch.direct_at = ch.direct_started = self._t
        self._output(ch, float(p.get("Current", 0.0)), float(p.get("Voltage", 0.0)), str(p.get("ChMode", "R")))
        return {"Chan": chan, "Result": "OK"}

    def _set_direct(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        ch = self.channels[chan]
        refused = self._direct_refused(ch)
        if refused:
            return {"Chan": chan, "Result": ("", "", "The channel is not active", TOO_FAST, "Direct mode is not "
                                             "active", NOT_READY)[refused]}
        self._output(ch, float(p.get("Current", 0.0)), float(p.get("Voltage", 0.0)), str(p.get("ChMode", "R")))
        return {"Chan": chan, "Result": "OK"}

    def _direct_refused(self, ch: MaccorChannel) -> int:
        """(6, 8)'s result word for this channel now (0: taken, and the time noted)."""
        if ch.stat != ACTIVE:
            return 2
        if not ch.direct:
            return 4
        now, last = self._t, ch.direct_at
        ch.direct_at = now  # a refused command counts too: the box saw it
        if now - last < DIRECT_SPACING - 1e-9:
            return 3
        if now - ch.direct_started < DIRECT_READY_S - 1e-9:
            return 5
        return 0

    def _output(self, ch: MaccorChannel, current: float, voltage: float, mode: str) -> None:
        mode = chr(mode) if isinstance(mode, int) else mode[:1].upper()
        if mode not in ("C", "D", "R"):
            raise ValueError(f"ChMode {mode!r} is not C, D or R")
        if (mode, abs(current), voltage) != (ch.mode, ch.current, ch.voltage):
            ch.step += 1
            ch.step_time = ch.capacity = ch.energy = 0.0
        ch.mode, ch.current, ch.voltage = mode, abs(current), voltage
        now = self._solve(ch, 0.0)
        ch.reading = (now, ch.reading[1])
        ch.rf1 = RF1_CHARGE if now > 0 else RF1_DISCHARGE if now < 0 else RF1_REST

    def _set_variable(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        number = int(p["VarNum"])
        if not 1 <= number <= 16:
            raise ValueError(f"VarNum {number} is not 1 to 16")
        self.channels[chan].variables[number - 1] = float(p["Value"])
        return {"Chan": chan, "Result": "OK"}

    def _set_safety(self, p: dict[str, Any]) -> dict[str, Any]:
        chan = self._chan(p)
        keys = ("VSafeMax", "VSafeMin", "ISafeChg", "ISafeDis", "PBatSafeChg", "PBatSafeDis")
        limits = {k: float(p[k]) for k in keys if k in p}
        self.channels[chan].safety = limits
        return {"Chan": chan, **limits}

    def binary(self, header: tuple[int, int, int, int], payload: bytes, session: dict[str, bool] | None = None
               ) -> bytes:
        """A binary message: class 0 echoes it; (8, 1) logs the connection in (a result byte, 1 passed); (6, 8) Set
        direct mode output answers a result word (0 OK, 2 not active, 3 too fast, 4 direct mode not active, 5 not
        ready yet); anything else, or anything before a login a box with authentication asks for, 1."""
        self.advance()
        session = {} if session is None else session
        fclass, fnum, chan, _ = header
        if fclass == 0:  # "the received message will be replied as is"
            return BIN_HEADER.pack(*header) + payload
        if (fclass, fnum) == (8, 1):
            user_len = payload[0] if payload else 0
            user = payload[1:1 + user_len].decode("ascii", errors="replace")
            rest = payload[1 + user_len:]
            password = rest[1:1 + rest[0]].decode("ascii", errors="replace") if rest else ""
            session["in"] = self.login is None or (user, password) == self.login
            return BIN_HEADER.pack(8, 1, chan, 1) + bytes([int(session["in"])])
        result = 1
        if self.login is not None and not session.get("in"):
            pass
        elif (fclass, fnum) == (6, 8) and len(payload) >= BIN_DIRECT.size and 0 <= chan < len(self.channels):
            current, voltage, _, _, _, mode = BIN_DIRECT.unpack(payload[:BIN_DIRECT.size])
            ch = self.channels[chan]
            result = self._direct_refused(ch)
            if result == 0:
                self._output(ch, current, voltage, chr(mode))
        return BIN_HEADER.pack(fclass, fnum, chan, 2) + struct.pack("<H", result)


async def _json_client(sim: MaccorSim, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    decoder = json.JSONDecoder()
    buffer = ""
    session: dict[str, bool] = {}
    while chunk := await reader.read(65536):
        buffer += chunk.decode("utf-8", errors="replace")
        while True:
            text = buffer.lstrip()
            if not text:
                buffer = ""
                break
            try:
                request, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > MAX_REQUEST or not text.startswith(("{", "[")):
                    writer.write(json.dumps({"jsonrpc": "2.0", "error": {"code": -32700, "message":
                                             "Parse error"}, "id": None}).encode() + b"\r\n")
                    buffer = ""
                break
            buffer = text[end:]
            # indented over CR LF-ended lines, as the help prints its replies
            writer.write(json.dumps(sim.answer(request, session), indent=1).replace("\n", "\r\n").encode()
                         + b"\r\n")
        await writer.drain()


async def _binary_client(sim: MaccorSim, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    session: dict[str, bool] = {}
    while True:
        header = BIN_HEADER.unpack(await reader.readexactly(BIN_HEADER.size))
        payload = await reader.readexactly(min(header[3], 4096))
        writer.write(sim.binary(header, payload, session))
        await writer.drain()


class MaccorServer:
    """The box on its two MacNet ports (JSON and binary), on loopback by default."""

    def __init__(self, sim: MaccorSim) -> None:
        self.sim = sim
        self.host = "127.0.0.1"
        self.port = self.bin_port = 0
        self._listeners = StreamServers()

    async def start(self, host: str = "127.0.0.1", port: int = 0, bin_port: int = 0) -> MaccorServer:
        self.host = host
        self.port = await self._listeners.listen(lambda r, w: _json_client(self.sim, r, w), host, port)
        self.bin_port = await self._listeners.listen(lambda r, w: _binary_client(self.sim, r, w), host, bin_port)
        return self

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    async def close(self) -> None:
        await self._listeners.close()

    async def __aenter__(self) -> MaccorServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated 8-channel Maccor box for `cellbench sim serve maccor` (JSON port --port, binary --bin-port)."""
    cells = [cell_of(options) for _ in range(options.channels)]
    server = await MaccorServer(MaccorSim(cells, asyncio.get_running_loop().time)).start(
        options.host, options.port, options.bin_port)
    try:
        yield (f"a simulated {options.channels}-channel Maccor box ({options.cell} cells) at {server.resource} "
               f"(MacNet JSON), binary port {server.bin_port}")
    finally:
        await server.close()


async def rehearse(r: Rehearsal) -> Rehearsed:
    """A Maccor box with a channel on each cell it is given; its binary port is the driver's address."""
    server = await MaccorServer(MaccorSim(r.cells, r.time)).start()
    r.stack.push_async_callback(server.close)
    return Rehearsed(server.resource, host=server.sim, settings={"binary_port": server.bin_port})
