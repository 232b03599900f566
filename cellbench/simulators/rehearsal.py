"""What a simulated bench (a dry run of a bench file) asks of one instrument's simulator, and what it gets back.

Each simulator module that stands in for a driver has a `rehearse` function (named in the driver's registry entry,
as its `sim serve` function is) that serves the instrument in process over a real loopback transport for the
cells it acts on. The simulated bench knows no instrument by name: it asks the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cellbench.simulators.cell import SolidStateCell


@dataclass
class Rehearsal:
    """One instrument of a bench to stand in for."""

    cells: list[SolidStateCell]  # the cells it acts on: one per channel naming it (a box: one per box channel)
    time: Callable[[], float]  # the loop's clock
    stack: contextlib.AsyncExitStack  # where its servers' closing goes
    seed: int = 0
    temperature_c: float = 25.0  # the room's
    area_cm2: float = 1.0  # the area it presses (a press over several pellets: their sum)


@dataclass
class Rehearsed:
    """A simulator serving: where to reach it, and how it joins the bench's physics."""

    resource: str
    host: Any | None = None  # a cycler's simulator, whose `surroundings` chambers and presses join
    part: Any | None = None  # a chamber or a press, joining the cyclers of the channels it acts on
    # bench-file keys of the driver's own that reach this stand-in (a second port, the rehearsal's login file)
    settings: dict[str, Any] = field(default_factory=dict)
