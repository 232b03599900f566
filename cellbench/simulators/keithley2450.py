"""Simulated Keithley 2450 SourceMeter (native SCPI) wired to a simulated cell.

The physics advances lazily: before each command the cell is integrated from the last command
to now under the source state of that interval, in sub-steps, with real compliance — a current
source stops at its voltage limit (CC turns into CV), a voltage source at its current limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.parameters import PRESETS
from cellbench.simulators.scpi import Handler, ScpiError, ScpiTree, Setting, format_number, unquote
from cellbench.simulators.server import ServeOptions, serve_lines

IDN = "KEITHLEY INSTRUMENTS,MODEL 2450,SIM0001,1.7.12b"
MAX_CURRENT = 1.05
MAX_VOLTAGE = 210.0
MAX_SUBSTEP = 5.0  # s of cell time per integration step (the RC settles in ms; SOC moves slowly)
OVERFLOW = 9.9e37


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
        self.tree = ScpiTree(self._commands())
        self.surroundings: list[Surroundings] = []  # chamber and press acting on the same cell

    def _commands(self) -> dict[str, Handler | Setting]:
        src, sense = ":SOURce[1]", ":SENSe[1]"
        commands: dict[str, Handler | Setting] = {
            "*IDN?": lambda a: self.idn,
            "*RST": lambda a: self._reset(),
            "*CLS": lambda a: self.tree.errors.clear(),
            "*OPC?": lambda a: "1",
            "*OPC": lambda a: None,
            "*WAI": lambda a: None,
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
    def handle(self, line: str) -> str | None:
        self.advance()
        return self.tree.execute(line)

    def _reset(self) -> None:
        self.tree.reset()
        self.tripped = False

    def _trip(self, function: str) -> str:
        return "1" if self.tripped and self.tree.values["source"] == function else "0"

    # --- physics --------------------------------------------------------------------------
    def advance(self) -> None:
        """Integrate the cell from the last command to now under the present source state."""
        now = self._now()
        while self._t < now:
            dt = min(MAX_SUBSTEP, now - self._t)
            for part in self.surroundings:
                part.advance(self._t)
            self._step(dt)
            self._t += dt

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

    def _reading(self, function: str) -> float:
        """What the meter reads now: the source's present state on the cell, plus noise."""
        current, voltage, _ = self._solve(0.0)
        if function.startswith("VOLT"):
            return voltage + self._rng.gauss(0.0, self.noise_v) if self.noise_v else voltage
        if function.startswith("CURR"):
            return current + self._rng.gauss(0.0, self.noise_i) if self.noise_i else current
        return voltage / current if current else OVERFLOW

    def _measure(self, function: str) -> str:
        self.tree.values["sense"] = function
        return format_number(self._reading(function))

    def _read(self, args: list[str]) -> str:
        """``:READ? ["buffer"[, element, ...]]``: the sense reading and the elements asked for."""
        elements = [a.strip().upper() for a in args[1:]] or ["READ"]
        if args and not (args[0].startswith(("'", '"')) and unquote(args[0])):
            raise ScpiError(-104, "buffer name must be a quoted string")
        sense = self.tree.values["sense"]
        source = "VOLT:DC" if self.tree.values["source"] == "VOLT" else "CURR:DC"
        out = []
        for element in elements:
            if element.startswith("READ"):
                out.append(format_number(self._reading(sense)))
            elif element.startswith("SOUR"):
                out.append(format_number(self._reading(source)))
            elif element.startswith("REL") or element.startswith("SEC"):
                out.append(format_number(self._t - self._t0))
            else:
                raise ScpiError(-224, f"unknown buffer element {element}")
        return ",".join(out)


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated 2450 with a simulated cell, for `cellbench sim serve keithley2450`."""
    cell = SolidStateCell(PRESETS[options.cell], soc=options.soc)
    sim = Keithley2450Sim(cell, asyncio.get_running_loop().time, noise_v=20e-6, seed=options.seed)
    async with serve_lines(sim, options) as resource:
        yield f"a simulated Keithley 2450 ({options.cell} cell) at {resource}"
