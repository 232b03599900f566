"""How many cycler channels one controller samples once a second on the real clock, through MacNet.

Simulated Maccor boxes of 128 channels each run in their own processes (`cellbench sim serve maccor`), as real
boxes are other machines; the controller runs a one-minute rest at a 1 s sample period on N channels
(`run_bench`, supervisors on, one database per channel). For each N it prints the samples missed, the 99th-
percentile timing error of the samples against their 1 s schedule (each channel's grid where its samples sit;
the step's closing sample, taken at its own deadline, is not on that grid and not counted), the wall time, the
CPU the controller used, and the time from the start to every channel's first sample (a channel whose first
sample comes more than a second after the bench's first counts the seconds between as missed). Each N runs
twice: without a display, and with the live display a technician sees (`cellbench run` on a terminal: rich bars,
summarised past 8 channels) drawn to a terminal that is not looked at. Target: 1,000 channels with none missed
and p99 under 100 ms, with the display on.

Run: .venv/bin/python benchmarks/many_channels.py [N ...]   (default: 256 1024)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)
from rich.console import Console
from rich.progress import Progress

from cellbench.bench.faces.display import Display
from cellbench.bench.runner.config import BenchConfig
from cellbench.bench.runner.run import run_bench
from cellbench.bench.runtime.clock import RealClock
from cellbench.profiles.parse import parse_profile

PER_BOX = 128
PROFILE = "name: one minute\nsample_period: 1 s\nsteps:\n  - rest: 60 s\n"


def serve_box() -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "cellbench", "sim", "serve", "maccor",
                             "--exit-with-parent", "--port", "0", "--bin-port", "0", "--channels", str(PER_BOX)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"::(\d+)::SOCKET \(MacNet JSON\), binary port (\d+)", line):
            return proc, int(m.group(1)), int(m.group(2))
    raise RuntimeError("the box did not start")


def measure(n: int, boxes: list[tuple[int, int]], display: bool) -> tuple[int, float]:
    bench = BenchConfig.model_validate({
        "name": f"bench-{n}",
        "instruments": {f"box{b}": {"driver": "maccor", "resource": f"TCPIP::127.0.0.1::{port}::SOCKET",
                                    "binary_port": bin_port} for b, (port, bin_port) in enumerate(boxes)},
        "cells": {f"c{k}": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"} for k in range(n)},
        "channels": {f"ch{k:04d}": {"cycler": f"box{k // PER_BOX}", "cycler_channel": k % PER_BOX, "cell": f"c{k}"}
                     for k in range(n)},
    })
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as screen:
        bars = Progress(console=Console(file=screen, force_terminal=True, width=200), transient=True)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, unix0 = time.perf_counter(), time.time()
        clock = RealClock()
        with bars if display else contextlib.nullcontext():
            results = clock.run(run_bench(bench, parse_profile(PROFILE), PROFILE, clock, runs_dir=Path(tmp),
                                          handle_signals=False, on_progress=Display(bars) if display else None))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        errors, missed, firsts = [], 0, []
        for r in results:
            con = sqlite3.connect(r.database)
            times = [t for (t,) in con.execute('SELECT "Test Time / s" FROM samples ORDER BY rowid')]
            (first,) = con.execute('SELECT min("Unix Time / s") FROM samples').fetchone()
            con.close()
            if first is not None:
                firsts.append(first)
            if len(times) < 3:
                missed += 61
                continue
            # a channel's 1 s grid is where its samples sit (the median phase of them all: the engine anchors it at
            # the step's first sample, which a burst of a thousand channels starting at once may itself delay);
            # its last sample is the step's end, taken at the step's own deadline, not on the grid
            grid, mid = times[:-1], times[len(times) // 2]
            anchor = mid + statistics.median(((t - mid + 0.5) % 1.0) - 0.5 for t in grid)
            errors += [abs(((t - anchor + 0.5) % 1.0) - 0.5) for t in grid]
            # a missed sample is a gap of two periods or more between neighbours, or no sample in the last second
            missed += sum(max(0, round(b - a) - 1) for a, b in itertools.pairwise(grid))
            missed += max(0, round(times[-1] - grid[-1] - 0.5) - 1)
    # a channel whose first sample comes late missed the samples it should have taken meanwhile: every channel
    # should sample from the bench's first second (its first sample within a second of the earliest one)
    earliest = min(firsts, default=unix0)
    late = sorted(f - earliest for f in firsts)
    missed += sum(int(x) for x in late)
    errors.sort()
    p99 = errors[int(0.99 * (len(errors) - 1))] if errors else float("nan")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"{n:6d} channels, display {'on ' if display else 'off'}  missed {missed:6d} of {61 * n:7d}  "
          f"p99 timing error {p99 * 1e3:7.1f} ms  "
          f"wall {wall:6.1f} s  controller CPU {cpu:6.1f} s ({cpu / wall * 100:4.0f} % of one core)  "
          f"start to every channel's first sample {max(firsts, default=unix0) - unix0:5.1f} s (the last "
          f"{late[-1] if late else 0.0:4.1f} s after the first)", flush=True)
    return missed, p99


def main() -> None:
    counts = [int(x) for x in sys.argv[1:]] or [256, 1024]
    procs, boxes = [], []
    for _ in range((max(counts) + PER_BOX - 1) // PER_BOX):
        proc, port, bin_port = serve_box()
        procs.append(proc)
        boxes.append((port, bin_port))
    try:
        found = {(n, shown): measure(n, boxes, shown) for n in counts for shown in (False, True)}
        clean = [n for (n, shown), (missed, _) in found.items() if missed == 0 and shown]
        print(f"largest N with no missed sample, display on: {max(clean) if clean else 'none'}")
        met = [n for (n, shown), (missed, p99) in found.items() if n >= 1000 and shown and missed == 0 and p99 < 0.1]
        verdict = f"met at {min(met)}" if met else "not met"
        print(f"target (1,000 channels, none missed, p99 under 100 ms, display on): {verdict}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
