"""The analysis stack is an extra (`cellbench[analysis]`): a bench PC runs the controller without it.

`need` imports a module of that stack, or raises `MissingExtra` with the one line that says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ANALYSIS = "pip install 'cellbench[analysis]'"


class MissingExtra(ImportError):
    """A feature whose library belongs to an extra that is not installed."""


def need(module: str, feature: str) -> ModuleType:
    """`module` imported, or MissingExtra: '<feature> needs the analysis extra: pip install ...'."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{feature} needs the analysis extra ({module} is not installed): {ANALYSIS}") from None
