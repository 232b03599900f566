"""Simulated Keithley 2450 SourceMeter (native SCPI) wired to a simulated cell.

The physics advances lazily: before each command the cell is integrated from the last command
to now under the source state of that interval, in sub-steps, with real compliance — a current
source stops at its voltage limit (CC turns into CV), a voltage source at its current limit.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from cellbench.simulators.cell import TIME_EPS, SolidStateCell
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.scpi import Handler, ScpiError, ScpiTree, Setting, format_number, unquote
from cellbench.simulators.server import ServeOptions, SimServer, cell_of, serve_lines
from cellbench.simulators.trigger_model import BLOCK_COMMANDS, TriggerModel

IDN = "KEITHLEY INSTRUMENTS,MODEL 2450,SIM0001,1.7.12b"
MAX_CURRENT = 1.05
MAX_VOLTAGE = 210.0
MAX_SUBSTEP = 5.0  # s of cell time per integration step (the RC settles in ms; SOC moves slowly)
REST_SUBSTEP = 600.0  # s per step while no current flows (see Keithley2450Sim._idle)
OVERFLOW = 9.9e37
# IEEE 488.2 bits: standard event register, status byte
OPC, QYE, DDE, EXE, CME = 1, 4, 8, 16, 32
EAV, ESB, MSS = 4, 32, 64


class Surroundings(Protocol):
    """A simulated instrument whose physics the cell feels (a chamber's air, a press's force)."""

    def advance(self, t: float | None = None) -> None: ...


class Keithley2450Sim:
    """The instrument described as data (its SCPI tree) plus the physics of the cell on its terminals."""

    name = "keithley2450"

    def __init__(
        self,
        cell: SolidStateCell,
        now: Callable[[], float],
        *,
        noise_v: float = 0.0,
        noise_i: float = 0.0,
        seed: int = 0,
        serial: str = "SIM0001",
    ) -> None:
        self.cell = cell
        self._now = now
        self._t = now()
        self._t0 = self._t
        self._rng = random.Random(seed)
        self.noise_v, self.noise_i = noise_v, noise_i
        self.idn = IDN.replace("SIM0001", serial)
        self.tripped = False
        # IEEE 488.2 status: the standard event register and its enables, the service request enable
        self.esr, self.ese, self.sre = 0, 0, 0
        self.buffers: dict[str, Buffer] = {}
        self.trigger: SimpleLoop | TriggerModel | None = None
        self.tree = ScpiTree(self._commands(), on_error=self._event_from_error)
        self._default_buffers()
        self.surroundings: list[Surroundings] = []  # chamber and press acting on the same cell
        self._holding = False  # a *WAI or *OPC? came while the trigger model runs: lines wait behind it
        self._issued = self._answered = 0  # held lines numbered as they came, and how many were answered

    def _commands(self) -> dict[str, Handler | Setting]:
        src, sense = ":SOURce[1]", ":SENSe[1]"
        commands: dict[str, Handler | Setting] = {
            "*IDN?": lambda a: self.idn,
            "*RST": lambda a: self._reset(),
            "*CLS": lambda a: self.tree.errors.clear(),
            "*OPC?": lambda a: "1",  # answered once pending operations are done (see handle)
            "*OPC": lambda a: self._set_opc(),
            "*WAI": lambda a: None,
            "*ESR?": lambda a: self._read_esr(),
            "*ESE": lambda a: self._set_register("ese", a),
            "*ESE?": lambda a: str(self.ese),
            "*SRE": lambda a: self._set_register("sre", a),
            "*SRE?": lambda a: str(self.sre),
            "*STB?": lambda a: str(self._stb()),
            "*TRG": lambda a: None,  # a bus trigger: the simulated trigger models do not wait for one
            ":STATus:OPERation[:EVENt]?": lambda a: "0",
            ":STATus:OPERation:CONDition?": lambda a: "0",
            ":STATus:QUEStionable[:EVENt]?": lambda a: "0",
            ":STATus:QUEStionable:CONDition?": lambda a: "0",
            ":FORMat[:DATA]": Setting("format", "choice", "ASC", choices=("ASCii", "REAL", "SREal")),
            ":TRACe:MAKE": self._make_buffer,
            ":TRACe:DELete": self._delete_buffer,
            ":TRACe:CLEar": lambda a: self.buffers[self._buffer_name(a, 0, must_exist=True)].clear(),
            ":TRACe:ACTual?": lambda a: str(len(self.buffers[self._buffer_name(a, 0, must_exist=True)])),
            ":TRACe:POINts": self._buffer_points,
            ":TRACe:POINts?": lambda a: str(self.buffers[self._buffer_name(a, 0, must_exist=True)].size),
            ":TRACe:TRIGger": lambda a: self._store(self._buffer_name(a, 0, must_exist=True)) and None,
            ":TRACe:DATA?": self._trace_data,
            ":TRIGger:LOAD": self._trigger_load,
            **{command: self._block(command) for command in BLOCK_COMMANDS},
            ":TRIGger:STATe?": lambda a: self._trigger_state(),
            ":INITiate[:IMMediate]": lambda a: self._initiate(),
            ":ABORt": lambda a: self._abort(),
            ":FETCh?": self._fetch,
            f"[{sense}]:COUNt": Setting("count", "float", 1.0, range=(1, 300000)),  # the SENSe node is optional
            "*TST?": lambda a: "0",
            "*LANG?": lambda a: "SCPI",
            ":SYSTem:ERRor[:NEXT]?": lambda a: self.tree.pop_error(),
            ":SYSTem:ERRor:COUNt?": lambda a: str(len(self.tree.errors)),
            ":SYSTem:ERRor:CLEar": lambda a: self.tree.errors.clear(),
            ":SYSTem:BEEPer[:IMMediate]": lambda a: None,
            ":STATus:PRESet": lambda a: None,
            ":ROUTe:TERMinals": Setting("terminals", "choice", "FRON", choices=("FRONt", "REAR")),
            f"{src}:FUNCtion[:MODE]": Setting("source", "choice", "VOLT", choices=("CURRent", "VOLTage")),
            f"{src}:CURRent[:LEVel][:IMMediate][:AMPLitude]": Setting(
                "i_set", range=(-MAX_CURRENT, MAX_CURRENT)
            ),
            f"{src}:VOLTage[:LEVel][:IMMediate][:AMPLitude]": Setting(
                "v_set", range=(-MAX_VOLTAGE, MAX_VOLTAGE)
            ),
            f"{src}:CURRent:VLIMit[:LEVel]": Setting("v_lim", default=21.0, range=(0.02, MAX_VOLTAGE)),
            f"{src}:VOLTage:ILIMit[:LEVel]": Setting("i_lim", default=1.05e-4, range=(1e-9, MAX_CURRENT)),
            f"{src}:CURRent:VLIMit:TRIPped?": lambda a: self._trip("CURR"),
            f"{src}:VOLTage:ILIMit:TRIPped?": lambda a: self._trip("VOLT"),
            ":OUTPut[1][:STATe]": Setting("output", "bool", False),
            ":OUTPut[1]:CURRent:SMODe": Setting(
                "off_i", "choice", "NORM", choices=("NORMal", "HIMPedance", "ZERO", "GUARd")
            ),
            ":OUTPut[1]:VOLTage:SMODe": Setting(
                "off_v", "choice", "NORM", choices=("NORMal", "HIMPedance", "ZERO", "GUARd")
            ),
            # without a function: the output-off state of the present source function
            ":OUTPut[1]:SMODe": self._off_state,
            ":OUTPut[1]:SMODe?": lambda a: str(self.tree.values[self._off_key()]),
            f"{sense}:FUNCtion[:ON]": Setting(
                "sense", "choice", "CURR:DC", choices=("CURRent[:DC]", "VOLTage[:DC]", "RESistance"), quoted=True
            ),
            ":READ?": self._read,
            ":MEASure:VOLTage[:DC]?": lambda a: self._measure("VOLT:DC"),
            ":MEASure:CURRent[:DC]?": lambda a: self._measure("CURR:DC"),
            ":MEASure?": lambda a: self._read([]),
        }
        # Settings a client sends and expects to be kept, though the model ignores them.
        for fn, full_range in (("CURRent", MAX_CURRENT), ("VOLTage", MAX_VOLTAGE)):
            key = fn[:4].lower()
            commands[f"{src}:{fn}:RANGe"] = Setting(f"src_{key}_range", default=full_range, range=(0, full_range))
            commands[f"{src}:{fn}:RANGe:AUTO"] = Setting(f"src_{key}_autorange", "bool", True)
            commands[f"{src}:{fn}:DELay"] = Setting(f"src_{key}_delay", default=0.0, range=(0, 10_000))
            commands[f"{src}:{fn}:DELay:AUTO"] = Setting(f"src_{key}_autodelay", "bool", True)
            commands[f"{src}:{fn}:READ:BACK"] = Setting(f"src_{key}_readback", "bool", True)
            commands[f"{sense}:{fn}[:DC]:NPLCycles"] = Setting(f"{key}_nplc", default=1.0, range=(0.01, 10))
            commands[f"{sense}:{fn}[:DC]:RANGe[:UPPer]"] = Setting(
                f"{key}_range", default=full_range, range=(0, full_range)
            )
            commands[f"{sense}:{fn}[:DC]:RANGe:AUTO"] = Setting(f"{key}_autorange", "bool", True)
            commands[f"{sense}:{fn}[:DC]:RSENse"] = Setting(f"{key}_rsense", "bool", False)
        return commands

    # --- the wire -------------------------------------------------------------------------
    def answer(self, line: str) -> str:
        """The reply to a line that answers at once: for in-process clients and tests (a line that answers nothing,
        or only once a running trigger model ends, is an error here)."""
        reply = self.handle(line)
        if not isinstance(reply, str):
            raise AssertionError(f"{line!r} gives no reply at once")
        return reply

    def handle(self, line: str) -> str | AsyncIterator[str] | None:
        """One line from the client. While a trigger model runs, *OPC?, *OPC and *WAI wait for it to finish, and so
        does every line after a *WAI or *OPC? until then (the manual: *WAI holds the commands that follow it),
        each answered in the order it came."""
        self.advance()
        running = self.trigger is not None and self.trigger.running
        if running and (self._holding or re.search(r"\*(OPC\??|WAI)", line, re.I)):
            self._holding = True
            self._issued += 1
            return self._after_trigger(line, self._issued - 1)
        self._holding = False
        return self.tree.execute(line)

    async def _after_trigger(self, line: str, ticket: int) -> AsyncIterator[str]:
        try:
            assert self.trigger is not None
            while self.trigger.running:
                await asyncio.sleep(max(self.trigger.end - self._now(), 0.001))
                self.advance()
            while self._answered < ticket:  # noqa: ASYNC110  (held lines of one run: answered in turn)
                await asyncio.sleep(0)
            reply = self.tree.execute(line)
            if reply is not None:
                yield reply
        finally:
            self._answered = max(self._answered, ticket + 1)

    def _off_key(self) -> str:
        return "off_i" if self.tree.values["source"] == "CURR" else "off_v"

    def _off_state(self, args: list[str]) -> None:
        forms = {"NORM": "NORMAL", "HIMP": "HIMPEDANCE", "ZERO": "ZERO", "GUAR": "GUARD"}
        value = args[0].strip().upper() if args else ""
        short = next((k for k, full in forms.items() if value in (k, full)), None)
        if short is None:
            raise ScpiError(-224 if args else -109)
        self.tree.values[self._off_key()] = short

    def _reset(self) -> None:
        self.tree.reset()
        self.tripped = False
        self.trigger = None
        self._default_buffers()

    # --- IEEE 488.2 status ---------------------------------------------------------------
    def _event_from_error(self, code: int) -> None:
        """An error sets its class's bit in the standard event register: command, execution, device, query."""
        bit = CME if -199 <= code <= -100 else EXE if -299 <= code <= -200 else QYE if -499 <= code <= -400 else DDE
        self.esr |= bit

    def _set_opc(self) -> None:
        self.esr |= OPC

    def _read_esr(self) -> str:
        value, self.esr = self.esr, 0  # reading clears it
        return str(value)

    def _set_register(self, name: str, args: list[str]) -> None:
        try:
            value = int(float(args[0]))
        except (IndexError, ValueError):
            raise ScpiError(-104, "an integer 0 to 255") from None
        if not 0 <= value <= 255:
            raise ScpiError(-222)
        setattr(self, name, value)

    def _stb(self) -> int:
        """Status byte: bit 2 an error in the queue, bit 5 an enabled standard event, bit 6 a service request."""
        stb = (EAV if self.tree.errors else 0) | (ESB if self.esr & self.ese else 0)
        return stb | (MSS if stb & self.sre else 0)

    # --- reading buffers and the trigger model ---------------------------------------------
    def _default_buffers(self) -> None:
        self.buffers = {"defbuffer1": Buffer(100_000), "defbuffer2": Buffer(100_000)}

    def _buffer_name(self, args: list[str], k: int, *, must_exist: bool) -> str:
        name = unquote(args[k]) if len(args) > k and args[k].strip() else "defbuffer1"
        if must_exist and name not in self.buffers:
            raise ScpiError(-224, f"no reading buffer named {name!r}")
        return name

    def _make_buffer(self, args: list[str]) -> None:
        name = self._buffer_name(args, 0, must_exist=False)
        if name in self.buffers or not args:
            raise ScpiError(-224, f"buffer {name!r} exists already")
        try:
            size = int(float(args[1])) if len(args) > 1 else 10_000
        except ValueError:
            raise ScpiError(-104) from None
        if not 10 <= size <= 5_000_000:
            raise ScpiError(-222)
        self.buffers[name] = Buffer(size)

    def _delete_buffer(self, args: list[str]) -> None:
        name = self._buffer_name(args, 0, must_exist=True)
        if name.startswith("defbuffer"):
            raise ScpiError(-224, "the default buffers cannot be deleted")
        del self.buffers[name]

    def _buffer_points(self, args: list[str]) -> None:
        try:
            size = int(float(args[0]))
        except (IndexError, ValueError):
            raise ScpiError(-104) from None
        if not 10 <= size <= 5_000_000:  # as for a buffer made with :TRACe:MAKE
            raise ScpiError(-222)
        buffer = self.buffers[self._buffer_name(args, 1, must_exist=True)]
        buffer.size = size
        buffer.clear()

    def _store(self, name: str) -> tuple[float, float, float]:
        """Take a reading into a buffer: (reading, source value, relative time)."""
        sense = self.tree.values["sense"]
        source = "VOLT:DC" if self.tree.values["source"] == "VOLT" else "CURR:DC"
        solved = self._solve(0.0)  # one solution of the source on the cell for both (the cell's state is one)
        row = (self._reading(sense, solved), self._reading(source, solved), self._t - self._t0)
        self.buffers[name].add(row)
        return row

    def _trace_data(self, args: list[str]) -> str:
        """``:TRACe:DATA? start, end[, "buffer"[, element, ...]]``: readings start to end (1-based)."""
        try:
            start, end = int(float(args[0])), int(float(args[1]))
        except (IndexError, ValueError):
            raise ScpiError(-109, "start and end indexes") from None
        buffer = self.buffers[self._buffer_name(args, 2, must_exist=True)]
        if not 1 <= start <= end <= len(buffer):
            raise ScpiError(-222, f"indexes {start} to {end} of {len(buffer)} readings")
        elements = _checked([a.strip().upper() for a in args[3:]] or ["READ"])
        return ",".join(_elements(row, elements, buffer.first) for row in buffer.between(start, end))

    def _fetch(self, args: list[str]) -> str:
        buffer = self.buffers[self._buffer_name(args, 0, must_exist=True)]
        if not len(buffer):
            raise ScpiError(-230, "no reading in the buffer")
        return _elements(buffer.row(-1), _checked([a.strip().upper() for a in args[1:]] or ["READ"]), buffer.first)

    def _trigger_load(self, args: list[str]) -> None:
        """``:TRIGger:LOAD "SimpleLoop", count[, delay[, "buffer"]]``, or ``"Empty"`` to build a model block by
        block (the other templates are not simulated)."""
        if self.trigger is not None and self.trigger.running:
            raise ScpiError(-200, "the trigger model is running")
        if args and unquote(args[0]).upper() == "EMPTY":
            self.trigger = TriggerModel()
            return
        if not args or unquote(args[0]).upper() != "SIMPLELOOP":
            raise ScpiError(-224, "only the SimpleLoop and Empty templates are simulated")
        try:
            count = int(float(args[1])) if len(args) > 1 else 1
            delay = float(args[2]) if len(args) > 2 else 0.0
        except ValueError:
            raise ScpiError(-104) from None
        if not 1 <= count <= 300_000 or delay < 0:
            raise ScpiError(-222)
        self.trigger = SimpleLoop(count, delay, self._buffer_name(args, 3, must_exist=True))

    def _block(self, command: str) -> Handler:
        def define(args: list[str]) -> None:
            if not isinstance(self.trigger, TriggerModel):  # blocks build on a model of blocks
                if self.trigger is not None and self.trigger.running:
                    raise ScpiError(-200, "the trigger model is running")
                self.trigger = TriggerModel()
            self.trigger.define(command, args)
        return define

    def _initiate(self) -> None:
        if self.trigger is None:
            raise ScpiError(-224, "no trigger model loaded")
        if self.trigger.running:
            raise ScpiError(-200, "the trigger model is running")
        self.trigger.start(self._now(), self)
        self._issued = self._answered = 0
        self.advance()  # what is due at once (a SimpleLoop's first reading, a model's first blocks)

    def _abort(self) -> None:
        if self.trigger is not None:
            self.trigger.abort()

    def _trigger_state(self) -> str:
        return "EMPTY;EMPTY;0" if self.trigger is None else self.trigger.status()

    def _trip(self, function: str) -> str:
        return "1" if self.tripped and self.tree.values["source"] == function else "0"

    # --- physics --------------------------------------------------------------------------
    def advance(self) -> None:
        """Integrate the cell from the last command to now under the present source state; a running trigger
        model's readings are taken on the way, each at its own time and in the state of that moment."""
        now = self._now()
        if self.trigger is not None and self.trigger.running:
            self.trigger.run(self, now)
        self._integrate(now)

    # --- what a trigger model acts on (trigger_model.Machine) ----------------------------
    def integrate_to(self, t: float) -> None:
        self._integrate(t)

    def set_output(self, on: bool) -> None:
        self.tree.values["output"] = on

    def take_reading(self, buffer: str, t: float) -> float:
        """A reading into a buffer at the model's time t (the cell integrated to it first): its sense value."""
        self._integrate(t)
        return self._store(buffer)[0]

    def clear_buffer(self, buffer: str) -> None:
        self.buffers[buffer].clear()

    def has_buffer(self, buffer: str) -> bool:
        return buffer in self.buffers

    def _integrate(self, until: float) -> None:
        while until - self._t > TIME_EPS:  # a remainder below it cannot be added to a large time
            dt = min(REST_SUBSTEP if self._idle() else MAX_SUBSTEP, until - self._t)
            for part in self.surroundings:
                part.advance(self._t)
            self._step(dt)
            self._t += dt

    def _idle(self) -> bool:
        """No current flows (output off, or a 0 A source) and the cell has no short: nothing but its relaxation,
        which is integrated exactly, moves; long steps lose nothing."""
        v = self.tree.values
        quiet = not v["output"] or (v["source"] == "CURR" and v["i_set"] == 0.0)
        return quiet and self.cell.state.short_ohm is None and not self.surroundings

    def _solve(self, dt: float) -> tuple[float, float, bool]:
        """(current, voltage, in compliance) of the source on the cell over the next dt (0: this instant)."""
        v = self.tree.values
        e, r = self.cell.thevenin(dt)
        if not v["output"]:
            return 0.0, e, False
        if v["source"] == "CURR":
            current = v["i_set"]
            voltage = e + current * r
            if abs(voltage) <= v["v_lim"]:
                return current, voltage, False
            target = v["v_lim"] if voltage > 0 else -v["v_lim"]
            current = max(-MAX_CURRENT, min(MAX_CURRENT, (target - e) / r))
            return current, e + current * r, True
        current = (v["v_set"] - e) / r
        if abs(current) <= v["i_lim"]:
            return current, v["v_set"], False
        current = v["i_lim"] if current > 0 else -v["i_lim"]
        return current, e + current * r, True

    def _step(self, dt: float) -> None:
        current, _, self.tripped = self._solve(dt)
        self.cell.apply_current(current, dt)

    def _reading(self, function: str, solved: tuple[float, float, bool] | None = None) -> float:
        """What the meter reads now: the source's present state on the cell, plus noise. With the output off in
        the high-impedance off state the relay is open and nothing is connected to measure (manual, page 2-83):
        an overflow, as a client that reads there must learn on the instrument too."""
        v = self.tree.values
        off_mode = v["off_i"] if v["source"] == "CURR" else v["off_v"]
        if not v["output"] and str(off_mode).upper().startswith("HIMP"):
            return OVERFLOW
        current, voltage, _ = solved or self._solve(0.0)
        if function.startswith("VOLT"):
            return voltage + self._rng.gauss(0.0, self.noise_v) if self.noise_v else voltage
        if function.startswith("CURR"):
            return current + self._rng.gauss(0.0, self.noise_i) if self.noise_i else current
        return voltage / current if current else OVERFLOW

    def _not_while_running(self, command: str) -> None:
        """A measurement asked outside the running trigger model is refused (it owns the measurements)."""
        if self.trigger is not None and self.trigger.running:
            raise ScpiError(-200, f"{command} while the trigger model runs")

    def _measure(self, function: str) -> str:
        self._not_while_running(":MEASure?")
        self.tree.values["sense"] = function
        return format_number(self._reading(function))

    def _read(self, args: list[str]) -> str:
        """``:READ? ["buffer"[, element, ...]]``: take the sense reading (``:SENSe:COUNt`` of them) into the
        buffer and answer the last one's elements."""
        self._not_while_running(":READ?")
        if args and not (args[0].startswith(("'", '"')) and unquote(args[0])):
            raise ScpiError(-104, "buffer name must be a quoted string")
        name = self._buffer_name(args, 0, must_exist=True)
        elements = _checked([a.strip().upper() for a in args[1:]] or ["READ"])
        row = self._store(name)
        for _ in range(int(self.tree.values["count"]) - 1):
            row = self._store(name)
        return _elements(row, elements, self.buffers[name].first)


# the buffer elements simulated, by their short and long forms; the others (UNIT, TSTamp, DATE, ...) are refused
ELEMENTS = {"READ": "READING", "SOUR": "SOURCE", "REL": "RELATIVE", "SEC": "SECONDS"}


def _checked(elements: list[str]) -> list[str]:
    for element in elements:
        if not any(element in (short, full) for short, full in ELEMENTS.items()):
            raise ScpiError(-224, f"buffer element {element} is not simulated")
    return elements


def _elements(row: tuple[float, float, float], elements: list[str], first: float) -> str:
    """A row's elements: REL is the time since the buffer's first reading (the manual's examples start at 0),
    SEC the instrument's own seconds (since it was switched on, here)."""
    reading, source, stamp = row
    picked = {"READ": reading, "SOUR": source, "REL": stamp - first, "SEC": stamp}
    return ",".join(format_number(picked[e[:4] if e[:4] in picked else e[:3]]) for e in elements)


class Buffer:
    """A reading buffer: (reading, source value, relative time) rows, the oldest overwritten when full.

    Kept as doubles in a ring (24 bytes a reading). The first reading takes room for RESERVE readings at once
    (the default buffers' 100,000: 2.4 MB), as the instrument's own memory is, so a month-long dry run holds the
    same memory from its first day to its last (a growing list held 13.6 MB of tuples per instrument by the
    time it was full). A larger buffer grows by doubling past that, as readings come: a client that makes
    buffers of millions of readings and stores one reading in each costs no more than the readings it took."""

    RESERVE = 100_000

    def __init__(self, size: int) -> None:
        self.size = size
        self.first = 0.0  # the stamp of the first reading since the buffer was cleared
        self._data: array.array[float] | None = None  # none until the first reading: an unused buffer costs nothing
        self._count, self._next = 0, 0  # readings held; where the next goes

    def __len__(self) -> int:
        return self._count

    def add(self, row: tuple[float, float, float]) -> None:
        if self._data is None:
            self._data = array.array("d", bytes(24 * min(self.size, self.RESERVE)))
            self.first = row[2]
        j = 3 * self._next
        if j >= len(self._data):  # not full yet, and past the room taken: twice the room, at most the size
            self._data.frombytes(bytes(8 * min(len(self._data), 3 * self.size - len(self._data))))
        self._data[j], self._data[j + 1], self._data[j + 2] = row
        self._next = (self._next + 1) % self.size
        self._count = min(self._count + 1, self.size)

    def row(self, i: int) -> tuple[float, float, float]:
        """The i-th reading, 0 the oldest (negative from the newest)."""
        assert self._data is not None and self._count, "no readings"
        oldest = (self._next - self._count) % self.size
        j = 3 * ((oldest + i % self._count) % self.size)
        return self._data[j], self._data[j + 1], self._data[j + 2]

    def between(self, start: int, end: int) -> list[tuple[float, float, float]]:
        """Rows start to end, 1-based and inclusive."""
        return [self.row(i) for i in range(start - 1, end)]

    def clear(self) -> None:
        """Empty (at the size last set): its memory is given back until the next reading."""
        self._data = None
        self._count, self._next = 0, 0


class SimpleLoop:
    """The SimpleLoop trigger template: count readings, delay apart, into a buffer (cleared at the start)."""

    def __init__(self, count: int, delay: float, buffer: str) -> None:
        self.count, self.delay, self.buffer = count, delay, buffer
        self.running, self.taken, self.began, self.aborted = False, 0, 0.0, False

    def start(self, now: float, machine: Keithley2450Sim) -> None:
        machine.clear_buffer(self.buffer)
        self.running, self.taken, self.began, self.aborted = True, 0, now, False

    def due(self, k: int) -> float:
        return self.began + k * self.delay

    @property
    def end(self) -> float:
        return self.due(self.count - 1)

    def run(self, machine: Keithley2450Sim, now: float) -> None:
        """Every reading due by now, each taken at its own moment."""
        while self.running and self.taken < self.count and self.due(self.taken) <= now + 1e-9:
            machine.take_reading(self.buffer, self.due(self.taken))
            self.taken += 1
        if self.taken >= self.count:
            self.running = False

    def abort(self) -> None:
        if self.running:
            self.running, self.aborted = False, True

    def status(self) -> str:
        state = "RUNNING" if self.running else "ABORTED" if self.aborted else "IDLE"
        return f"{state};{state};0"


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated 2450 with a simulated cell, for `cellbench sim serve keithley2450`."""
    cell = cell_of(options)
    sim = Keithley2450Sim(cell, asyncio.get_running_loop().time, noise_v=20e-6, seed=options.seed)
    async with serve_lines(sim, options) as resource:
        yield f"a simulated Keithley 2450 ({options.cell} cell) at {resource}"


async def rehearse(r: Rehearsal) -> Rehearsed:
    """A 2450 on the first cell it is given, over loopback TCP, with a little measurement noise."""
    sim = Keithley2450Sim(r.cells[0], r.time, noise_v=20e-6, noise_i=2e-9, seed=r.seed)
    server = await SimServer(sim).start()
    r.stack.push_async_callback(server.close)
    return Rehearsed(server.resource, host=sim)
