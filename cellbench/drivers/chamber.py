"""Environmental chambers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cellbench.drivers.errors import InstrumentError, ProtocolError
from cellbench.drivers.registry import DriverSpec, Opened, OpenRequest, SerialSettings, SharedSettings
from cellbench.drivers.transport import Transport, open_line_driver
from cellbench.roles import ChamberTemperature


class EspecChamber:
    """ESPEC environmental chamber, its RS-232C/485 and LAN text protocol (lines end in CR LF)."""

    model = "ESPEC"
    modes = ("OFF", "STANDBY", "CONSTANT")

    def __init__(self, transport: Transport, *, address: int | None = None) -> None:
        self._io = transport
        self._prefix = f"{address}," if address is not None else ""

    @property
    def name(self) -> str:
        return self._io.name

    async def identify(self) -> str:
        return await self._ask("TYPE?")

    async def temperature(self) -> ChamberTemperature:
        reply = await self._ask("TEMP?")
        values = _floats(self.name, "TEMP?", reply, 4)
        return ChamberTemperature(*values)

    async def set_temperature(self, celsius: float) -> None:
        await self._set(f"TEMP, S{celsius:.1f}")

    async def set_alarms(self, *, upper: float, lower: float) -> None:
        await self._set(f"TEMP, H{upper:.1f} L{lower:.1f}")

    async def mode(self) -> str:
        return (await self._ask("MODE?")).strip().upper()

    async def set_mode(self, mode: str) -> None:
        if mode.upper() not in self.modes:
            raise ValueError(f"mode must be one of {', '.join(self.modes)}, not {mode!r}")
        await self._set(f"MODE, {mode.upper()}")

    async def power(self, on: bool) -> None:
        await self._set(f"POWER, {'ON' if on else 'OFF'}")

    async def alarms(self) -> list[int]:
        reply = await self._ask("ALARM?")
        parts = reply.split(",")
        try:
            count, codes = int(parts[0]), [int(x) for x in parts[1:] if x.strip()]
        except ValueError:
            raise ProtocolError(self.name, "ALARM?", reply, "a count and alarm codes") from None
        return codes[:count]

    async def _ask(self, command: str) -> str:
        reply = await self._io.query(self._prefix + command)
        if reply.startswith("NA:"):
            raise InstrumentError(self.name, [reply], command)
        return reply

    async def _set(self, command: str) -> None:
        reply = await self._ask(command)
        if not reply.startswith("OK:"):
            raise ProtocolError(self.name, command, reply, "an OK: acknowledgement")


def _floats(name: str, command: str, reply: str, count: int) -> list[float]:
    try:
        values = [float(x) for x in reply.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ProtocolError(name, command, reply, f"{count} comma-separated numbers")
    return values


async def _open(req: OpenRequest) -> Opened:
    return await open_line_driver(req, lambda io: EspecChamber(io, address=req.address), EspecChamber.identify,
                                  termination="\r\n")


class EspecSettings(SerialSettings, SharedSettings):
    """An ESPEC chamber on RS-232C, RS-485 (with its address) or the network."""

    driver: Literal["espec"]
    address: int | None = Field(default=None, ge=0, description="its RS-485 address (none on RS-232C and LAN)")

    def _own(self) -> dict[str, Any]:
        return {**super()._own(), "address": self.address}


DRIVERS = [
    DriverSpec("espec", ("chamber",), _open, "ESPEC temperature chamber, its text protocol (RS-232C/485, LAN)",
               baud_rate=9600, simulator="cellbench.simulators.espec:serve",
               rehearsal="cellbench.simulators.espec:rehearse", settings=EspecSettings),
]
