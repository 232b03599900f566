"""The safety supervisor: an independent task beside each channel's engine, on its own cadence.

At least once a `period` (1 s) whatever the profile's sample period, and one period after the newest reading of
the cell, it takes the latest values the engine measured, or, when those are a period old, reads the cycler (and
the chamber and the press) itself, and checks them against the channel's hard limits: the cell's voltage window
with its margins, the profile's safety ranges, overflow readings, a current that charges the cell during a
discharge (a short pulling it below a voltage the instrument holds); and the bench's interlocks: a chamber in
alarm, a press that tripped on over-force or reports a fault. A breach turns the output off at once, then stops
the engine with the reason and the reading that tripped it (the run ends `safety stop`, latched: `cellbench
resume` refuses it until an operator clears it). It keeps watch during set and wait steps and while the
conditions track waits; during an EIS step the potentiostat holds the cell and the cycler is not read.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

from cellbench.bench.runtime import policy
from cellbench.bench.runtime.channel import Channel
from cellbench.bench.runtime.clock import Clock
from cellbench.bench.runtime.engine import Engine, SafetyStop
from cellbench.profiles.controls import StepType
from cellbench.profiles.schema import Profile
from cellbench.roles import Conditions, InstrumentFault, Reading

log = logging.getLogger(__name__)

PERIOD = 1.0  # s
# s between open-circuit reads of a held (paused, latched) cell: a 2450 reads one by turning its output on as a 0 A
# source for a moment, a relay cycle each time; once a second would be 3,600 an hour through a long pause
HELD_PERIOD = 5.0


class Supervisor:
    def __init__(self, engine: Engine, channel: Channel, profile: Profile, clock: Clock, *,
                 period: float = PERIOD) -> None:
        self.engine, self.channel, self.profile, self.clock = engine, channel, profile, clock
        self.latest = engine.latest  # the channel as it stands, shared with the engine
        self.period = period
        self.checks = 0  # how many times it looked
        self.reads = 0  # how many of those it read the instruments itself

    async def run(self) -> None:
        """Watch until cancelled (when the engine's run ends), or until it trips.

        A reading of the cell is due one period after the newest one, the engine's or its own: whenever a limit
        is crossed, a reading comes within a period after it (the engine judges its own readings at once). Waking
        at a fixed cadence instead, it once took a reading the engine made just before the crossing for a fresh
        one, and acted a period late (1.99 s at a 1 s period)."""
        checked = self.engine.test_time
        while True:
            latest = self.latest.reading
            newest = latest[0] if latest is not None else -math.inf
            due = newest + self.period  # (not yet due at the last look: a reading came since; past due: none could)
            wake = due if checked < due < checked + self.period else checked + self.period
            now = self.engine.test_time
            if wake > now:
                await self.clock.sleep(wake - now)
            checked = self.engine.test_time
            discharging = self.latest.discharging  # as it stood before the reading: a step may begin during it
            seen = await self._latest()
            if seen is None:
                continue
            reading, conditions, own = seen
            self.checks += 1
            why = (policy.unsafe(reading, self.channel.cell, self.profile.safety, conditions)
                   or policy.wrong_sign(reading, discharging if discharging == self.latest.discharging else None)
                   or await self._interlocks())
            if not why and own and (short := self.engine.watch_short(self.engine.test_time, reading)):
                if self.profile.short_detection.action != "stop":
                    self.engine.short_seen(short)  # flagged, or a spectrum first: the engine's to do
                    continue
                why = short
            if why:
                await self._trip(why, reading)
                return

    async def _interlocks(self) -> str | None:
        """The bench's interlocks: a chamber in alarm, a press that tripped on over-force or reports a fault."""
        try:
            if self.channel.chamber is not None and (codes := await self.channel.chamber.alarms()):
                return f"interlock: chamber {self.channel.chamber.name} in alarm {', '.join(map(str, codes))}"
            if self.channel.press is not None:
                status = await self.channel.press.status()
                if status.over_force or status.fault:
                    what = "over-force" if status.over_force else "a fault"
                    return f"interlock: press {self.channel.press.name} reports {what}"
        except InstrumentFault as exc:  # an unreadable interlock is not a tripped one; the engine sees the fault
            log.debug("%s: interlock read failed: %s", self.channel.name, exc)
        return None

    async def _latest(self) -> tuple[Reading, Conditions, bool] | None:
        """The channel's newest reading and conditions, and whether the supervisor read them itself."""
        latest = self.latest.reading
        now = self.engine.test_time
        if latest is not None and now - latest[0] < self.period - 1e-6:
            return latest[1], latest[2], False
        if self.latest.step_type in (None, StepType.EIS):  # between steps, or the potentiostat has the cell
            return (latest[1], latest[2], False) if latest is not None else None
        try:
            reading = await self.channel.cycler.measure()
            conditions = await self.channel.conditions() if self.channel.chamber or self.channel.press else (
                latest[2] if latest is not None else Conditions())
        except InstrumentFault as exc:  # the engine meets the same fault and deals with it
            log.debug("%s: supervisor read failed: %s", self.channel.name, exc)
            return None
        self.reads += 1
        self.latest.reading = (now, reading, conditions)  # the newest reading of the channel, for telemetry too
        return reading, conditions, True

    async def _trip(self, why: str, reading: Reading) -> None:
        """Output off first, then the engine stopped with the reason and the reading."""
        with contextlib.suppress(Exception):  # the engine's own safe-state path retries and reports
            await self.channel.cycler.output(False)
        said = (f"{why} (supervisor, reading {reading.voltage:.4f} V, {reading.current * 1e3:+.4f} mA "
                f"at test time {self.engine.test_time:.1f} s)")
        log.error("%s: %s", self.channel.name, said)
        self.engine.stop(SafetyStop(said))



async def watch_held(channel: Channel, profile: Profile, clock: Clock, *, found: Callable[[str, Reading], None],
                     seen: Callable[[Reading, str | None], None], period: float = HELD_PERIOD) -> None:
    """A paused or latched channel still holds a cell: read it at open circuit every HELD_PERIOD, until cancelled (the
    cycler's driver reads with its output off the way its manual allows), against the safe window and for a
    collapse (the profile's hard-short `collapse` between two readings). `seen` is told every reading and what is
    wrong with it now; `found` the first thing found wrong (the channel is then latched by the caller)."""
    rule = profile.short_detection
    previous: Reading | None = None
    told = False
    while True:
        await clock.sleep(period)
        try:
            reading = await channel.cycler.measure()
        except InstrumentFault as exc:  # nothing flows: an unreadable cell is looked at again next period
            log.debug("%s: open-circuit read failed: %s", channel.name, exc)
            continue
        why = policy.unsafe(reading, channel.cell, profile.safety, Conditions())
        if why is None and previous is not None and rule.action != "off" and (
                fell := previous.voltage - reading.voltage) >= rule.collapse:
            why = f"hard short at open circuit: the voltage fell {fell * 1e3:.0f} mV in {period:g} s"
        previous = reading
        seen(reading, why)
        if why and not told:
            told = True
            found(why, reading)
