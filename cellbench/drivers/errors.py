"""The instrument errors drivers raise: defined with the roles (the run-time acts on them), named here for drivers."""

from __future__ import annotations

from cellbench.roles import ConnectionLost, InstrumentError, InstrumentFault, InstrumentTimeout, ProtocolError

__all__ = ["ConnectionLost", "InstrumentError", "InstrumentFault", "InstrumentTimeout", "ProtocolError"]
