"""The cycler link: the run's hold on its channel's cycler. It applies setpoints and remembers them, recovers a
lost connection within the channel's grace time (reconnect, re-read the output, re-apply), and turns the output
off whatever happens, on a new connection if it must."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from cellbench.bench.runtime.channel import Channel
from cellbench.bench.runtime.events import NoteKind
from cellbench.bench.runtime.runstate import RunState, Setpoint
from cellbench.profiles.controls import Control, SourceMode
from cellbench.profiles.units import human_duration
from cellbench.roles import ConnectionLost, InstrumentFault, InstrumentTimeout, ProtocolError, Reading

log = logging.getLogger(__name__)

RECOVERABLE = (ConnectionLost, InstrumentTimeout, ProtocolError)  # what a new connection may cure


class CyclerLink:
    """Setpoints, recovery and output-off for one channel's cycler, on one run state."""

    def __init__(
        self,
        channel: Channel,
        state: RunState,
        *,
        now: Callable[[], float],
        sleep_until: Callable[[float], Awaitable[None]],
        note: Callable[[NoteKind, str], None],
        look_before_on: Callable[[Reading, str], None],
    ) -> None:
        self.channel = channel
        self.state = state
        self._now = now
        self._sleep_until = sleep_until
        self._note = note
        self._look_before_on = look_before_on

    async def apply(self, ctl: Control, t_step: float, voltage: float) -> None:
        """The control's setpoint at this time into the step (and this voltage), remembered in the run state."""
        value = ctl.setpoint(t_step, voltage)
        if ctl.mode is SourceMode.CURRENT:
            await self.channel.cycler.source_current(value, voltage_limit=ctl.compliance)
        else:
            await self.channel.cycler.source_voltage(value, current_limit=ctl.compliance)
        self.state.setpoint = Setpoint(mode=ctl.mode, value=value, compliance=ctl.compliance)

    async def apply_surely(self, ctl: Control, t_step: float, voltage: float) -> None:
        """A new setpoint; a lost connection is recovered first (within the grace time)."""
        try:
            await self.apply(ctl, t_step, voltage)
        except RECOVERABLE as exc:
            await self.recover(exc)
            await self.apply(ctl, t_step, voltage)

    async def recover(self, exc: InstrumentFault) -> bool:
        """Reconnect to the cycler with backoff within the grace time, re-read its output, re-apply the setpoint.

        Returns whether the output was still on (the current kept flowing across the gap). Past the grace
        time raises InstrumentFault: the channel is made safe and fails; other channels go on.
        """
        ch = self.channel
        grace = ch.reconnect_grace
        if ch.reconnect is None or grace <= 0:
            raise exc
        name, began, delay, last = ch.cycler.name, self._now(), 0.25, exc
        self._note(NoteKind.FAULT, f"{exc}; reconnecting for up to {human_duration(grace)}")
        while True:
            # the last try comes at the grace's end, not a backoff before it
            await self._sleep_until(self._now() + min(delay, max(grace - (self._now() - began), 0.0)))
            try:
                ch.cycler = await ch.reconnect()
                was_on = await ch.cycler.output_is_on()
                if not was_on:  # the output goes on again only into a cell that reads safe at open circuit
                    self._look_before_on(await ch.cycler.measure(), "turned on again after reconnecting")
                sp = self.state.setpoint
                if sp is not None and sp.mode is SourceMode.CURRENT:
                    await ch.cycler.source_current(sp.value, voltage_limit=sp.compliance)
                elif sp is not None:
                    await ch.cycler.source_voltage(sp.value, current_limit=sp.compliance)
                if not was_on:
                    await ch.cycler.output(True)
            except RECOVERABLE as again:
                last = again
                if self._now() - began >= grace:
                    raise InstrumentFault(name, f"not recovered within {human_duration(grace)}: {last}") from last
                delay = min(delay * 2, 10.0)
                continue
            self._note(NoteKind.RECOVERED, f"{name} reconnected after {human_duration(self._now() - began)}: its "
                       f"output was {'still on' if was_on else 'off, and was turned on again'}; setpoint applied again")
            return was_on

    async def output_off(self) -> None:
        """The output off; failing that, on a new connection, then by the channel's blind off; said loudly."""
        try:
            await self.channel.cycler.output(False)
            return
        except Exception as exc:  # the run is ending anyway: try a new connection, and say so loudly
            failed: Exception = exc
        if self.channel.reconnect is not None:
            try:
                self.channel.cycler = await self.channel.reconnect()
                await self.channel.cycler.output(False)
                self._note(NoteKind.FAULT, f"the output was turned off on a new connection ({failed})")
                return
            except Exception as exc:
                log.error("%s: reconnecting to turn the output off failed too: %s", self.channel.name, exc)
        if self.channel.blind_off is not None:
            try:
                if await self.channel.blind_off():
                    self._note(NoteKind.FAULT, f"the output-off command was sent on a new connection but the "
                                               f"instrument did not confirm it ({failed})")
                    return
            except Exception as exc:
                log.error("%s: the blind output-off failed too: %s", self.channel.name, exc)
        log.error("%s: could not turn the output off: %s", self.channel.name, failed)
        self._note(NoteKind.FAULT, f"could not turn the output off: {failed}")
