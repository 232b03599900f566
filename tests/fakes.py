"""In-process fake instruments that fill the roles, for engine tests that take milliseconds.

The fake cell is deliberately simple, so what a test expects can be worked out by hand: its open-circuit
voltage is linear in the state of charge, with one series resistance and no noise. Time is the running
loop's (a VirtualClock fast-forwards it). The real-wire tests of each instrument live beside their drivers'
tests and are kept as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from cellbench.bench.runtime.cells import CellConfig
from cellbench.bench.runtime.channel import Channel
from cellbench.roles import (
    ChamberTemperature,
    ConnectionLost,
    ImpedancePoint,
    PressSnapshot,
    PressStatus,
    Reading,
)


@dataclass
class FakeCell:
    capacity_ah: float = 3.5e-3
    v_empty: float = 3.0  # OCV at SOC 0
    v_full: float = 4.2  # OCV at SOC 1
    resistance: float = 10.0  # ohm
    soc: float = 0.0

    def ocv(self) -> float:
        return self.v_empty + (self.v_full - self.v_empty) * self.soc


@dataclass
class FakeCycler:
    """A source-measure unit on a FakeCell: current or voltage source with compliance, like a 2450."""

    cell: FakeCell = field(default_factory=FakeCell)
    name: str = "fake-cycler"
    on: bool = False
    mode: str = "current"
    level: float = 0.0
    limit: float = 4.2
    commands: list[str] = field(default_factory=list)
    fail_after: int | None = None  # measurements before the connection is lost
    _t: float | None = None

    async def identify(self) -> str:
        return "FAKE,CYCLER,0,1.0"

    def _advance(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._t is not None and self.on:
            self.cell.soc += self._current() * (now - self._t) / 3600.0 / self.cell.capacity_ah
        self._t = now

    def _current(self) -> float:
        if not self.on:
            return 0.0
        ocv, r = self.cell.ocv(), self.cell.resistance
        if self.mode == "current":
            v = ocv + self.level * r
            if v > self.limit:  # clamped at the voltage limit
                return (self.limit - ocv) / r
            return self.level
        return max(-self.limit, min(self.limit, (self.level - ocv) / r))

    async def source_current(self, amps: float, *, voltage_limit: float) -> None:
        self._advance()
        self.mode, self.level, self.limit = "current", amps, voltage_limit
        self.commands.append(f"I {amps:g} (V<={voltage_limit:g})")

    async def source_voltage(self, volts: float, *, current_limit: float) -> None:
        self._advance()
        self.mode, self.level, self.limit = "voltage", volts, current_limit
        self.commands.append(f"V {volts:g} (|I|<={current_limit:g})")

    async def output(self, on: bool) -> None:
        self._advance()
        self.on = on
        self.commands.append("ON" if on else "OFF")

    async def output_is_on(self) -> bool:
        return self.on

    async def measure(self) -> Reading:
        self._advance()
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise ConnectionLost(self.name, "the fake connection was cut")
            self.fail_after -= 1
        i = self._current()
        return Reading(self.cell.ocv() + i * self.cell.resistance, i)


@dataclass
class FakeChamber:
    name: str = "fake-chamber"
    air_c: float = 25.0
    setpoint_c: float = 25.0

    async def identify(self) -> str:
        return "FAKE CHAMBER"

    async def temperature(self) -> ChamberTemperature:
        return ChamberTemperature(self.air_c, self.setpoint_c, 100.0, -40.0)

    async def set_temperature(self, celsius: float) -> None:
        self.setpoint_c = self.air_c = celsius  # an ideal chamber: there at once

    async def set_mode(self, mode: str) -> None:
        pass

    async def alarms(self) -> list[int]:
        return []


@dataclass
class FakePress:
    name: str = "fake-press"
    pa: float = 5e6
    displacement_um: float = 0.0

    async def identify(self) -> str:
        return "FAKE PRESS"

    async def set_pressure(self, pa: float, *, ramp_pa_per_s: float | None = None) -> None:
        self.pa = pa

    async def snapshot(self) -> PressSnapshot:
        return PressSnapshot(self.pa / 1e7, self.pa, self.displacement_um, 25.0)  # on 1 cm²

    async def status(self) -> PressStatus:
        return PressStatus(True, True, False, False)


@dataclass
class FakePotentiostat:
    """A cell of R0 + R1 || C: its spectrum is known exactly."""

    name: str = "fake-pstat"
    r0: float = 20.0
    r1: float = 50.0
    c1: float = 1e-6

    async def identify(self) -> str:
        return "FAKE PSTAT"

    async def open_circuit_potential(self, *, interval: float, duration: float) -> list[float]:
        return [3.7] * max(1, round(duration / interval))

    async def impedance(self, *, f_start: float, f_end: float, n_points: int, amplitude: float,
                        e_dc: float = 0.0) -> Sequence[ImpedancePoint]:
        import math

        points = []
        for k in range(n_points):
            f = f_start * (f_end / f_start) ** (k / max(n_points - 1, 1))
            z = self.r0 + self.r1 / (1 + 1j * 2 * math.pi * f * self.r1 * self.c1)
            points.append(ImpedancePoint(f, z.real, z.imag))
        return points


def fake_cell_config(cell: FakeCell) -> CellConfig:
    return CellConfig(capacity=f"{cell.capacity_ah} Ah", voltage_min=f"{cell.v_empty} V",
                      voltage_max=f"{cell.v_full} V")


def fake_channel(cycler: FakeCycler | None = None, **roles: object) -> Channel:
    """A channel of fakes: a cycler, and any of chamber=, press=, potentiostat=."""
    cycler = cycler or FakeCycler()
    return Channel("fake", fake_cell_config(cycler.cell), cycler, {"cycler": "FAKE"}, **roles)  # type: ignore[arg-type]
