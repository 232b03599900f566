"""The one clock of cellbench: real time on a bench, virtual time for simulated runs.

All control timing reads the running event loop's monotonic time. A real clock runs the loop
as asyncio does; a virtual clock runs it on `VirtualLoop`, whose time stands still while anything
can run and jumps ahead to the next timer when nothing can, so a 24-hour profile runs in seconds and
gives the same data for the same seed. Loopback socket I/O between in-process peers takes no virtual time.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
# Loop passes with nothing ready before virtual time jumps. Loopback replies between in-process
# peers are readable at once (the kernel hands the bytes over in the sending call); one spare pass
# leaves room for a reply that needs a second read.
NOOP_CYCLES = 2
VIRTUAL_RESOLUTION = 1e-6  # s: a timer this close to now is due


def utc(unix: float) -> str:
    """A Unix time as a person reads it: ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


class Clock:
    """Monotonic control time plus the Unix time it corresponds to."""

    virtual: bool = False

    def __init__(self, *, unix_start: float | None = None) -> None:
        self._fixed_unix = unix_start
        self._unix_start: float | None = None
        self._mono_start: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def now(self) -> float:
        """Monotonic seconds on the running event loop."""
        return asyncio.get_running_loop().time()

    def start(self) -> float:
        """The monotonic now of a run's start (or resume); Unix times are derived from one origin pair.

        The pair (monotonic, Unix) is taken once per clock and loop, at the first start: a pause, a resume or
        another channel's start on the same controller never moves it, so every channel's Unix time stays
        the wall clock's. A new loop (a virtual clock run again) takes a new pair.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._mono_start is None or self._loop is not loop:
            self._loop = loop
            self._mono_start = now
            self._unix_start = time.time() if self._fixed_unix is None else self._fixed_unix
        return now

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
        loop = VirtualLoop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(main)
        finally:
            _cancel_leftovers(loop)
            asyncio.set_event_loop(None)
            loop.close()


class _Selector(selectors.DefaultSelector):
    """The loop's selector: polls, and where the loop would sleep until its next timer, moves its time there."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)  # I/O first: while anything is readable or writable, time stands still
        loop = self.loop
        assert loop is not None
        if ready or timeout == 0:  # (0: callbacks are ready to run)
            loop.idle = 0
            return ready
        if timeout is None:  # no timer at all: only I/O from outside or another thread can wake the loop
            return super().select(None)
        if loop.idle < NOOP_CYCLES:  # a pass or two with nothing ready before time moves
            loop.idle += 1
            return ready
        loop.idle = 0
        loop.advance(timeout)  # nothing can happen before the next timer: it is due now
        return ready


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time: it starts at 0 and moves only when every task waits on a timer (and no
    I/O is ready), straight to the next one. Same sockets, same callbacks as a real loop; only `time()` and the
    waiting differ. Work handed to threads takes no virtual time: simulated runs keep to the loop."""

    def __init__(self) -> None:
        selector = _Selector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0
        self.idle = 0  # passes with nothing ready since the last one that had something
        # asyncio takes a timer as due when it falls before now + the clock's resolution (1 ns); past 2^24 s
        # (194 days of test time) a float cannot add 1 ns to now, a timer due exactly now would never run, and
        # the loop would spin
        self._clock_resolution = VIRTUAL_RESOLUTION

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
