"""cellbench: an async hardware-in-the-loop test-bench controller for all-solid-state battery cells.

    import cellbench
    result = cellbench.run("formation-and-cycling")            # a dry run on the simulated bench
    result = await cellbench.arun("cycle.yaml", bench="bench.yaml")
    df = cellbench.read_samples(result.database)

The API is loaded on first use, so importing a part of cellbench (a driver, say) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellbench.bench.faces.api import RunResult, arun, read_events, read_samples, read_state, read_steps, run

__all__ = ["RunResult", "arun", "read_events", "read_samples", "read_state", "read_steps", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cellbench.bench.faces import api
        return getattr(api, name)
    raise AttributeError(f"module 'cellbench' has no attribute {name!r}")
