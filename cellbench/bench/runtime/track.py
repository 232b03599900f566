"""The pressure-temperature track: setpoints, ramps, holds and waits, alongside the electrical steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellbench.bench.runtime.channel import Channel
from cellbench.bench.runtime.clock import Clock
from cellbench.bench.runtime.policy import sensor_of, temperature_of
from cellbench.profiles.conditions import HoldCondition, RampCondition, SetCondition, WaitStableCondition
from cellbench.profiles.units import human_duration
from cellbench.roles import Conditions

RAMP_STEP = 60.0  # s between setpoint updates of a temperature ramp
POLL = 30.0  # s between readings while waiting for stability


class ProfileFailed(Exception):
    """The profile cannot go on as written (conditions that never settle): the run ends in the safe state."""


def out_of_tolerance(
    c: Conditions,
    *,
    temperature: float | None,
    temperature_tol: float | None,
    pressure: float | None,
    pressure_tol: float | None,
    sensor: str | None = None,
) -> list[str]:
    """What is not yet where it should be; the named sensor's temperature (unnamed: the cell's where known, else
    the air's), said with the sensor it was read from. Pressures in Pa, said in MPa."""
    off = []
    measured_t = temperature_of(c, sensor)
    if temperature is not None and temperature_tol is not None and (
        measured_t is None or abs(measured_t - temperature) > temperature_tol
    ):
        shown = "unknown" if measured_t is None else f"{measured_t:.2f} degC"
        off.append(f"{sensor_of(c, sensor)} temperature {shown} not within {temperature_tol:g} degC of "
                   f"{temperature:g} degC")
    if pressure is not None and pressure_tol is not None and (
        c.pressure_pa is None or abs(c.pressure_pa - pressure) > pressure_tol
    ):
        shown = "unknown" if c.pressure_pa is None else f"{c.pressure_pa / 1e6:.3f} MPa"
        off.append(f"pressure {shown} not within {pressure_tol / 1e6:g} MPa of {pressure / 1e6:g} MPa")
    return off


def settled(off: list[str], t: float, *, began: float, since: float | None, duration: float, timeout: float,
            failing: str) -> tuple[bool, float | None]:
    """One judge of stability for wait steps and the track's `wait stable`: whether the conditions have been
    within tolerance (`off` empty) for `duration` by test time t, and since when they have been; past `timeout`
    after `began` with something still off, the profile cannot go on (`failing` opens the message)."""
    if off:
        if t - began >= timeout - 1e-9:
            raise ProfileFailed(f"{failing} {human_duration(timeout)}: " + "; ".join(off))
        return False, None
    since = t if since is None else since
    return t - since >= duration - 1e-9, since


class Track:
    """Runs the conditions in order; remembers the setpoints it has given."""

    def __init__(self, channel: Channel, clock: Clock, event: Callable[[str, str], None]) -> None:
        self.channel = channel
        self.clock = clock
        self.event = event
        self.temperature: float | None = None  # degC
        self.pressure: float | None = None  # Pa

    async def set_temperature(self, celsius: float) -> None:
        assert self.channel.chamber is not None
        await self.channel.chamber.set_temperature(celsius)
        await self.channel.chamber.set_mode("CONSTANT")
        self.temperature = celsius

    async def set_pressure(self, pa: float, rate_pa_s: float | None = None) -> None:
        assert self.channel.press is not None
        await self.channel.press.set_pressure(pa, ramp_pa_per_s=rate_pa_s)
        self.pressure = pa

    async def run(self, conditions: list[Any]) -> None:
        for cond in conditions:
            if isinstance(cond, SetCondition):
                sp = cond.set
                if sp.temperature is not None:
                    await self.set_temperature(sp.temperature)
                if sp.pressure is not None:
                    await self.set_pressure(sp.pressure)
                self.event("conditions", f"set {self.describe()}")
            elif isinstance(cond, HoldCondition):
                await self.clock.sleep(cond.hold)
            elif isinstance(cond, RampCondition):
                await self._ramp(cond)
            elif isinstance(cond, WaitStableCondition):
                await self._wait_stable(cond)

    async def _ramp(self, cond: RampCondition) -> None:
        ramp, rate = cond.ramp, cond.ramp.rate_per_s()
        if ramp.pressure is not None:  # the press ramps its force itself
            await self.set_pressure(ramp.pressure, rate_pa_s=rate)
            self.event("conditions", f"ramp to {ramp.pressure / 1e6:g} MPa at {rate * 60 / 1e6:g} MPa/min")
            return
        assert ramp.temperature is not None
        start = self.temperature
        if start is None:
            assert self.channel.chamber is not None
            start = (await self.channel.chamber.temperature()).measured
        self.event("conditions", f"ramp to {ramp.temperature:g} degC at {rate * 60:g} degC/min")
        value, target = start, ramp.temperature
        while value != target:
            step = rate * RAMP_STEP
            value = min(value + step, target) if target > value else max(value - step, target)
            await self.set_temperature(round(value, 1) if value != target else target)
            if value != target:
                await self.clock.sleep(RAMP_STEP)

    async def _wait_stable(self, cond: WaitStableCondition) -> None:
        spec = cond.wait_stable
        began = self.clock.now()
        stable_since: float | None = None
        while True:
            c = await self.channel.conditions()
            now = self.clock.now()
            off = out_of_tolerance(
                c, temperature=self.temperature, temperature_tol=spec.temperature,
                pressure=self.pressure, pressure_tol=spec.pressure,
                sensor=spec.sensor,
            )
            stable, stable_since = settled(off, now, began=began, since=stable_since, duration=spec.duration,
                                           timeout=spec.timeout, failing="conditions not stable after")
            if stable:
                self.event("conditions", f"stable at {self.describe()} for {human_duration(spec.duration)}")
                return
            await self.clock.sleep(min(POLL, max(spec.timeout - (now - began), 0.0)) or POLL)

    def describe(self) -> str:
        parts = []
        if self.temperature is not None:
            parts.append(f"{self.temperature:g} degC")
        if self.pressure is not None:
            parts.append(f"{self.pressure / 1e6:g} MPa")
        return " and ".join(parts) or "nothing"
