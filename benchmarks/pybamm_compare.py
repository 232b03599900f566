"""The whole stack against PyBaMM's Thevenin equivalent-circuit model on the same 100 C/3 cycles at the same output
resolution (10 s), in one run: simulated hours per wall second on each side and their ratio.

The cells differ (PyBaMM's ECM example, 100 Ah; ours the simulated pellet at 60 degC) and so does the work: PyBaMM
integrates a model; cellbench runs its engine, store and the simulated 2450 on its TCP wire, a query per sample,
as a dry run does. Target: cellbench faster. Needs the `bench` extra (`make benchmarks` installs it).
Run: .venv/bin/python benchmarks/pybamm_compare.py [cycles]   (default 100)
"""

from __future__ import annotations

import sys
import time

import own_state  # noqa: F401  (first: a state folder of its own)
import pybamm  # type: ignore[import-untyped]
from life_test import ours

CYCLES = int(sys.argv[1]) if len(sys.argv) > 1 else 100


def peer(cycles: int) -> tuple[float, float, int]:
    """(simulated s, wall s, output points) of PyBaMM's Thevenin model on the same cycles."""
    model = pybamm.equivalent_circuit.Thevenin()
    experiment = pybamm.Experiment(
        [("Charge at C/3 until 4.2 V", "Discharge at C/3 until 3.2 V")] * cycles, period="10 seconds")
    t0 = time.perf_counter()
    solution = pybamm.Simulation(model, experiment=experiment).solve()
    wall = time.perf_counter() - t0
    times = solution["Time [s]"].entries
    return float(times[-1] - times[0]), wall, len(times)


def main() -> None:
    p_time, p_wall, p_points = peer(CYCLES)
    o_time, o_wall, _, o_samples, o_cycles, _ = ours(CYCLES)
    p_rate, o_rate = p_time / 3600 / p_wall, o_time / 3600 / o_wall
    print(f"PyBaMM Thevenin  {CYCLES} cycles: {p_time / 3600:7.0f} h in {p_wall:6.1f} s, {p_points} points: "
          f"{p_rate:7.1f} simulated h per wall s")
    print(f"cellbench        {o_cycles} cycles: {o_time / 3600:7.0f} h in {o_wall:6.1f} s, {o_samples} samples: "
          f"{o_rate:7.1f} simulated h per wall s")
    print(f"ratio cellbench / PyBaMM: {o_rate / p_rate:.3f} (target > 1: {'met' if o_rate > p_rate else 'not met'})")


if __name__ == "__main__":
    main()
