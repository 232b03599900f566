"""A channel's life on a controller as one state machine: its states, the operators' actions, and a table of
what each action does in each state (a new state) or why it is refused (the words the operator reads). The run
itself moves a channel too: a run that ends leaves it idle, a safety stop on a bench that holds leaves it latched.

The runner's coordinator looks a command up here before it touches a run; the control socket, MQTT and the CLI
all send the same typed `Command`, so a channel answers every client alike. The state names are the ones the
runs registry, MQTT's `status` and `cellbench status` show.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ChannelState(StrEnum):
    IDLE = "idle"  # no run of this controller on it (it may have ended one)
    RUNNING = "running"  # an engine runs its profile
    PAUSED = "paused"  # an operator paused it: output off, state saved, waiting for resume or stop
    LATCHED = "latched"  # a safety stop holds it (on_safety_stop: hold): output off until the latch is cleared


class Action(StrEnum):
    START = "start"  # a new run on an idle channel
    CONTINUE = "continue"  # a run named by its database goes on (`resume RUN`): on an idle channel, or a paused one
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    CLEAR_LATCH = "clear_latch"


@dataclass(frozen=True)
class Refused:
    """Why an action is refused in a state: the words, with {name} (the channel) and {tripped} (what latched it);
    IDLE_SAID: the coordinator says how the channel's last run ended."""

    words: str

    def said(self, name: str, tripped: str = "") -> str:
        return self.words.format(name=name, tripped=tripped)


IDLE_SAID = Refused("")  # the words come from the channel's history, not from the table
BUSY = Refused("channel '{name}' is running a test: stop it first")
NO_LATCH = Refused("channel '{name}' has no safety latch set")
HELD = Refused("channel '{name}' is held by a {tripped}: output off and latched; check the cell, then clear the latch")

S, A = ChannelState, Action
TRANSITIONS: dict[tuple[ChannelState, Action], ChannelState | Refused] = {
    (S.IDLE, A.START): S.RUNNING,
    (S.IDLE, A.CONTINUE): S.RUNNING,
    (S.IDLE, A.PAUSE): IDLE_SAID,
    (S.IDLE, A.RESUME): IDLE_SAID,
    (S.IDLE, A.STOP): IDLE_SAID,
    (S.IDLE, A.CLEAR_LATCH): IDLE_SAID,
    (S.RUNNING, A.START): BUSY,
    (S.RUNNING, A.CONTINUE): BUSY,
    (S.RUNNING, A.PAUSE): S.PAUSED,
    (S.RUNNING, A.RESUME): Refused("channel '{name}' is not paused"),
    (S.RUNNING, A.STOP): S.IDLE,
    (S.RUNNING, A.CLEAR_LATCH): NO_LATCH,
    (S.PAUSED, A.START): BUSY,
    (S.PAUSED, A.CONTINUE): S.RUNNING,
    (S.PAUSED, A.PAUSE): Refused("channel '{name}' is already paused"),
    (S.PAUSED, A.RESUME): S.RUNNING,
    (S.PAUSED, A.STOP): S.IDLE,
    (S.PAUSED, A.CLEAR_LATCH): NO_LATCH,
    (S.LATCHED, A.START): BUSY,
    (S.LATCHED, A.CONTINUE): HELD,
    (S.LATCHED, A.PAUSE): HELD,
    (S.LATCHED, A.RESUME): HELD,
    (S.LATCHED, A.STOP): S.IDLE,  # the run ends in its safety stop; the cell stays latched
    (S.LATCHED, A.CLEAR_LATCH): S.PAUSED,  # once the cell reads safe at open circuit
}
assert len(TRANSITIONS) == len(ChannelState) * len(Action), "every action is answered in every state"


def transition(state: ChannelState, action: Action) -> ChannelState | Refused:
    """The state an action leads to from this one, or why it is refused."""
    return TRANSITIONS[(state, action)]
