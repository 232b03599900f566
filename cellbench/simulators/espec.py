"""Simulated ESPEC environmental chamber: its text protocol, and air that follows the setpoint.

Commands and replies end in CR LF. The air follows the setpoint with a first-order lag, never
faster than the chamber's ramp limit; with control off it drifts back to the room. Each cell in
the chamber is told the air temperature, and follows it with its own thermal lag (simulators.cell).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

from cellbench.simulators.cell import TIME_EPS, SolidStateCell
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.server import ServeOptions, SimServer, cell_of, serve_lines

MODES = ("OFF", "STANDBY", "CONSTANT")
TEMP_RANGE = (-70.0, 160.0)  # what TYPE? reports (T,S2,160.0): beyond it the chamber says NA:DATA OUT OF RANGE
MAX_SUBSTEP = 10.0


class EspecChamberSim:
    """The chamber as its protocol describes it, and the air inside."""

    name = "espec"

    def __init__(
        self,
        now: Callable[[], float],
        cells: list[SolidStateCell] | None = None,
        *,
        room_c: float = 25.0,
        time_constant_s: float = 300.0,
        max_ramp_c_per_min: float = 3.0,
        address: int | None = None,
    ) -> None:
        self._now = now
        self._t = now()
        self.cells = list(cells or [])
        self.room_c = room_c
        self.air_c = room_c
        self.setpoint_c = room_c
        self.upper_alarm_c, self.lower_alarm_c = 140.0, -50.0
        self.mode = "STANDBY"
        self.powered = True
        self.tau = time_constant_s
        self.max_rate = max_ramp_c_per_min / 60.0
        self.address = address
        self.alarms: list[int] = []
        self._said = ""

    # --- physics --------------------------------------------------------------------------
    def advance(self, t: float | None = None) -> None:
        """Integrate the air up to t (default: now) and tell the cells inside."""
        t = self._now() if t is None else t
        while t - self._t > TIME_EPS:  # a remainder below it cannot be added to a large time
            dt = min(MAX_SUBSTEP, t - self._t)
            target = self.setpoint_c if self.powered and self.mode == "CONSTANT" else self.room_c
            if abs(target - self.air_c) < 1e-6:
                self.air_c, self._t = target, t  # settled
                break
            tau = self.tau if self.mode == "CONSTANT" else 4 * self.tau  # no active control: slower
            rate = max(-self.max_rate, min(self.max_rate, (target - self.air_c) / tau))
            self.air_c += rate * dt
            self._t += dt
        for cell in self.cells:
            cell.ambient_c = self.air_c
        self._check_alarms()

    def _check_alarms(self) -> None:
        if self.air_c > self.upper_alarm_c and 1 not in self.alarms:
            self.alarms.append(1)  # upper temperature alarm
        if self.air_c < self.lower_alarm_c and 2 not in self.alarms:
            self.alarms.append(2)

    # --- the wire -------------------------------------------------------------------------
    def handle(self, line: str) -> str | None:
        self.advance()
        text = line.strip()
        if self.address is not None:
            m = re.match(r"^(\d+),(.*)$", text)
            if not m or int(m.group(1)) != self.address:
                return "NA:ADDR ERR"
            text = m.group(2)
        head, _, args = text.partition(",")
        head, args = head.strip().upper(), args.strip()
        self._said = text  # a setting is echoed as it was sent: OK:TEMP,S35.0 or OK:TEMP, S35.0
        if not self.powered and not head.endswith("?") and head != "POWER":
            return "NA:CONT NOT READY-1"  # switched off: it answers queries, it takes no setting
        if head in ("HUMI?", "HUMI"):
            return "NA:CONT NOT READY-1"  # a temperature-only chamber has no humidity control
        handler: Callable[[], str] | None = {
            "TYPE?": lambda: f"T,S2,{TEMP_RANGE[1]:.1f}",
            "TEMP?": lambda: ",".join(
                f"{v:.1f}" for v in (self.air_c, self.setpoint_c, self.upper_alarm_c, self.lower_alarm_c)
            ),
            "TEMP": lambda: self._set_temp(args),
            "MODE?": lambda: self.mode,
            "MODE": lambda: self._set_mode(args),
            "MON?": lambda: f"{self.air_c:.1f},,{self.mode},{len(self.alarms)}",
            "POWER?": lambda: "ON" if self.powered else "OFF",
            "POWER": lambda: self._power(args),
            "ALARM?": lambda: ",".join(str(x) for x in [len(self.alarms), *self.alarms]),
        }.get(head)
        return handler() if handler else "NA:CMD ERR"

    def _set_temp(self, args: str) -> str:
        parts = re.findall(r"([SHL])\s*([-+]?\d+(?:\.\d*)?)", args.upper())
        if not parts or "".join(k + v for k, v in parts) != re.sub(r"[\s,]", "", args.upper()):
            return "NA:PARA ERR"
        values = {k: float(v) for k, v in parts}
        if any(not TEMP_RANGE[0] <= v <= TEMP_RANGE[1] for v in values.values()):
            return "NA:DATA OUT OF RANGE"
        setpoint = values.get("S", self.setpoint_c)
        upper, lower = values.get("H", self.upper_alarm_c), values.get("L", self.lower_alarm_c)
        if not lower < upper or not lower <= setpoint <= upper:
            return "NA:DATA OUT OF RANGE"  # a setpoint beyond the alarm limits (or limits crossed)
        self.setpoint_c, self.upper_alarm_c, self.lower_alarm_c = setpoint, upper, lower
        return f"OK:{self._said}"

    def _set_mode(self, args: str) -> str:
        mode = args.upper()
        if mode not in MODES:
            return "NA:PARA ERR"
        self.mode = mode
        return f"OK:{self._said}"

    def _power(self, args: str) -> str:
        if args.upper() not in ("ON", "OFF"):
            return "NA:PARA ERR"
        on = args.upper() == "ON"
        if on and not self.powered:
            self.mode = "STANDBY"  # powered up: ready, not controlling
        self.powered = on
        if not on:
            self.mode = "OFF"
        return f"OK:{self._said}"


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated ESPEC chamber with a cell inside, for `cellbench sim serve espec`."""
    cell = cell_of(options)
    async with serve_lines(EspecChamberSim(asyncio.get_running_loop().time, [cell]), options, crlf=True) as resource:
        yield f"a simulated ESPEC chamber at {resource}"


async def rehearse(r: Rehearsal) -> Rehearsed:
    """A chamber holding every cell it is given, at the room's temperature and holding it."""
    chamber = EspecChamberSim(r.time, r.cells, room_c=r.temperature_c)
    chamber.mode, chamber.setpoint_c = "CONSTANT", r.temperature_c
    server = await SimServer(chamber, read_termination=b"\r\n", write_termination=b"\r\n").start()
    r.stack.push_async_callback(server.close)
    return Rehearsed(server.resource, part=chamber)
