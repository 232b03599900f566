"""Stack-pressure presses: Modbus devices on the register map of docs/protocols/press.md."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any, Literal, Self

from pydantic import Field
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from cellbench.drivers.errors import ConnectionLost, InstrumentError, InstrumentTimeout
from cellbench.drivers.registry import DriverSpec, Opened, OpenRequest, SerialSettings, SharedSettings
from cellbench.drivers.transport import parse_resource, serial_device
from cellbench.roles import PressSnapshot, PressStatus

FORCE_SETPOINT, FORCE, POSITION, RAMP, MODE, COMMAND, STATUS = 0, 2, 4, 6, 8, 9, 10
DISPLACEMENT, FORCE_LIMIT, PLATEN_T = 11, 13, 15
ENABLE, STOP, TARE, CLEAR_FAULT = 1, 2, 3, 4
EXCEPTIONS = {1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure"}


class StackPress:
    """A press holding a cell stack at a pressure (Pa, as the run-time speaks) over the cell's active area; its wire
    speaks force (kN): 1 kN on 1 cm² is 10 MPa."""

    model = "Modbus stack press"

    def __init__(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient, *, name: str, area_cm2: float,
                 device_id: int = 1, timeout: float = 2.0) -> None:
        self._client = client
        self.name = name
        self.area_cm2 = area_cm2
        self.device_id = device_id
        self.timeout = timeout
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, resource: str, *, name: str, area_cm2: float, device_id: int = 1,
                   timeout: float = 2.0, baud_rate: int = 19200) -> Self:
        """Connect over Modbus TCP (TCPIP::host::port::SOCKET) or RTU (ASRL<device>::INSTR)."""
        res = parse_resource(resource)
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if res.is_socket:
            client = AsyncModbusTcpClient(res.host, port=res.port, timeout=timeout, retries=0, reconnect_delay=0)
        elif res.interface == "ASRL":
            client = AsyncModbusSerialClient(serial_device(res.device), baudrate=baud_rate, timeout=timeout,
                                             retries=0, reconnect_delay=0)
        else:
            raise ValueError(f"{resource}: a press is reached by Modbus TCP or RTU (TCPIP ... SOCKET or ASRL)")
        if not await client.connect():
            client.close()
            raise ConnectionLost(name, f"cannot connect to the press at {resource}")
        return cls(client, name=name, area_cm2=area_cm2, device_id=device_id, timeout=timeout)

    async def close(self) -> None:
        self._client.close()

    async def identify(self) -> str:
        return f"{self.model}, Modbus device {self.device_id}"

    # --- in the lab's units ----------------------------------------------------------------
    def force_for(self, pa: float) -> float:
        """kN for a pressure in Pa over the active area."""
        return pa * self.area_cm2 / 1e7

    def pressure_of(self, kn: float) -> float:
        """Pa for a force in kN over the active area."""
        return kn * 1e7 / self.area_cm2

    async def set_pressure(self, pa: float, *, ramp_pa_per_s: float | None = None) -> None:
        """Hold the stack at a pressure (force hold), enabling the press."""
        if ramp_pa_per_s is not None:
            await self._write_float(RAMP, self.force_for(ramp_pa_per_s))
        await self._write_float(FORCE_SETPOINT, self.force_for(pa))
        await self._write_word(MODE, 1)
        await self._write_word(COMMAND, ENABLE)

    async def pressure(self) -> float:
        """Pa."""
        return self.pressure_of(await self._read_float(FORCE))

    async def force(self) -> float:
        return await self._read_float(FORCE)

    async def displacement_um(self) -> float:
        return await self._read_float(DISPLACEMENT)

    async def platen_temperature(self) -> float:
        return await self._read_float(PLATEN_T)

    async def snapshot(self) -> PressSnapshot:
        """Force, pressure, displacement and platen temperature in one Modbus read."""
        words = await self._read(0, 17)
        f = [self._float(words[a:a + 2]) for a in (FORCE, DISPLACEMENT, PLATEN_T)]
        return PressSnapshot(f[0], self.pressure_of(f[0]), f[1], f[2])

    async def set_force_limit(self, kn: float) -> None:
        await self._write_float(FORCE_LIMIT, kn)

    async def status(self) -> PressStatus:
        bits = (await self._read(STATUS, 1))[0]
        return PressStatus(bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8))

    async def stop(self) -> None:
        await self._write_word(COMMAND, STOP)

    async def tare(self) -> None:
        await self._write_word(COMMAND, TARE)

    async def clear_fault(self) -> None:
        await self._write_word(COMMAND, CLEAR_FAULT)

    # --- registers -------------------------------------------------------------------------
    async def _read(self, address: int, count: int) -> list[int]:
        rr: Any = await self._call(f"read {count} registers at {address}",
                                   self._client.read_holding_registers(address, count=count, device_id=self.device_id))
        return list(rr.registers)

    async def _read_float(self, address: int) -> float:
        return self._float(await self._read(address, 2))

    def _float(self, words: list[int]) -> float:
        value: Any = self._client.convert_from_registers(words, self._client.DATATYPE.FLOAT32)
        return float(value)

    async def _write_float(self, address: int, value: float) -> None:
        words = self._client.convert_to_registers(float(value), self._client.DATATYPE.FLOAT32)
        await self._call(f"write {value:g} at {address}",
                         self._client.write_registers(address, words, device_id=self.device_id))

    async def _write_word(self, address: int, value: int) -> None:
        await self._call(f"write {value} at {address}",
                         self._client.write_register(address, value, device_id=self.device_id))

    async def _call(self, what: str, request: Awaitable[Any]) -> Any:
        async with self._lock:
            try:
                rr = await asyncio.wait_for(request, self.timeout + 0.5)
            except TimeoutError:
                raise InstrumentTimeout(self.name, what, self.timeout, b"") from None
            except ModbusException as exc:
                if "timeout" in str(exc).lower() or "no response" in str(exc).lower():
                    raise InstrumentTimeout(self.name, what, self.timeout, b"") from None
                raise ConnectionLost(self.name, f"{what}: {exc}") from exc
        if rr.isError():
            code = getattr(rr, "exception_code", 0)
            raise InstrumentError(self.name, [f"Modbus exception {code}: {EXCEPTIONS.get(code, 'error')}"], what)
        return rr


# A Modbus load-cell indicator (docs/protocols/press.md, "Load-cell indicator"): read-only force
NET, GROSS, LC_STATUS, LC_COMMAND, CAPACITY = 0, 2, 4, 5, 6
LC_OVERLOAD, LC_NEGATIVE, LC_STABLE, LC_ADC_FAULT = 1, 2, 4, 8
LC_TARE, LC_CLEAR = 1, 2


class LoadCell(StackPress):
    """A load cell and its Modbus indicator under a manual or spring fixture: it reads the stack's force (and
    so its pressure over the active area) and tares, but cannot set a pressure: that is done by hand."""

    model = "Modbus load-cell indicator"

    async def set_pressure(self, pa: float, *, ramp_pa_per_s: float | None = None) -> None:
        raise InstrumentError(self.name, [f"a load cell cannot set a pressure ({pa / 1e6:g} MPa asked): the fixture "
                                          "is set by hand"], "set pressure")

    async def force(self) -> float:
        return await self._read_float(NET)

    async def pressure(self) -> float:
        """Pa."""
        return self.pressure_of(await self.force())

    async def snapshot(self) -> PressSnapshot:
        """The net force as pressure; a load cell knows no displacement or platen temperature (NaN)."""
        force = await self.force()
        return PressSnapshot(force, self.pressure_of(force), math.nan, math.nan)

    async def status(self) -> PressStatus:
        """Overload (latched) and an ADC fault as the interlocks see them; 'enabled' means reading."""
        bits = (await self._read(LC_STATUS, 1))[0]
        return PressStatus(True, bool(bits & LC_STABLE), bool(bits & LC_OVERLOAD), bool(bits & LC_ADC_FAULT))

    async def tare(self) -> None:
        await self._write_word(LC_COMMAND, LC_TARE)

    async def clear_fault(self) -> None:
        await self._write_word(LC_COMMAND, LC_CLEAR)

    async def stop(self) -> None:
        return None  # nothing to stop: it only reads

    async def capacity_kn(self) -> float:
        return await self._read_float(CAPACITY)


async def _open_load_cell(req: OpenRequest) -> Opened:
    cell = await LoadCell.open(req.resource, name=req.name, area_cm2=req.area_cm2, device_id=req.device_id,
                               timeout=req.timeout, baud_rate=req.baud_rate)
    try:
        return Opened(cell, f"{cell.model}, Modbus device {cell.device_id}, {await cell.capacity_kn():g} kN",
                      cell.close)
    except BaseException:
        await cell.close()
        raise


async def _open(req: OpenRequest) -> Opened:
    press = await StackPress.open(req.resource, name=req.name, area_cm2=req.area_cm2, device_id=req.device_id,
                                  timeout=req.timeout, baud_rate=req.baud_rate)
    try:
        return Opened(press, await press.identify(), press.close)
    except BaseException:
        await press.close()
        raise


# Modbus TCP's own port is 502 (what a real press's PLC listens on); it needs root to serve, so `cellbench sim
# serve press` listens on 5502 unless told --port 502 (docs/protocols/press.md)
MODBUS_SIM_PORT = 5502

class _ModbusSettings(SerialSettings, SharedSettings):
    device_id: int = Field(default=1, ge=0, le=247, description="its Modbus unit id")

    def _own(self) -> dict[str, Any]:
        return {**super()._own(), "device_id": self.device_id}


class PressSettings(_ModbusSettings):
    """A stack-pressure press on Modbus TCP or RTU."""

    driver: Literal["modbus-press"]


class LoadCellSettings(_ModbusSettings):
    """A load-cell indicator on Modbus TCP or RTU."""

    driver: Literal["modbus-load-cell"]


DRIVERS = [
    DriverSpec("modbus-press", ("press",), _open, "stack-pressure press on Modbus TCP or RTU (docs/protocols/press.md)",
               baud_rate=19200, simulator="cellbench.simulators.press:serve",
               rehearsal="cellbench.simulators.press:rehearse", extra={"port": MODBUS_SIM_PORT},
               settings=PressSettings),
    DriverSpec("modbus-load-cell", ("press",), _open_load_cell,
               "load-cell indicator on Modbus under a manual or spring fixture: reads the stack pressure, "
               "cannot set it", baud_rate=19200, simulator="cellbench.simulators.press:serve_load_cell",
               rehearsal="cellbench.simulators.press:rehearse_load_cell",
               sets_pressure=False, extra={"port": MODBUS_SIM_PORT}, settings=LoadCellSettings),
]
