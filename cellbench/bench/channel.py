"""A channel binds one cell to the instruments that act on it: its cycler, and maybe a chamber, a press and a
potentiostat, each known only by its role."""

from __future__ import annotations

from dataclasses import dataclass, field

from cellbench.bench.cells import CellConfig
from cellbench.bench.roles import Chamber, Conditions, Cycler, Potentiostat, Press


@dataclass
class Channel:
    name: str
    cell: CellConfig
    cycler: Cycler
    identity: dict[str, str] = field(default_factory=dict)  # instrument name -> identification
    chamber: Chamber | None = None
    press: Press | None = None
    potentiostat: Potentiostat | None = None

    async def conditions(self) -> Conditions:
        """Read the chamber and the press, if the channel has them."""
        ambient = (await self.chamber.temperature()).measured if self.chamber else None
        if self.press is None:
            return Conditions(ambient)
        snap = await self.press.snapshot()
        return Conditions(ambient, snap.platen_c, snap.pressure_mpa, snap.displacement_um)
