"""A long life test on the virtual clock: C/3 cycles at 60 degC, logging every 10 s, through the whole stack
(engine, supervisor, store, the simulated 2450 on its TCP wire). Prints test time, wall time, CPU time and how
many times faster than real time it ran; the target for 1,000 cycles is 300,000x.

The pellet-protected cell is used (its protected lithium lives past 100 cycles at 60 degC); cycles shorten as it
fades, which the speed-up (test time over wall time) does not depend on.
With --on-instrument the same life test runs twice in one process, reading by reading and with the 2450 running
its steps on its trigger model (runtime/blocks.py), and prints both, their ratio and how far every cycle's
capacities differ.
Run: .venv/bin/python benchmarks/life_test.py [cycles] [--profile FILE] [--on-instrument]   (default 1000)
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

from cellbench.bench.faces.simbench import run_simulated
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.bench.runtime.store import open_run
from cellbench.profiles.parse import parse_profile
from cellbench.simulators.parameters import PRESETS

CYCLES = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1000
TARGET = 300_000


def life_profile(cycles: int) -> str:
    return f"""
name: life test
sample_period: 10 s
steps:
  - repeat: {cycles}
    steps:
      - charge: {{current: C/3, until: 4.3 V}}
      - discharge: {{current: C/3, until: 2.5 V}}
"""


def ours(cycles: int, profiler: cProfile.Profile | None = None, *, run_steps: bool = False,
         capacities: list[tuple[float, float]] | None = None) -> tuple[float, float, float, int, int, str]:
    """(test time, wall, CPU seconds, samples, cycles, outcome) of the life test through the whole stack; each
    cycle's (charge, discharge) Ah into `capacities`."""
    text = life_profile(cycles)
    profile = parse_profile(text)
    with tempfile.TemporaryDirectory() as tmp:
        clock = VirtualClock()
        cpu0, t0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        result, _ = clock.run(run_simulated(profile, text, clock, params=PRESETS["pellet-protected"],
                                            initial_soc=0.5, temperature_c=60.0, runs_dir=Path(tmp),
                                            run_steps=run_steps))
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        with open_run(result.database) as store:
            last: dict[int, tuple[float, float]] = {}
            samples = 0
            for s in store.iter_samples():
                samples += 1
                last[s.cycle] = (s.charge_ah, s.discharge_ah)
            if capacities is not None:
                capacities.extend(last[c] for c in sorted(last))
            done = max((s["cycle"] for s in store.steps()), default=0)
    return result.outcome.test_time, wall, cpu, samples, done, result.outcome.reason or "completed"


def both(cycles: int) -> None:
    """Reading by reading and on the instrument, one after the other in one process."""
    runs = {}
    for run_steps in (False, True):
        caps: list[tuple[float, float]] = []
        runs[run_steps] = (*ours(cycles, run_steps=run_steps, capacities=caps), caps)
    for run_steps, (test_time, wall, cpu, samples, done, outcome, _) in runs.items():
        print(f"{'on the instrument' if run_steps else 'reading by reading'}: {done} cycles, test time "
              f"{test_time / 3600:.0f} h, wall {wall:.2f} s, CPU {cpu:.2f} s, {samples} samples, "
              f"{test_time / wall:,.0f}x real time; {outcome}")
    print(f"wall ratio (reading by reading / on the instrument): {runs[False][1] / runs[True][1]:.2f}")
    pairs = list(zip(runs[True][6], runs[False][6], strict=False))
    worst = max((abs(a - b) / b for (ca, da), (cb, db) in pairs for a, b in ((ca, cb), (da, db)) if b), default=0)
    print(f"every cycle's charge and discharge capacity: at most {worst * 100:.4f} % apart over {len(pairs)} cycles")


def main() -> None:
    if "--on-instrument" in sys.argv:
        both(CYCLES)
        return
    prof_out = sys.argv[sys.argv.index("--profile") + 1] if "--profile" in sys.argv else None
    profiler = cProfile.Profile() if prof_out else None
    test_time, wall, cpu, samples, cycles, outcome = ours(CYCLES, profiler)
    print(f"{cycles} C/3 cycles at 60 degC, 10 s logging: test time {test_time / 3600:.0f} h, wall {wall:.1f} s, "
          f"CPU {cpu:.1f} s, {samples} samples ({samples / wall:.0f} per wall s)")
    print(f"speed-up {test_time / wall:,.0f}x real time (target {TARGET:,}x: "
          f"{'met' if test_time / wall >= TARGET else 'not met'}); {test_time / 3600 / wall:.1f} simulated h per "
          f"wall s; outcome: {outcome}")
    if profiler and prof_out:
        profiler.dump_stats(prof_out)
        pstats.Stats(prof_out).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
