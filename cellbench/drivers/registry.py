"""The driver registry: each driver module declares its drivers (name, roles, transport defaults) in one place.

A module of `cellbench.drivers` that defines `DRIVERS: list[DriverSpec]` is found by `drivers()`;
bench files name drivers by `DriverSpec.name`, and `cellbench sim serve` finds the simulator through
`DriverSpec.simulator` (a dotted path imported only when a simulator is asked for, never on a real run).
Adding an instrument touches its driver module, its simulator module and its docs, nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, create_model

from cellbench.drivers.errors import InstrumentError
from cellbench.profiles.base import Strict
from cellbench.profiles.units import Duration

Role = Literal["cycler", "chamber", "press", "potentiostat"]


@dataclass(frozen=True)
class OpenRequest:
    """What a bench file says of one instrument, with the registry's defaults filled in."""

    name: str
    resource: str
    timeout: float
    backend: Literal["auto", "native", "visa"] = "auto"
    baud_rate: int = 9600
    address: int | None = None  # an RS-485 address, where the protocol has one
    device_id: int = 1  # a Modbus unit id
    area_cm2: float = 1.0  # the cell's active area (a press works in force, the lab in pressure)
    login_file: str | None = None  # 'user:password' in a file, for an instrument that asks for a login
    watchdog: float | None = None  # s: an instrument's own watchdog on its setpoints (a Maccor's MacNetDirectModeWD)
    binary_port: int | None = None  # a second port of the instrument's (a Maccor box's binary MacNet)


class InstrumentSettings(Strict):
    """One instrument by its resource string: VISA-style for all, the wire chosen from it; every driver takes
    these keys and its own (under Drivers), read by the driver's model that `driver:` names."""

    what: ClassVar[str] = "instrument key"
    durations: ClassVar[tuple[str, ...]] = ("timeout", "reconnect_grace")  # written back with their unit
    driver: str = Field(description="a driver of the registry")
    resource: str = Field(description="where it is, VISA-style: `TCPIP::host::port::SOCKET`, "
                                      "`ASRL/dev/ttyUSB0::INSTR`, `GPIB0::18::INSTR`, `USB0::...::INSTR`")
    backend: Literal["auto", "native", "visa"] = Field(
        default="auto", description="the wire: native asyncio sockets and pyserial, or pyvisa (GPIB, USB-TMC); "
                                    "auto picks native where it can")
    timeout: Duration = Field(default=5.0, description="how long a reply may take")
    reconnect_grace: Duration = Field(
        default=60.0, ge=0, description="how long a lost, silent or garbling instrument is reconnected before its "
                                        "channels are made safe and fail (0: at once)")

    @property
    def spec(self) -> DriverSpec:
        return driver(self.driver)

    @property
    def roles(self) -> tuple[str, ...]:
        return self.spec.roles

    @property
    def owner_channel(self) -> str | None:
        """The channel whose profile sets a shared instrument (None: each channel its own, or nobody named)."""
        return None

    @property
    def steps_on_instrument(self) -> bool:
        """Whether steps it can run itself are run on it (a cycler with a trigger model, where the bench says so)."""
        return False

    def request(self, name: str, area_cm2: float) -> OpenRequest:
        """How the driver opens it: these settings, the registry's defaults, and the area of the cells it acts on
        (a press works in force, the lab in pressure)."""
        return OpenRequest(name=name, resource=self.resource, timeout=self.timeout, backend=self.backend,
                           baud_rate=self.spec.baud_rate, area_cm2=area_cm2, **self._own())

    def _own(self) -> dict[str, Any]:
        """The driver's own settings as the open request carries them."""
        return {}

    def as_written(self) -> dict[str, Any]:
        """As a bench file would write it (durations with their unit), so that validating it again gives it."""
        out = self.model_dump(mode="json", exclude_none=True)
        return {**out, **{k: f"{getattr(self, k)!r} s" for k in self.durations if getattr(self, k) is not None}}


class SerialSettings(InstrumentSettings):
    """An instrument that may be on a serial line."""

    baud_rate: int | None = Field(default=None, gt=0, description="serial lines only; by default the driver's")

    def _own(self) -> dict[str, Any]:
        return {**super()._own(), **({"baud_rate": self.baud_rate} if self.baud_rate else {})}


class SharedSettings(InstrumentSettings):
    """An instrument several channels may share (a chamber, a press)."""

    owner: str | None = Field(default=None, description="when several channels share it: the channel whose "
                                                         "profile sets it (the others only read it)")

    @property
    def owner_channel(self) -> str | None:
        return self.owner


class LoginSettings(InstrumentSettings):
    """An instrument that may ask for a login."""

    login_file: Path | None = Field(default=None, description="a file holding 'user:password' for an instrument "
                                                              "that asks for a login; read when it is opened, "
                                                              "never recorded")

    def _own(self) -> dict[str, Any]:
        login = None if self.login_file is None else str(self.login_file.resolve())
        return {**super()._own(), "login_file": login}


@dataclass(frozen=True)
class Opened:
    """An open driver, its identification, and how to close it."""

    driver: Any
    identity: str
    close: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class DriverSpec:
    name: str
    roles: tuple[Role, ...]
    open: Callable[[OpenRequest], Awaitable[Opened]]
    description: str
    baud_rate: int = 9600
    simulator: str | None = None  # "module:attribute" of the simulator's `serve`, imported on demand
    rehearsal: str | None = None  # "module:attribute" of the simulator's `rehearse`, for a simulated bench
    blind_off: Callable[[OpenRequest], Awaitable[None]] | None = None  # a cycler's output off on a fresh wire,
    # sent without waiting for replies: the last resort when the instrument no longer answers
    max_current: float | None = None  # A a cycler can source at all (its largest range), checked before a run
    sets_pressure: bool = True  # False: a press that only reads (a load cell under a fixture set by hand)
    multi_channel: bool = False  # a box of channels: bench channels name one with `cycler_channel`
    runs_schedules: bool = False  # a cycler that runs schedules stored on it (a profile's `schedule` step)
    host_driven: bool = True  # False: a cycler that takes no current or voltage from the host, only schedules
    # its bench-file entry's model (a subclass of InstrumentSettings with `driver: Literal[name]`); none: the
    # common keys only
    settings: type[InstrumentSettings] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@cache
def drivers() -> dict[str, DriverSpec]:
    """Every registered driver by name, from the modules of this package."""
    import cellbench.drivers as package

    found: dict[str, DriverSpec] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "registry":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for spec in getattr(module, "DRIVERS", ()):
            if spec.name in found:
                raise RuntimeError(f"driver '{spec.name}' is declared twice")
            found[spec.name] = spec
    return found


@cache
def settings_models() -> tuple[type[InstrumentSettings], ...]:
    """Each driver's bench-file model, discriminated on `driver:`."""
    models = []
    for name, spec in sorted(drivers().items()):
        tag: Any = Literal[name]
        model = spec.settings or create_model(f"{name}_settings", __base__=InstrumentSettings,
                                              driver=(tag, Field(description="a driver of the registry")))
        if model.model_fields["driver"].annotation != tag:
            raise RuntimeError(f"driver '{name}': its settings model's `driver` must be Literal['{name}']")
        models.append(model)
    return tuple(models)


def driver(name: str) -> DriverSpec:
    """The driver of that name; KeyError naming the known ones otherwise."""
    known = drivers()
    if name not in known:
        raise KeyError(f"unknown driver '{name}' (expected one of: {', '.join(sorted(known))})")
    return known[name]


def simulator(spec: DriverSpec) -> Any:
    """The `serve` of a driver's simulator, imported now."""
    return _imported(spec.simulator, f"driver '{spec.name}' has no simulator")


def rehearsal(spec: DriverSpec) -> Any:
    """The `rehearse` of a driver's simulator (a simulated bench's stand-in for it), imported now."""
    return _imported(spec.rehearsal, f"driver '{spec.name}' has no simulator to rehearse with")


def _imported(where: str | None, missing: str) -> Any:
    if where is None:
        raise KeyError(missing)
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute)


def read_login(path: str, name: str) -> str:
    """'user:password' from an instrument's login file (read when it is opened, never recorded)."""
    try:
        text = Path(path).read_text(encoding="utf-8")[:1000].strip()
    except OSError as exc:
        raise InstrumentError(name, [f"the login file cannot be read: {exc}"], "login") from None
    if ":" not in text:
        raise InstrumentError(name, [f"the login file {path} holds no 'user:password'"], "login")
    return text
