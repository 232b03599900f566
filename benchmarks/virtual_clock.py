"""How much faster than real time a simulated run goes: the demo profile on the virtual clock.

Prints test time, wall time, the speed-up, and samples per wall second.
Run: .venv/bin/python benchmarks/virtual_clock.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

from cellbench.bench.faces.simbench import run_simulated
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.library import library_path
from cellbench.profiles.parse import load_profile


def main() -> None:
    profile, text = load_profile(library_path("formation-and-cycling"))
    with tempfile.TemporaryDirectory() as tmp:
        clock = VirtualClock()
        t0 = time.perf_counter()
        result, _ = clock.run(run_simulated(profile, text, clock, runs_dir=Path(tmp)))
        wall = time.perf_counter() - t0
        with open_run(result.database) as store:
            n = len(store.samples())
    test_time = result.outcome.test_time
    print(f"test time      {test_time / 3600:10.1f} h")
    print(f"wall time      {wall:10.2f} s")
    print(f"speed-up       {test_time / wall:10.0f} x real time")
    print(f"samples        {n:10d}  ({n / wall:.0f} per wall second, each a TCP round trip)")


if __name__ == "__main__":
    main()
