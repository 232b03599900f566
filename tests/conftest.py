"""Shared fixtures: a scripted transport for exact wire traffic, and simulators on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from simulators.cell import SolidStateCell
from simulators.keithley2450 import Keithley2450Sim
from simulators.server import SimServer


class ScriptedTransport:
    """Plays the instrument side of an exact conversation; any unexpected line fails the test."""

    name = "scripted"
    resource = "SCRIPT::0"

    def __init__(self, pairs: list[tuple[str, str | None]]) -> None:
        self.pairs = list(pairs)

    def _expect(self, command: str) -> str | None:
        assert self.pairs, f"unexpected command {command!r}: the script has ended"
        expected, reply = self.pairs.pop(0)
        assert command == expected, f"sent {command!r}, the script expected {expected!r}"
        return reply

    async def write(self, command: str) -> None:
        reply = self._expect(command)
        assert reply is None, f"{command!r} was written, but the script has a reply for it"

    async def query(self, command: str) -> str:
        reply = self._expect(command)
        assert reply is not None, f"{command!r} was queried, but the script has no reply for it"
        return reply

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def scripted(*pairs: tuple[str, str | None]) -> AsyncIterator[ScriptedTransport]:
    io = ScriptedTransport(list(pairs))
    yield io
    assert not io.pairs, f"the script was not used up: {io.pairs}"


@pytest.fixture
async def smu_sim() -> AsyncIterator[SimServer]:
    """A simulated 2450 with a half-charged pellet cell, on a real loopback TCP port, in real time."""
    loop = asyncio.get_running_loop()
    sim = Keithley2450Sim(SolidStateCell(soc=0.5), loop.time)
    async with SimServer(sim) as server:
        yield server
