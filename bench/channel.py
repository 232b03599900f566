"""A channel binds one cell to the instruments that drive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from bench.config import CellConfig, InstrumentConfig
from drivers.smu import Keithley2450, Reading
from drivers.transport import LineTransport, open_transport


class Cycler(Protocol):
    """What the engine needs of the instrument that sources and sinks the cell's current."""

    @property
    def name(self) -> str: ...

    async def source_current(self, amps: float, *, voltage_limit: float) -> None: ...

    async def source_voltage(self, volts: float, *, current_limit: float) -> None: ...

    async def output(self, on: bool) -> None: ...

    async def measure(self) -> Reading: ...


@dataclass
class Channel:
    name: str
    cell: CellConfig
    cycler: Cycler
    identity: dict[str, str] = field(default_factory=dict)  # instrument name -> *IDN?


async def connect_cycler(name: str, cfg: InstrumentConfig) -> tuple[Keithley2450, LineTransport, str]:
    """Open the wire to a cycler, check it speaks our language, and return driver, wire and identity."""
    transport = await open_transport(cfg.resource, name=name, timeout=cfg.timeout, backend=cfg.backend)
    driver = Keithley2450(transport)
    try:
        identity = await driver.setup()
    except BaseException:
        await transport.close()
        raise
    return driver, transport, identity
