"""A channel binds one cell to the instruments that act on it: its cycler, and maybe a chamber, a press and a
potentiostat, each known only by its role."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cellbench.bench.runtime.cells import CellConfig
from cellbench.roles import Chamber, Conditions, Cycler, Potentiostat, Press


@dataclass
class Channel:
    name: str
    cell: CellConfig
    cycler: Cycler
    identity: dict[str, str] = field(default_factory=dict)  # instrument name -> identification
    chamber: Chamber | None = None
    press: Press | None = None
    potentiostat: Potentiostat | None = None
    reconnect: Callable[[], Awaitable[Cycler]] | None = None  # a new connection to the cycler, if one can be made
    reconnect_grace: float = 0.0  # s a lost cycler is reconnected before the channel is made safe and fails
    blind_off: Callable[[], Awaitable[bool]] | None = None  # the output-off command sent unconfirmed, last resort
    cell_id: str = ""  # the cell's ID as labelled (the bench file's `id`, or the cell's key)
    # the auxiliary instruments this channel may set ("chamber", "press"): its own, or shared ones it owns
    controls: frozenset[str] = frozenset({"chamber", "press"})
    # steps its cycler can run itself (roles.Buffered) are run on it, read in blocks (runtime/blocks.py)
    steps_on_instrument: bool = False

    async def conditions(self) -> Conditions:
        """Read the chamber and the press, if the channel has them."""
        ambient = (await self.chamber.temperature()).measured if self.chamber else None
        if self.press is None:
            return Conditions(ambient)
        snap = await self.press.snapshot()
        return Conditions(ambient, _known(snap.platen_c), snap.pressure_pa, _known(snap.displacement_um))


def _known(value: float) -> float | None:
    """NaN is what an instrument without that reading (a load cell: no platen thermocouple) reports."""
    return None if math.isnan(value) else value
