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
from typing import Any, Literal

from cellbench.drivers.errors import InstrumentError

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
