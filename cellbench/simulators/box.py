"""What every simulated multi-channel cycler box shares: its channels' cells stepped together through time,
with the chambers and presses around them, in steps of at most MAX_SUBSTEP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from cellbench.simulators.cell import TIME_EPS

MAX_SUBSTEP = 5.0  # s of cell time per integration step
C = TypeVar("C")


class Box(Generic[C]):
    """A box of channels (each with its cell); a subclass says how one channel moves over dt (`_step`)."""

    def __init__(self, channels: list[C], now: Callable[[], float]) -> None:
        self.channels = channels
        self._now = now
        self._t = now()
        self.surroundings: list[Any] = []  # chambers and presses around its cells, advanced with them

    def advance(self) -> None:
        """Integrate every channel up to now (a remainder below TIME_EPS cannot be added to a large time)."""
        now = self._now()
        while now - self._t > TIME_EPS:
            dt = min(MAX_SUBSTEP, now - self._t)
            for part in self.surroundings:
                part.advance(self._t)
            for ch in self.channels:
                self._step(ch, dt)
            self._t += dt

    def _step(self, ch: C, dt: float) -> None:
        raise NotImplementedError
