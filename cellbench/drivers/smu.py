"""Source-measure units used as single-channel battery cyclers."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Literal

from pydantic import Field

from cellbench.drivers.errors import InstrumentError, ProtocolError
from cellbench.drivers.registry import DriverSpec, Opened, OpenRequest, SerialSettings
from cellbench.drivers.transport import Transport, open_line_driver, open_transport
from cellbench.roles import BlockPlan, BlockReading, Reading

OVERFLOW = 9.9e37
_ERROR_RE = re.compile(r'^\s*([+-]?\d+)\s*,\s*"([^"]*)"')
MAX_QUEUED_ERRORS = 32
# V: the compliance of the 0 A source an open-circuit reading is taken with: no current flows below it, and
# no single cell reaches it (the 2450's 20 V range)
OCV_VOLTAGE_LIMIT = 21.0
BLOCK_BUFFER = "defbuffer1"  # the buffer a block's readings go to (cleared at its start)
LIMIT_TYPES = {"above": "ABOV", "below": "BEL", "inside": "INS", "outside": "OUTS"}
RUNNING_STATES = ("RUNNING", "WAITING", "BUILDING", "ABORTING")  # TRIGger:STATe? of a model not yet ended


class Keithley2450:
    """Keithley 2450 SourceMeter, native SCPI command set."""

    model = "Keithley 2450"

    def __init__(self, transport: Transport) -> None:
        self._io = transport
        # the source function as set here; None until set or asked (a new connection to an instrument that kept
        # sourcing: a reading parsed by a guessed function once read 3.76 V at 1 mA as 1 mV at 3.76 A)
        self._source: str | None = None
        self._on: bool | None = None  # the output as last set here (None: not known yet; asked once)
        self._sourcing: str | None = None  # the last source set-up sent: an open-circuit reading restores it
        # setting the source or the output, and an open-circuit reading, never interleave (the engine's next step
        # and the supervisor's read at a step's start): one at a time
        self._setting = asyncio.Lock()
        self._in_block = False  # a trigger model of ours runs: only its buffer is read
        self._block_read = 0  # readings of the running block read so far
        self._period = 0.0

    @property
    def name(self) -> str:
        return self._io.name

    async def identify(self) -> str:
        return await self._io.query("*IDN?")

    async def setup(self) -> str:
        """Make sure it speaks SCPI, clear its errors, open the output relay when off; return *IDN?."""
        language = await self._io.query("*LANG?")
        if not re.fullmatch(r"[A-Za-z0-9]+", language.strip()):  # garbage, or not a 2450 at all (a web page)
            raise ProtocolError(self.name, "*LANG?", language, "a command set name (SCPI, TSP, SCPI2400)")
        if language.strip().upper() != "SCPI":
            raise InstrumentError(
                self.name, [f"command set is {language!r}; switch the instrument to SCPI"], "*LANG?"
            )
        await self._io.write("*CLS")
        # a trigger model a previous connection left running (a controller killed while the instrument ran a step:
        # the guardian's connection) is stopped first, so the settings and an output-off after it are taken
        await self._configure(":ABOR;:OUTP:CURR:SMOD HIMP;:OUTP:VOLT:SMOD HIMP;:SENS:VOLT:RSEN ON;:SENS:CURR:RSEN ON")
        return await self.identify()

    async def source_current(self, amps: float, *, voltage_limit: float) -> None:
        """Source a constant current (positive = into the cell), clamped at voltage_limit."""
        await self._set_source(
            f':SOUR:FUNC CURR;:SOUR:CURR:VLIM {voltage_limit:g};:SOUR:CURR {amps:g};:SENS:FUNC "VOLT"', "CURR")

    async def source_voltage(self, volts: float, *, current_limit: float) -> None:
        """Source a constant voltage, the current clamped at ±current_limit."""
        await self._set_source(
            f':SOUR:FUNC VOLT;:SOUR:VOLT:ILIM {current_limit:g};:SOUR:VOLT {volts:g};:SENS:FUNC "CURR"', "VOLT")

    async def _set_source(self, command: str, kind: str) -> None:
        async with self._setting:
            await self._configure(command)
            self._sourcing, self._source = command, kind

    async def output(self, on: bool) -> None:
        await self.end_block()  # a block of ours runs: stopped first (the output as the step left it, then this)
        async with self._setting:
            await self._configure(f":OUTP {'ON' if on else 'OFF'}")
            self._on = on

    async def output_is_on(self) -> bool:
        return self._parse_bool(":OUTP?", await self._io.query(":OUTP?"))

    async def measure(self) -> Reading:
        """The sense reading and the source readback, taken together. With the output off (its relay open in the
        high-impedance off state, where the manual says nothing can be measured, page 2-83) the open-circuit
        voltage is read as the manual allows: the output on as a 0 A current source under a voltage limit, one
        reading, the output off again."""
        if self._in_block:  # the trigger model owns the measurements (a :READ? is refused): its newest reading
            command = f':FETC? "{BLOCK_BUFFER}", READ, SOUR'
            measured, sourced = self._parse_floats(command, await self._io.query(command), 2)
            return Reading(measured, sourced) if self._source == "CURR" else Reading(sourced, measured)
        if self._on is None:
            self._on = await self.output_is_on()
        if not self._on:
            async with self._setting:
                if not self._on:  # (turned on meanwhile: read it as it sources)
                    return await self._open_circuit()
        if self._source is None:
            function = (await self._io.query(":SOUR:FUNC?")).strip().upper()
            if not function.startswith(("CURR", "VOLT")):
                raise ProtocolError(self.name, ":SOUR:FUNC?", function, "CURR or VOLT")
            self._source = function[:4]
        command = ':READ? "defbuffer1", READ, SOUR'
        reply = await self._io.query(command)
        values = self._parse_floats(command, reply, 2)
        measured, sourced = values
        if self._source == "CURR":
            return Reading(voltage=measured, current=sourced)
        return Reading(voltage=sourced, current=measured)

    # --- a step run on the instrument (roles.Buffered) ------------------------------------
    async def start_block(self, plan: BlockPlan) -> None:
        """Build the step as a trigger model (reference manual, section 6: TRIGger:BLOCk) and start it: the buffer
        cleared, the output on, then a delay of one period, a reading, the safety window's and the step's own
        limit branches to an output-off block, and a counter back to the delay; when the count is done the model
        ends with the output on (the host carries on)."""
        if plan.source == "current":
            await self.source_current(plan.level, voltage_limit=plan.limit)
        else:
            await self.source_voltage(plan.level, current_limit=plan.limit)
        buf = f'"{BLOCK_BUFFER}"'
        # a model left running (by a connection that dropped while it ran) is stopped first
        blocks = [":ABOR", ':TRIG:LOAD "Empty"', f":TRIG:BLOC:BUFF:CLE 1, {buf}", ":TRIG:BLOC:SOUR:STAT 2, ON",
                  f":TRIG:BLOC:DEL:CONS 3, {plan.period:g}", f":TRIG:BLOC:MEAS 4, {buf}, 1"]
        branches = []
        if plan.window is not None:
            branches.append(("OUTS", *plan.window))
        if plan.stop is not None:
            branches.append((LIMIT_TYPES[plan.stop.kind], plan.stop.low, plan.stop.high))
        n = 5
        off = n + len(branches) + 2  # after the branches, the counter and the branch past the off block
        for kind, low, high in branches:
            blocks.append(f":TRIG:BLOC:BRAN:LIM:CONS {n}, {kind}, {low:.10g}, {high:.10g}, {off}, 4")
            n += 1
        blocks += [f":TRIG:BLOC:BRAN:COUN {n}, {max(plan.count, 1)}, 3", f":TRIG:BLOC:BRAN:ALW {n + 1}, {off + 1}",
                   f":TRIG:BLOC:SOUR:STAT {off}, OFF", f":TRIG:BLOC:NOP {off + 1}"]
        async with self._setting:
            await self._configure(";".join(blocks))
            await self._configure(":INIT")
            self._on, self._block_read, self._in_block, self._period = True, 0, True, plan.period

    async def block_readings(self) -> tuple[list[BlockReading], bool]:
        """The readings taken since the last call (one query for the state and count, one for the data) and
        whether the model has ended; an instrument whose model failed raises its errors."""
        if not self._in_block:
            return [], True
        command = f':TRIG:STAT?;:TRAC:ACT? "{BLOCK_BUFFER}"'
        reply = await self._io.query(command)
        parts = reply.split(";")
        if len(parts) != 4 or not parts[3].strip().isdigit():
            raise ProtocolError(self.name, command, reply, "the trigger state, its block and a reading count")
        state, taken = parts[0].strip().upper(), int(parts[3])
        if state == "FAILED":
            self._in_block = False
            raise InstrumentError(self.name, await self.errors() or ["the trigger model failed"], ":INIT")
        readings = await self._rows(taken)
        ended = state not in RUNNING_STATES
        if ended:
            self._in_block = False
            self._on = None  # the model may have turned it off: asked when next needed
        return readings, ended

    async def _rows(self, taken: int) -> list[BlockReading]:
        """The buffer's rows after those read so far, up to `taken`."""
        if taken <= self._block_read:
            return []
        command = f':TRAC:DATA? {self._block_read + 1}, {taken}, "{BLOCK_BUFFER}", READ, SOUR, REL'
        values = self._parse_floats(command, await self._io.query(command), 3 * (taken - self._block_read))
        readings = []
        for k in range(0, len(values), 3):
            measured, sourced, rel = values[k:k + 3]
            v, i = (measured, sourced) if self._source == "CURR" else (sourced, measured)
            readings.append(BlockReading(self._period + rel, v, i))  # the first reading after one period
        self._block_read = taken
        return readings

    async def resume_block(self, plan: BlockPlan, read: int) -> None:
        self._source = "CURR" if plan.source == "current" else "VOLT"
        self._in_block, self._block_read, self._period, self._on = True, read, plan.period, None

    async def end_block(self) -> list[BlockReading]:
        """Stop a running block (the output as it stands) and return the readings it took since the last read
        (one may have met a limit, the output then off); nothing if none runs."""
        if not self._in_block:
            return []
        async with self._setting:
            await self._configure(":ABOR")
            self._in_block, self._on = False, None
            command = f':TRAC:ACT? "{BLOCK_BUFFER}"'
            reply = await self._io.query(command)
            if not reply.strip().isdigit():
                raise ProtocolError(self.name, command, reply, "a reading count")
            return await self._rows(int(reply))

    async def _open_circuit(self) -> Reading:
        """(Under the setting lock.) The output off again afterwards, and the source set up as it was before, so
        that a step whose source was set while its output was off starts with its own setpoint."""
        await self._configure(f':SOUR:FUNC CURR;:SOUR:CURR:VLIM {OCV_VOLTAGE_LIMIT:g};:SOUR:CURR 0;'
                              ':SENS:FUNC "VOLT";:OUTP ON')
        try:
            command = ':READ? "defbuffer1", READ'
            (voltage,) = self._parse_floats(command, await self._io.query(command), 1)
        finally:
            await self._configure(":OUTP OFF")
            if self._sourcing is not None:
                await self._configure(self._sourcing)
        return Reading(voltage=voltage, current=0.0)

    async def measure_voltage(self) -> float:
        return self._parse_floats(":MEAS:VOLT?", await self._io.query(":MEAS:VOLT?"), 1)[0]

    async def measure_current(self) -> float:
        return self._parse_floats(":MEAS:CURR?", await self._io.query(":MEAS:CURR?"), 1)[0]

    async def errors(self) -> list[str]:
        """Drain the error queue; each entry as '<code>: <text>'."""
        found: list[str] = []
        for _ in range(MAX_QUEUED_ERRORS):
            reply = await self._io.query(":SYST:ERR?")
            m = _ERROR_RE.match(reply)
            if not m:
                raise ProtocolError(self.name, ":SYST:ERR?", reply, 'an error entry like 0,"No error"')
            code, text = int(m.group(1)), m.group(2).split(";")[0]
            if code == 0:
                break
            found.append(f"{code}: {text}")
        return found

    async def _configure(self, command: str) -> None:
        await self._io.write(command)
        if errors := await self.errors():
            raise InstrumentError(self.name, errors, command)

    def _parse_floats(self, command: str, reply: str, count: int) -> list[float]:
        parts = reply.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != count:
            raise ProtocolError(self.name, command, reply, f"{count} comma-separated numbers")
        return [math.nan if abs(v) >= OVERFLOW else v for v in values]

    def _parse_bool(self, command: str, reply: str) -> bool:
        if reply.strip() in ("0", "1"):
            return reply.strip() == "1"
        raise ProtocolError(self.name, command, reply, "0 or 1")


async def _open(req: OpenRequest) -> Opened:
    return await open_line_driver(req, Keithley2450, Keithley2450.setup)


async def _blind_off(req: OpenRequest) -> None:
    transport = await open_transport(req.resource, name=req.name, timeout=req.timeout, backend=req.backend,
                                     baud_rate=req.baud_rate)
    try:
        await transport.write(":ABOR;:OUTP OFF")  # a step the instrument runs is stopped with it
    finally:
        await transport.close()


class Keithley2450Settings(SerialSettings):
    """A Keithley 2450 on the network, GPIB, USB or RS-232."""

    driver: Literal["keithley2450"]
    run_steps: bool = Field(default=False, description="run the steps it can on the instrument (constant current "
                                                       "or voltage, rests): its trigger model judges the cut-off and "
                                                       "the safety window at each of its readings, turns the output "
                                                       "off there whatever the host does, and is read in blocks")

    @property
    def steps_on_instrument(self) -> bool:
        return self.run_steps


DRIVERS = [
    DriverSpec("keithley2450", ("cycler",), _open, "Keithley 2450 SourceMeter, SCPI (LAN socket, GPIB, USB, RS-232)",
               baud_rate=9600, simulator="cellbench.simulators.keithley2450:serve",
               rehearsal="cellbench.simulators.keithley2450:rehearse", blind_off=_blind_off,
               settings=Keithley2450Settings,
               max_current=1.05),  # its 1 A range sources up to 1.05 A (2450 reference manual, ranges)
]
