"""Opening a bench's instruments through the driver registry, each once, shared by the channels naming it."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from cellbench.bench.ops.locks import InstrumentLock
from cellbench.bench.runner.config import BenchConfig, InstrumentConfig
from cellbench.bench.runtime.cells import CellConfig
from cellbench.bench.runtime.channel import Channel
from cellbench.drivers.registry import OpenRequest, driver


class Instruments:
    """Every instrument a bench's channels name, each opened once and shared by its channels."""

    def __init__(self, bench: BenchConfig) -> None:
        self.bench = bench
        self.drivers: dict[str, Any] = {}
        self.identity: dict[str, str] = {}
        self._closers: dict[str, Callable[[], Awaitable[None]]] = {}
        self._locks: list[InstrumentLock] = []
        self.notices: dict[str, list[str]] = {}  # instrument name -> what was found on connecting
        self.requests: dict[str, tuple[str, OpenRequest]] = {}  # instrument name -> (driver, how it was opened)

    async def __aenter__(self) -> Instruments:
        try:
            for ch in self.bench.channels.values():
                cell = self.bench.cells[ch.cell]
                for ref in ch.instruments:
                    if ref not in self.drivers:
                        await self._open(ref, self.bench.instruments[ref], cell)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _open(self, name: str, cfg: InstrumentConfig, cell: CellConfig) -> None:
        lock = InstrumentLock(name, cfg.resource)
        lock.acquire(f"bench '{self.bench.name}'")
        self._locks.append(lock)
        # a press converts force over the area of every cell it holds, side by side under its platen
        area = self.bench.held_area(name) if "press" in cfg.roles else cell.area
        request = cfg.request(name, area)
        opened = await driver(cfg.driver).open(request)
        self.requests[name] = (cfg.driver, request)
        self._closers[name] = opened.close
        self.drivers[name], self.identity[name] = opened.driver, opened.identity
        if "press" in cfg.roles and len(held := self.bench.sharing(name)) > 1:
            self.notices.setdefault(name, []).append(
                f"{name} holds the cells of {', '.join(held)}: force and pressure are converted over {area:g} cm^2")
        if "cycler" in cfg.roles and await opened.driver.output_is_on():
            # left on by a controller that died, or by hand: safe first, then say so
            await opened.driver.output(False)
            self.notices.setdefault(name, []).append(f"{name}'s output was on when connected; it was turned off")

    def notices_for(self, channel: str) -> list[str]:
        ch = self.bench.channels[channel]
        return [notice for r in ch.instruments for notice in self.notices.get(r, [])]

    def cyclers(self) -> list[tuple[str, OpenRequest]]:
        """Every cycler of the bench, once: what a guardian must be able to turn off."""
        names = dict.fromkeys(ch.cycler for ch in self.bench.channels.values())
        return [self.requests[n] for n in names if n in self.requests]

    async def reopen(self, name: str) -> Any:
        """A new connection to an instrument (the old one closed as far as it can be): a new driver for it."""
        with contextlib.suppress(Exception):
            await self._closers.pop(name)()
        driver_name, request = self.requests[name]
        opened = await driver(driver_name).open(request)
        self._closers[name] = opened.close
        self.drivers[name] = opened.driver
        return opened.driver

    async def blind_off(self, name: str) -> bool:
        """The last resort: the cycler's output-off command on a fresh wire, unconfirmed; whether it was sent."""
        driver_name, request = self.requests[name]
        spec = driver(driver_name)
        if spec.blind_off is None:
            return False
        await spec.blind_off(request)
        return True

    def _cycler(self, name: str, found: Any) -> Any:
        """The channel's Cycler: the instrument itself, or its channel on a multi-channel box."""
        number = self.bench.channels[name].cycler_channel
        return found if number is None else found.channel(number)

    async def _recycler(self, name: str) -> Any:
        return self._cycler(name, await self.reopen(self.bench.channels[name].cycler))

    def channel(self, name: str) -> Channel:
        ch = self.bench.channels[name]
        return Channel(
            name, self.bench.cells[ch.cell], self._cycler(name, self.drivers[ch.cycler]),
            {r: self.identity[r] for r in ch.instruments},
            chamber=self.drivers.get(ch.chamber) if ch.chamber else None,
            press=self.drivers.get(ch.press) if ch.press else None,
            potentiostat=self.drivers.get(ch.potentiostat) if ch.potentiostat else None,
            reconnect=lambda: self._recycler(name),
            blind_off=lambda: self.blind_off(ch.cycler),
            reconnect_grace=self.bench.instruments[ch.cycler].reconnect_grace,
            steps_on_instrument=self.bench.instruments[ch.cycler].steps_on_instrument,
            cell_id=self.bench.cell_id(name),
            controls=frozenset(role for role, ref in (("chamber", ch.chamber), ("press", ch.press))
                               if ref is not None and (len(self.bench.sharing(ref)) < 2
                                                       or self.bench.instruments[ref].owner_channel == name)),
        )

    async def __aexit__(self, *exc: object) -> None:
        for close in reversed(list(self._closers.values())):
            with contextlib.suppress(Exception):
                await close()
        self._closers = {}
        for lock in self._locks:
            lock.release()
        self._locks = []
