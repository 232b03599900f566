"""A channel binds one cell to the instruments that act on it: its cycler, and maybe a chamber and a press."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from cellbench.bench.config import BenchConfig, CellConfig, InstrumentConfig
from cellbench.drivers.chamber import EspecChamber
from cellbench.drivers.methodscript import PalmSens
from cellbench.drivers.press import StackPress
from cellbench.drivers.smu import Keithley2450, Reading
from cellbench.drivers.transport import open_transport


class Cycler(Protocol):
    """What the engine needs of the instrument that sources and sinks the cell's current."""

    @property
    def name(self) -> str: ...

    async def source_current(self, amps: float, *, voltage_limit: float) -> None: ...

    async def source_voltage(self, volts: float, *, current_limit: float) -> None: ...

    async def output(self, on: bool) -> None: ...

    async def measure(self) -> Reading: ...

    async def output_is_on(self) -> bool: ...


@dataclass(frozen=True)
class Conditions:
    """What the auxiliary instruments read at one sample (None where the channel has no such instrument)."""

    ambient_c: float | None = None
    cell_c: float | None = None
    pressure_mpa: float | None = None
    displacement_um: float | None = None


@dataclass
class Channel:
    name: str
    cell: CellConfig
    cycler: Cycler
    identity: dict[str, str] = field(default_factory=dict)  # instrument name -> identification
    chamber: EspecChamber | None = None
    press: StackPress | None = None
    potentiostat: PalmSens | None = None

    async def conditions(self) -> Conditions:
        """Read the chamber and the press, if the channel has them."""
        ambient = (await self.chamber.temperature()).measured if self.chamber else None
        if self.press is None:
            return Conditions(ambient)
        snap = await self.press.snapshot()
        return Conditions(ambient, snap.platen_c, snap.pressure_mpa, snap.displacement_um)


class Instruments:
    """Every instrument a bench's channels name, each opened once and shared by its channels."""

    def __init__(self, bench: BenchConfig) -> None:
        self.bench = bench
        self.drivers: dict[str, Any] = {}
        self.identity: dict[str, str] = {}
        self._closers: list[Any] = []

    async def __aenter__(self) -> Instruments:
        try:
            for ch in self.bench.channels.values():
                cell = self.bench.cells[ch.cell]
                for ref in (ch.cycler, ch.chamber, ch.press, ch.potentiostat):
                    if ref is not None and ref not in self.drivers:
                        await self._open(ref, self.bench.instruments[ref], cell)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _open(self, name: str, cfg: InstrumentConfig, cell: CellConfig) -> None:
        if cfg.driver == "modbus-press":
            press = await StackPress.open(cfg.resource, name=name, area_cm2=cell.area, device_id=cfg.device_id,
                                          timeout=cfg.timeout, baud_rate=cfg.baud)
            self._closers.append(press.close)
            self.drivers[name], self.identity[name] = press, await press.identify()
            return
        crlf = cfg.driver == "espec"
        transport = await open_transport(
            cfg.resource, name=name, timeout=cfg.timeout, backend=cfg.backend, baud_rate=cfg.baud,
            read_termination="\r\n" if crlf else "\n", write_termination="\r\n" if crlf else "\n",
        )
        self._closers.append(transport.close)
        if cfg.driver == "espec":
            chamber = EspecChamber(transport, address=cfg.address)
            self.drivers[name], self.identity[name] = chamber, await chamber.identify()
        elif cfg.driver == "palmsens":
            pstat = PalmSens(transport)
            self.drivers[name], self.identity[name] = pstat, await pstat.identify()
        else:
            smu = Keithley2450(transport)
            self.drivers[name], self.identity[name] = smu, await smu.setup()

    def channel(self, name: str) -> Channel:
        ch = self.bench.channels[name]
        refs = [r for r in (ch.cycler, ch.chamber, ch.press, ch.potentiostat) if r is not None]
        return Channel(
            name, self.bench.cells[ch.cell], self.drivers[ch.cycler], {r: self.identity[r] for r in refs},
            chamber=self.drivers.get(ch.chamber) if ch.chamber else None,
            press=self.drivers.get(ch.press) if ch.press else None,
            potentiostat=self.drivers.get(ch.potentiostat) if ch.potentiostat else None,
        )

    async def __aexit__(self, *exc: object) -> None:
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()
        self._closers = []
