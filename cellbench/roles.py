"""What the run-time needs of each instrument role, the readings they return, and how they fail.

The engine, the conditions track and the safety checks know instruments only through these
small interfaces; drivers implement them (structurally: no base class to inherit), and tests
fill them with in-process fakes. Nothing here imports a driver, a simulator or the run-time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

# --- how instruments fail ------------------------------------------------------------------


class InstrumentFault(Exception):
    """Anything that went wrong talking to one instrument."""

    def __init__(self, instrument: str, message: str) -> None:
        self.instrument = instrument
        super().__init__(f"{instrument}: {message}")


class InstrumentError(InstrumentFault):
    """The instrument reported errors in its own words (its SYST:ERR? queue)."""

    def __init__(self, instrument: str, errors: list[str], command: str = "") -> None:
        self.errors = errors
        self.command = command
        after = f" after {command!r}" if command else ""
        super().__init__(instrument, f"instrument error{after}: {'; '.join(errors)}")


class InstrumentTimeout(InstrumentFault, TimeoutError):
    """No complete reply in time."""

    def __init__(self, instrument: str, command: str, timeout: float, received: bytes) -> None:
        self.command = command
        self.timeout = timeout
        self.received = received
        got = f"got {received!r} without a terminator" if received else "got nothing"
        super().__init__(instrument, f"no reply to {command!r} within {timeout:g} s ({got})")


class ProtocolError(InstrumentFault):
    """A reply that does not parse as the protocol says it must."""

    def __init__(self, instrument: str, command: str, line: str, expected: str) -> None:
        self.command = command
        self.line = line
        said = f"reply {line!r} to {command!r} is not {expected}"
        if (other := _not_an_instrument(line)) is not None:
            said += f": {other} answers at that address, not an instrument"
        super().__init__(instrument, said)


# the first line a server that is not an instrument sends back to a command it does not understand
_SERVERS = (("HTTP/", "a web server"), ("<!DOCTYPE", "a web server"), ("<html", "a web server"),
            ("SSH-", "an SSH server"), ("220 ", "an FTP or mail server"), ("RFB ", "a VNC server"))


def _not_an_instrument(line: str) -> str | None:
    head = line.lstrip()
    return next((what for prefix, what in _SERVERS if head[: len(prefix)].upper() == prefix.upper()), None)


class ConnectionLost(InstrumentFault):
    """The transport closed or could not be opened."""


# --- readings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One simultaneous reading: terminal voltage and current (positive = into the cell)."""

    voltage: float
    current: float


@dataclass(frozen=True)
class ChamberTemperature:
    measured: float
    setpoint: float
    upper_alarm: float
    lower_alarm: float


@dataclass(frozen=True)
class PressSnapshot:
    force_kn: float
    pressure_pa: float
    displacement_um: float
    platen_c: float


@dataclass(frozen=True)
class PressStatus:
    enabled: bool
    at_setpoint: bool
    over_force: bool
    fault: bool


@dataclass(frozen=True)
class ImpedancePoint:
    frequency: float
    z_real: float
    z_imag: float


@dataclass(frozen=True)
class Conditions:
    """What the auxiliary instruments read at one sample (None where the channel has no such instrument)."""

    ambient_c: float | None = None
    cell_c: float | None = None
    pressure_pa: float | None = None
    displacement_um: float | None = None


# --- roles ---------------------------------------------------------------------------------


@runtime_checkable
class Instrument(Protocol):
    """Every instrument has a name (for messages) and identifies itself."""

    @property
    def name(self) -> str: ...

    async def identify(self) -> str: ...


@runtime_checkable
class Cycler(Instrument, Protocol):
    """Sources and sinks the cell's current: a source-measure unit or a cycler's channel."""

    async def source_current(self, amps: float, *, voltage_limit: float) -> None: ...

    async def source_voltage(self, volts: float, *, current_limit: float) -> None: ...

    async def output(self, on: bool) -> None: ...

    async def output_is_on(self) -> bool: ...

    async def measure(self) -> Reading: ...


@runtime_checkable
class OnBoard(Protocol):
    """A cycler channel that runs schedules stored on the cycler (a profile's `schedule` step). Its `output(False)`
    stops the schedule, as with every cycler."""

    async def start_schedule(self, name: str, *, test_name: str, variables: dict[int, float]) -> None: ...

    async def set_variable(self, number: int, value: float) -> None:
        """Change one of the running schedule's variables (1 to 16); what it steers is the schedule's."""
        ...

    async def schedule_running(self) -> bool:
        """Whether the schedule still runs; raises InstrumentFault when the cycler stopped it on a fault of its
        own (unsafe, error)."""
        ...


LimitType = Literal["above", "below", "inside", "outside"]


@dataclass(frozen=True)
class BlockLimit:
    """A limit the instrument judges on each of its readings of the measured quantity (a current source measures
    voltage, a voltage source current): above `high`, below `low`, inside or outside [low, high]."""

    kind: LimitType
    low: float = 0.0
    high: float = 0.0

    def met(self, value: float) -> bool:
        return {"above": value > self.high, "below": value < self.low, "inside": self.low <= value <= self.high,
                "outside": value < self.low or value > self.high}[self.kind]


@dataclass(frozen=True)
class BlockPlan:
    """A step the instrument runs itself: a constant current (A; positive into the cell) under a voltage limit,
    or a constant voltage (V) under a current limit; a reading every `period` s, at most `count` of them; the
    step's own end (`stop`) and the safety window (`window`, the readings allowed) judged by the instrument at
    each reading, either of which turns its output off there."""

    source: Literal["current", "voltage"]
    level: float
    limit: float  # the compliance: V of a current source, A of a voltage source
    period: float
    count: int
    stop: BlockLimit | None = None
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class BlockReading:
    """One reading the instrument took in a block: its own time (s since the block started), V and A."""

    t: float
    voltage: float
    current: float


@runtime_checkable
class Buffered(Protocol):
    """A cycler channel that runs a step on the instrument (its trigger model) and is read in blocks. While a
    block runs nothing else is asked of it but `block_readings` and `end_block`."""

    async def start_block(self, plan: BlockPlan) -> None: ...

    async def block_readings(self) -> tuple[list[BlockReading], bool]:
        """The readings taken since the last call, in order, and whether the block has ended (its count done, or
        a limit met: then the output is off)."""
        ...

    async def resume_block(self, plan: BlockPlan, read: int) -> None:
        """Take up a block started on an earlier connection (its model may still run or have ended), `read` of
        its readings already read: `block_readings` then returns the rest."""
        ...

    async def end_block(self) -> list[BlockReading]:
        """Stop a running block (the output as it stands) and return the readings it took since the last read;
        nothing if none runs."""
        ...


@runtime_checkable
class Chamber(Instrument, Protocol):
    """Holds the air around the cells at a temperature."""

    async def temperature(self) -> ChamberTemperature: ...

    async def set_temperature(self, celsius: float) -> None: ...

    async def set_mode(self, mode: str) -> None: ...

    async def alarms(self) -> list[int]: ...


@runtime_checkable
class Press(Instrument, Protocol):
    """Holds the cell stack at a pressure, over the cell's active area."""

    async def set_pressure(self, pa: float, *, ramp_pa_per_s: float | None = None) -> None: ...  # Pa, Pa/s

    async def snapshot(self) -> PressSnapshot: ...

    async def status(self) -> PressStatus: ...


@runtime_checkable
class Potentiostat(Instrument, Protocol):
    """Measures the cell's open-circuit potential and impedance, and lets go of it afterwards."""

    async def open_circuit_potential(self, *, interval: float, duration: float) -> list[float]: ...

    async def impedance(self, *, f_start: float, f_end: float, n_points: int, amplitude: float,
                        e_dc: float = 0.0, current_range: float = 10e-3) -> Sequence[ImpedancePoint]: ...


ROLES: dict[str, type] = {"cycler": Cycler, "chamber": Chamber, "press": Press, "potentiostat": Potentiostat}
