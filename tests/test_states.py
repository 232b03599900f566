"""A channel's state machine through the runner's coordinator, on fakes: every action in every state does what
the table says (the run told to pause or stop, the held channel released, the latch cleared, a new run started)
or is refused with the table's words, and nothing else is touched."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from cellbench.bench.runner.coordinator import Coordinator
from cellbench.bench.runner.states import IDLE_SAID, TRANSITIONS, Action, ChannelState, Refused
from cellbench.bench.runtime.commands import Command
from cellbench.bench.runtime.engine import Interrupted, Paused
from cellbench.roles import Reading


@dataclass
class FakeEngine:
    name: str
    stopped: list[BaseException] = field(default_factory=list)

    @property
    def channel(self) -> Any:
        return type("Ch", (), {"name": self.name})()

    def stop(self, exc: BaseException) -> None:
        self.stopped.append(exc)


def coordinator_in(state: ChannelState) -> tuple[Coordinator, FakeEngine, list[str], list[Command]]:
    """A coordinator whose channel ch1 is in this state; returns it, ch1's engine, the clears and the starts."""
    c = Coordinator()
    c.channels = ["ch1", "ch2"]
    engine = FakeEngine("ch1")
    cleared: list[str] = []
    started: list[Command] = []
    c.starter = lambda cmd, why: (started.append(cmd) or True, f"started {cmd.channel}")  # type: ignore[func-returns-value]
    if state is ChannelState.RUNNING:
        c.engines.append(engine)  # type: ignore[arg-type]
    if state in (ChannelState.PAUSED, ChannelState.LATCHED):
        c.held["ch1"] = asyncio.get_running_loop().create_future()
    if state is ChannelState.LATCHED:
        c.latched["ch1"] = ("safety stop", cleared.append)
        c.open_circuit["ch1"] = (Reading(3.8, 0.0), None)
    c.engines.append(FakeEngine("ch2"))  # type: ignore[arg-type]  # the other channel, never touched
    return c, engine, cleared, started


def command(action: Action) -> Command:
    if action is Action.CONTINUE:
        return Command(action="resume", channel="ch1", database="/runs/a.sqlite")
    return Command(action=action.value, channel="ch1", profile="/p.yaml" if action is Action.START else None)


@pytest.mark.parametrize(("state", "action"), list(TRANSITIONS))
def test_every_action_in_every_state_does_what_the_table_says(state: ChannelState, action: Action) -> None:
    async def main() -> None:
        c, engine, cleared, started = coordinator_in(state)
        assert c.state_of("ch1") is state
        ok, said = c.command(command(action))
        to = TRANSITIONS[(state, action)]
        other = c.engines[-1]
        assert not other.stopped  # type: ignore[attr-defined]
        if isinstance(to, Refused):
            assert not ok and not engine.stopped and not cleared and not started
            expected = c.idle("ch1") if to is IDLE_SAID else to.said("ch1", "safety stop")
            assert said == expected
            assert c.state_of("ch1") is state
            return
        assert ok, said
        waiting = c.held.get("ch1")
        if state is ChannelState.IDLE:
            assert [cmd.channel for cmd in started] == ["ch1"]
        elif action is Action.PAUSE:
            assert [type(e) for e in engine.stopped] == [Paused]
        elif action in (Action.RESUME, Action.CONTINUE) and state is ChannelState.PAUSED:
            assert waiting is not None and waiting.result()[0] == "resume"
        elif action is Action.STOP and state is ChannelState.RUNNING:
            assert [type(e) for e in engine.stopped] == [Interrupted]
        elif action is Action.STOP:
            assert waiting is not None and waiting.result()[0] == "stop"
        elif action is Action.CLEAR_LATCH:
            assert cleared and c.state_of("ch1") is to is ChannelState.PAUSED

    asyncio.run(main())


def test_a_latch_is_not_cleared_while_the_cell_reads_unsafe_and_the_words_say_why() -> None:
    async def main() -> None:
        c, _, cleared, _ = coordinator_in(ChannelState.LATCHED)
        c.open_circuit["ch1"] = (Reading(0.02, 0.0), "below 2.4 V")
        ok, said = c.command(command(Action.CLEAR_LATCH))
        assert not ok and not cleared and "the cell reads 0.0200 V at open circuit: below 2.4 V" in said
        assert c.state_of("ch1") is ChannelState.LATCHED

    asyncio.run(main())


def test_an_idle_channel_says_how_its_last_run_ended_and_a_stranger_is_named() -> None:
    async def main() -> None:
        c, *_ = coordinator_in(ChannelState.IDLE)
        c.ended["ch1"] = ("20261207T081500Z-P-01", "safety stop: over 4.35 V", 1.8e9)
        ok, said = c.command(command(Action.PAUSE))
        assert not ok and said.startswith("channel 'ch1' is idle: its run 20261207T081500Z-P-01 ended: safety stop")
        ok, said = c.command(Command(action="stop", channel="ch9"))
        assert not ok and said == "this controller has no channel 'ch9' (it has ch1, ch2)"

    asyncio.run(main())
