"""The one clock of cellbench: real time on a bench, virtual time for simulated runs.

All control timing reads the running event loop's monotonic time. A real clock runs the loop
as asyncio does; a virtual clock runs it under ``looptime``, which jumps the loop's time ahead
whenever every task is waiting on a timer, so a 24-hour profile runs in seconds and gives the
same data for the same seed. Loopback socket I/O between in-process peers takes no virtual time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
# Loop passes with nothing ready before virtual time jumps. Loopback replies between in-process
# peers are readable within a pass or two; a few more leave room without slowing the run.
NOOP_CYCLES = 5
VIRTUAL_RESOLUTION = 1e-6  # s: looptime's tick


class Clock:
    """Monotonic control time plus the Unix time it corresponds to."""

    virtual: bool = False

    def __init__(self, *, unix_start: float | None = None) -> None:
        self._unix_start = unix_start
        self._mono_start: float | None = None

    def now(self) -> float:
        """Monotonic seconds on the running event loop."""
        return asyncio.get_running_loop().time()

    def start(self) -> float:
        """Mark the start of a run; later Unix times are derived from this instant."""
        self._mono_start = self.now()
        if self._unix_start is None:
            self._unix_start = time.time()
        return self._mono_start

    def unix(self, monotonic: float) -> float:
        """The Unix time of a monotonic instant of this clock."""
        if self._mono_start is None or self._unix_start is None:
            raise RuntimeError("clock.start() has not been called")
        return self._unix_start + (monotonic - self._mono_start)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, monotonic: float) -> None:
        await asyncio.sleep(max(0.0, monotonic - self.now()))

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine to completion on a loop that keeps this clock's time."""
        return asyncio.run(main)


class RealClock(Clock):
    """Wall-clock time: what a bench with real instruments runs on."""


class VirtualClock(Clock):
    """Fast-forwarding time for simulated benches; deterministic for a given seed.

    ``unix_start`` fixes the Unix time that test time 0 maps to, so two runs with the same seed
    produce identical files.
    """

    virtual = True

    def __init__(self, *, unix_start: float | None = 1_767_225_600.0) -> None:  # 2026-01-01 UTC
        super().__init__(unix_start=unix_start)

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        import looptime  # (it imports pytest: only simulated runs pay for it)

        loop = looptime.new_event_loop(start=0.0, noop_cycles=NOOP_CYCLES)
        # asyncio takes a timer as due when it falls before now + the clock's resolution (1 ns); past 2^24 s
        # (194 days of test time) a float cannot add 1 ns to now, a timer due exactly now is never run, and the
        # loop spins. Virtual time moves in looptime's 1 us ticks: that is its resolution.
        loop._clock_resolution = max(loop._clock_resolution, VIRTUAL_RESOLUTION)  # type: ignore[attr-defined]
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(main)
        finally:
            _cancel_leftovers(loop)
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
