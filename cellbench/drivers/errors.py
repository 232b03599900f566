"""Typed errors of the instrument layer; each names the instrument and what it was doing."""

from __future__ import annotations


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
        super().__init__(instrument, f"reply {line!r} to {command!r} is not {expected}")


class ConnectionLost(InstrumentFault):
    """The transport closed or could not be opened."""
