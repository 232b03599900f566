"""How many cycler channels one controller samples once a second on the real clock, through MacNet.

Simulated Maccor boxes of 128 channels each run in their own processes (`cellbench sim serve maccor`), as
real boxes are other machines; the controller runs a one-minute rest at a 1 s sample period on N channels
(`run_bench`, supervisors on, one database per channel). For each N it prints the samples missed, the
99th-percentile timing error of the samples against their 1 s schedule, the wall time and the CPU the
controller used. Target: 1,000 channels with p99 under 100 ms.

Run: .venv/bin/python benchmarks/many_channels.py [N ...]   (default: 128 256 512 1024)
"""

from __future__ import annotations

import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellbench.bench.clock import RealClock
from cellbench.bench.config import BenchConfig
from cellbench.bench.run import run_bench
from cellbench.profiles.parse import parse_profile

PER_BOX = 128
PROFILE = "name: one minute\nsample_period: 1 s\nsteps:\n  - rest: 60 s\n"


def serve_box() -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "cellbench.bench.cli", "sim", "serve", "maccor", "--port", "0",
                             "--bin-port", "0", "--channels", str(PER_BOX)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"::(\d+)::SOCKET \(MacNet JSON\), binary port (\d+)", line):
            return proc, int(m.group(1)), int(m.group(2))
    raise RuntimeError("the box did not start")


def measure(n: int, boxes: list[tuple[int, int]]) -> None:
    bench = BenchConfig.model_validate({
        "name": f"bench-{n}",
        "instruments": {f"box{b}": {"driver": "maccor", "resource": f"TCPIP::127.0.0.1::{port}::SOCKET",
                                    "address": bin_port} for b, (port, bin_port) in enumerate(boxes)},
        "cells": {f"c{k}": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"} for k in range(n)},
        "channels": {f"ch{k:04d}": {"cycler": f"box{k // PER_BOX}", "cycler_channel": k % PER_BOX, "cell": f"c{k}"}
                     for k in range(n)},
    })
    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        clock = RealClock()
        results = clock.run(run_bench(bench, parse_profile(PROFILE), PROFILE, clock, runs_dir=Path(tmp),
                                      handle_signals=False))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        errors, missed = [], 0
        for r in results:
            con = sqlite3.connect(r.database)
            times = [t for (t,) in con.execute('SELECT "Test Time / s" FROM samples ORDER BY rowid')]
            con.close()
            if not times:
                missed += 61
                continue
            start = times[0]  # each channel's schedule runs from its own step start
            missed += max(0, 61 - len({round(t - start) for t in times}))
            errors += [abs(t - start - round(t - start)) for t in times]
    errors.sort()
    p99 = errors[int(0.99 * (len(errors) - 1))] if errors else float("nan")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"{n:6d} channels  missed {missed:6d} of {61 * n:7d}  p99 timing error {p99 * 1e3:7.1f} ms  "
          f"wall {wall:6.1f} s  controller CPU {cpu:6.1f} s ({cpu / wall * 100:4.0f} % of one core)", flush=True)


def main() -> None:
    counts = [int(x) for x in sys.argv[1:]] or [128, 256, 512, 1024]
    procs, boxes = [], []
    for _ in range((max(counts) + PER_BOX - 1) // PER_BOX):
        proc, port, bin_port = serve_box()
        procs.append(proc)
        boxes.append((port, bin_port))
    try:
        for n in counts:
            measure(n, boxes)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
