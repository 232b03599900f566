"""Simulated stack-pressure press: the Modbus register map of docs/protocols/press.md over a real wire.

The force follows its setpoint at the ramp rate and then with the controller's lag; the cells in
the stack feel it as pressure (force over their area), and the press sees their swelling as
displacement. pymodbus serves the registers (TCP, or RTU on a serial line).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from cellbench.simulators.cell import TIME_EPS, SolidStateCell
from cellbench.simulators.parameters import PRESETS
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.server import ServeOptions

FORCE_SETPOINT, FORCE, POSITION, RAMP, MODE, COMMAND, STATUS = 0, 2, 4, 6, 8, 9, 10
DISPLACEMENT, FORCE_LIMIT, PLATEN_T, POSITION_SETPOINT = 11, 13, 15, 17
FLOATS = {FORCE_SETPOINT, FORCE, POSITION, RAMP, DISPLACEMENT, FORCE_LIMIT, PLATEN_T, POSITION_SETPOINT}
WRITABLE = {FORCE_SETPOINT, FORCE_SETPOINT + 1, RAMP, RAMP + 1, MODE, COMMAND, FORCE_LIMIT, FORCE_LIMIT + 1,
            POSITION_SETPOINT, POSITION_SETPOINT + 1}
MAP_SIZE = 19
ENABLED, AT_SETPOINT, OVER_FORCE, FAULT = 1, 2, 4, 8
READ_FUNCTIONS, WRITE_FUNCTIONS = {3}, {6, 16}
WRITE_SINGLE = 6
MAX_SUBSTEP = 1.0


def float_to_words(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def words_to_float(words: Sequence[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", words[0], words[1]))[0])


class PressSim:
    """The press: its registers and its mechanics, acting on the cells in its stack."""

    name = "press"

    def __init__(
        self,
        now: Callable[[], float],
        cells: list[SolidStateCell] | None = None,
        *,
        area_cm2: float = 1.0,
        lag_s: float = 2.0,
        stiffness_kn_per_mm: float = 50.0,
        holding_mpa: float | None = None,
    ) -> None:
        self._now = now
        self._t = now()
        self.cells = list(cells or [])
        self.area_cm2 = area_cm2
        self.lag = lag_s
        self.stiffness = stiffness_kn_per_mm
        self.setpoint_kn = 0.0
        self.force_kn = 0.0
        self.command_kn = 0.0
        self.ramp_kn_s = 0.1
        self.limit_kn = 5.0
        self.position_setpoint_mm = 10.0
        self.mode = 0
        self.enabled = False
        self.fault = False
        self.over_force = False
        self._tare_um = self._stack_um()
        if holding_mpa is not None:  # assembled under pressure: enabled and holding already
            self.setpoint_kn = self.force_kn = self.command_kn = holding_mpa * area_cm2 / 10.0
            self.mode, self.enabled = 1, True

    # --- mechanics ------------------------------------------------------------------------
    def _stack_um(self) -> float:
        return sum(c.thickness_change_um() for c in self.cells) / max(len(self.cells), 1)

    def advance(self, t: float | None = None) -> None:
        t = self._now() if t is None else t
        while t - self._t > TIME_EPS:  # a remainder below it cannot be added to a large time
            self._trip_if_over_force()
            dt = min(MAX_SUBSTEP, t - self._t)
            target = self._target_kn()
            if abs(target - self.command_kn) < 1e-12 and abs(self.command_kn - self.force_kn) < 1e-9:
                self.force_kn, self._t = self.command_kn, t  # settled: nothing moves until a new command
                break
            # the ramp limits the commanded force; the measured force follows the command with a lag
            step = max(-self.ramp_kn_s * dt, min(self.ramp_kn_s * dt, target - self.command_kn))
            self.command_kn += step
            self.force_kn += (self.command_kn - self.force_kn) * (1 - math.exp(-dt / self.lag))
            self._t += dt
        self._trip_if_over_force()
        for cell in self.cells:
            cell.pressure_mpa = self.pressure_mpa

    def _target_kn(self) -> float:
        """The force the actuator works toward: the setpoint in force hold; in position hold, the force that
        keeps the actuator at its position setpoint against the stack (it grows as the stack swells)."""
        if not self.enabled or self.fault:
            return 0.0
        if self.mode == 1:
            return self.setpoint_kn
        if self.mode == 2:
            free = 10.0 + self.displacement_um() / 1000.0  # where the platen would sit on the unloaded stack
            return max(0.0, (free - self.position_setpoint_mm) * self.stiffness)
        return 0.0

    def _trip_if_over_force(self) -> None:
        if self.force_kn > self.limit_kn:
            self.over_force = self.fault = True
            self.enabled = False

    @property
    def pressure_mpa(self) -> float:
        return self.force_kn * 10.0 / self.area_cm2

    def displacement_um(self) -> float:
        return self._stack_um() - self._tare_um

    def _status(self) -> int:
        at = self.enabled and abs(self.force_kn - self.setpoint_kn) <= max(0.01, 0.01 * self.setpoint_kn)
        return (ENABLED * self.enabled) | (AT_SETPOINT * at) | (OVER_FORCE * self.over_force) | (FAULT * self.fault)

    def _value(self, address: int) -> float | int:
        return {
            FORCE_SETPOINT: self.setpoint_kn,
            FORCE: self.force_kn,
            POSITION: 10.0 + self.displacement_um() / 1000.0 - self.force_kn / self.stiffness,
            RAMP: self.ramp_kn_s,
            MODE: self.mode,
            COMMAND: 0,
            STATUS: self._status(),
            DISPLACEMENT: self.displacement_um(),
            FORCE_LIMIT: self.limit_kn,
            PLATEN_T: sum(c.temperature_c for c in self.cells) / len(self.cells) if self.cells else 25.0,
            POSITION_SETPOINT: self.position_setpoint_mm,
        }[address]

    # --- registers ------------------------------------------------------------------------
    def read(self, address: int, count: int) -> list[int] | ExcCodes:
        self.advance()
        if not 1 <= count <= 125:
            return ExcCodes.ILLEGAL_VALUE  # the Modbus spec: 1 to 125 registers a read
        if address < 0 or address + count > MAP_SIZE:
            return ExcCodes.ILLEGAL_ADDRESS
        words: list[int] = []
        a = 0
        while a < MAP_SIZE:
            if a in FLOATS:
                words += float_to_words(float(self._value(a)))
                a += 2
            else:
                words.append(int(self._value(a)))
                a += 1
        return words[address:address + count]

    def write(self, address: int, values: Sequence[int]) -> ExcCodes | None:
        self.advance()
        span = range(address, address + len(values))
        if not all(a in WRITABLE for a in span):
            return ExcCodes.ILLEGAL_ADDRESS
        regs = dict(zip(span, values, strict=True))
        for a in sorted(regs):
            if a in FLOATS:
                if a + 1 not in regs:
                    return ExcCodes.ILLEGAL_ADDRESS  # half a float
                rc = self._set_float(a, words_to_float([regs[a], regs[a + 1]]))
            elif a in (MODE, COMMAND):
                rc = self._set_word(a, regs[a])
            else:
                continue
            if rc is not None:
                return rc
        return None

    def _set_float(self, address: int, value: float) -> ExcCodes | None:
        if math.isnan(value) or value < 0 or (address == RAMP and value == 0):
            return ExcCodes.ILLEGAL_VALUE
        if address == FORCE_SETPOINT:
            if self.enabled and value > self.limit_kn:
                return ExcCodes.ILLEGAL_VALUE
            self.setpoint_kn = value
        elif address == RAMP:
            self.ramp_kn_s = value
        elif address == FORCE_LIMIT:
            self.limit_kn = value
        elif address == POSITION_SETPOINT:
            self.position_setpoint_mm = value
        return None

    def _set_word(self, address: int, value: int) -> ExcCodes | None:
        if address == MODE:
            if value not in (0, 1, 2):
                return ExcCodes.ILLEGAL_VALUE
            self.mode = value
            return None
        if value == 1:  # enable
            if self.fault:
                return ExcCodes.DEVICE_FAILURE
            if self.setpoint_kn > self.limit_kn:
                return ExcCodes.ILLEGAL_VALUE
            self.enabled = True
        elif value == 2:  # stop
            self.enabled = False
        elif value == 3:  # tare
            self._tare_um = self._stack_um()
        elif value == 4:  # clear fault
            self.fault = self.over_force = False
        else:
            return ExcCodes.ILLEGAL_VALUE
        return None


class LoadCellSim:
    """A load cell and its indicator under a spring (or screw) fixture set by hand: the force is the preload
    plus the spring's answer to the stack's swelling. Registers: net force, gross force (float32), status,
    command, capacity (docs/protocols/press.md, "Load-cell indicator")."""

    name = "load-cell"

    def __init__(self, now: Callable[[], float], cells: list[SolidStateCell] | None = None, *,
                 preload_kn: float = 0.5, spring_kn_per_mm: float = 5.0, capacity_kn: float = 5.0,
                 area_cm2: float = 1.0) -> None:
        self._now = now
        self.cells = list(cells or [])
        self.preload_kn, self.spring, self.capacity = preload_kn, spring_kn_per_mm, capacity_kn
        self.area_cm2 = area_cm2
        self._swell0 = self._stack_um()
        self.tare_kn = 0.0
        self.overload = False  # latched until cleared
        self.adc_fault = False

    def _stack_um(self) -> float:
        return sum(c.thickness_change_um() for c in self.cells) / max(len(self.cells), 1)

    @property
    def gross_kn(self) -> float:
        return max(0.0, self.preload_kn + self.spring * (self._stack_um() - self._swell0) / 1000.0)

    def advance(self, t: float | None = None) -> None:
        if self.gross_kn > self.capacity:
            self.overload = True
        for cell in self.cells:
            cell.pressure_mpa = self.gross_kn * 10.0 / self.area_cm2

    def read(self, address: int, count: int) -> list[int] | ExcCodes:
        self.advance()
        if not 1 <= count <= 125:
            return ExcCodes.ILLEGAL_VALUE
        if address < 0 or address + count > 8:
            return ExcCodes.ILLEGAL_ADDRESS
        status = (1 * self.overload) | (2 * (self.gross_kn - self.tare_kn < 0)) | 4 | (8 * self.adc_fault)
        words = [*float_to_words(self.gross_kn - self.tare_kn), *float_to_words(self.gross_kn), status, 0,
                 *float_to_words(self.capacity)]
        return words[address:address + count]

    def write(self, address: int, values: Sequence[int]) -> ExcCodes | None:
        self.advance()
        if address != 5 or len(values) != 1:
            return ExcCodes.ILLEGAL_ADDRESS  # only the command register is writable
        if values[0] == 1:
            self.tare_kn = self.gross_kn
        elif values[0] == 2:
            self.overload = self.gross_kn > self.capacity
        else:
            return ExcCodes.ILLEGAL_VALUE
        return None


class _PressContext(ModbusServerContext):
    """pymodbus's datastore interface, answered by the press model."""

    def __init__(self, press: PressSim | LoadCellSim, device_id: int) -> None:  # no super(): not the default store
        self.press = press
        self.device_id = device_id
        self.old_simulator = True
        self.simdevices = []
        self._written: tuple[int, int] | None = None

    def device_ids(self) -> list[int]:
        return [self.device_id]

    def _mine(self, device_id: int) -> None:
        """Another unit's request (on a shared RS-485 line) is not this press's to answer; 0 is a broadcast."""
        if device_id not in (self.device_id, 0):
            raise NoSuchIdException(f"unit {device_id}")

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> Any:
        self._mine(device_id)
        if func_code == WRITE_SINGLE and self._written is not None and self._written[0] == address:
            return [self._written[1]]  # a Write Single Register is echoed with the value written
        if func_code not in READ_FUNCTIONS | WRITE_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        return self.press.read(address, count)

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Any
    ) -> Any:
        self._mine(device_id)
        if func_code not in WRITE_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        self._written = (address, int(values[0])) if func_code == WRITE_SINGLE and len(values) == 1 else None
        return self.press.write(address, values)


class PressServer:
    """The simulated press on Modbus TCP (loopback) or Modbus RTU (a serial device such as a pty)."""

    def __init__(self, press: PressSim | LoadCellSim, *, device_id: int = 1) -> None:
        self.press = press
        self.device_id = device_id
        self.host, self.port, self.serial_port = "127.0.0.1", 0, ""
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    @property
    def resource(self) -> str:
        if self.serial_port:
            return f"ASRL{self.serial_port}::INSTR"
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> PressServer:
        if port == 0:
            port = _free_port(host)
        self.host, self.port = host, port
        ctx = _PressContext(self.press, self.device_id)
        self._server = ModbusTcpServer(ctx, framer=FramerType.SOCKET, address=(host, port))
        await self._server.serve_forever(background=True)
        return self

    async def start_rtu(self, device: str, baudrate: int = 19200) -> PressServer:
        self.serial_port = device
        ctx = _PressContext(self.press, self.device_id)
        # an RTU slave keeps quiet for other units' requests and carries out broadcasts without answering
        self._server = ModbusSerialServer(ctx, framer=FramerType.RTU, port=device, baudrate=baudrate,
                                          ignore_missing_devices=True, broadcast_enable=True)
        await self._server.serve_forever(background=True)
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
            self._server = None
            await asyncio.sleep(0)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated press holding a cell, for `cellbench sim serve press`: Modbus TCP, or RTU on a serial pty."""
    params = PRESETS[options.cell]
    press = PressSim(asyncio.get_running_loop().time, [SolidStateCell(params, soc=options.soc)],
                     area_cm2=params.area_cm2, holding_mpa=5.0)
    async with _served(press, options, "stack press") as where:
        yield where


@contextlib.asynccontextmanager
async def serve_load_cell(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated load cell under a spring fixture, for `cellbench sim serve load-cell`."""
    params = PRESETS[options.cell]
    sensor = LoadCellSim(asyncio.get_running_loop().time, [SolidStateCell(params, soc=options.soc)],
                         area_cm2=params.area_cm2, preload_kn=0.5 * params.area_cm2)
    async with _served(sensor, options, "load cell") as where:
        yield where


@contextlib.asynccontextmanager
async def _served(device: PressSim | LoadCellSim, options: ServeOptions, what: str) -> AsyncIterator[str]:
    """A Modbus device on TCP, or on RTU at one end of a null-modem pty pair (the client takes the other)."""
    from cellbench.simulators.serial_link import NullModem

    cable = await NullModem().open() if options.serial else None
    server = await (PressServer(device).start_rtu(cable.ends[0]) if cable
                    else PressServer(device).start_tcp(options.host, options.port))
    try:
        yield (f"a simulated {what} at ASRL{cable.ends[1]}::INSTR (Modbus RTU)" if cable
               else f"a simulated {what} at {server.resource} (Modbus TCP)")
    finally:
        await server.close()
        if cable:
            await cable.close()


async def rehearse(r: Rehearsal) -> Rehearsed:
    """A press over every cell it is given (their summed area), holding their reference pressure."""
    device = PressSim(r.time, r.cells, area_cm2=r.area_cm2, holding_mpa=r.cells[0].params.p_ref_mpa)
    return await _rehearsed(r, device)


async def rehearse_load_cell(r: Rehearsal) -> Rehearsed:
    """A load cell under a fixture set by hand to the cells' reference pressure."""
    device = LoadCellSim(r.time, r.cells, area_cm2=r.area_cm2,
                         preload_kn=r.cells[0].params.p_ref_mpa * r.area_cm2 / 10)
    return await _rehearsed(r, device)


async def _rehearsed(r: Rehearsal, device: PressSim | LoadCellSim) -> Rehearsed:
    server = await PressServer(device).start_tcp()
    r.stack.push_async_callback(server.close)
    return Rehearsed(server.resource, part=device)
