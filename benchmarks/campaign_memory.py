"""Memory over a 30-day campaign: 16 channels cycling C/3 at 60 degC on the virtual clock (`rehearse`, each
channel its own simulated 2450 on its TCP wire, supervisors, stores), with resident memory, open files, asyncio
tasks and threads printed at the start, every few simulated days and at the end. Flat is the target: a
month-long run must not grow.

Run: .venv/bin/python benchmarks/campaign_memory.py [days] [channels]   (default 30 16)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

from cellbench.bench.faces.simbench import rehearse
from cellbench.bench.runner.config import BenchConfig
from cellbench.bench.runtime.clock import VirtualClock
from cellbench.profiles.parse import parse_profile
from cellbench.simulators.parameters import PRESETS

DAYS = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
CHANNELS = int(sys.argv[2]) if len(sys.argv) > 2 else 16
PROFILE = f"""
name: campaign
sample_period: 2 min
record: {{every: 15 min, voltage: 20 mV, current: 0.1 mA}}
steps:
  - repeat: 100000
    time_limit: {DAYS * 24:g} h
    steps:
      - cccv: {{current: C/3, voltage: 4.3 V, until: [C/20, 5 h]}}
      - rest: 10 min
      - discharge: {{current: C/3, until: 2.5 V}}
      - rest: 10 min
"""


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def figures(in_loop: bool = True) -> str:
    tasks = f"tasks {len(asyncio.all_tasks()):4d}  " if in_loop else ""
    return (f"RSS {rss_mib():6.1f} MiB  open files {len(os.listdir('/proc/self/fd')):4d}  {tasks}"
            f"threads {threading.active_count():3d}")


def main() -> None:
    bench = BenchConfig.model_validate({
        "name": "campaign",
        "instruments": {f"smu{k}": {"driver": "keithley2450", "resource": f"TCPIP::127.0.0.1::{5025 + k}::SOCKET"}
                        for k in range(CHANNELS)},
        "cells": {f"c{k}": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}
                  for k in range(CHANNELS)},
        "channels": {f"ch{k:02d}": {"cycler": f"smu{k}", "cell": f"c{k}"} for k in range(CHANNELS)},
    })
    profile = parse_profile(PROFILE)
    clock = VirtualClock()
    every = max(1.0, DAYS / 6) * 86400

    async def campaign(tmp: Path) -> None:
        run = asyncio.ensure_future(rehearse(bench, profile, PROFILE, clock, base=PRESETS["pellet-protected"],
                                             initial_soc=0.5, temperature_c=60.0, runs_dir=tmp))
        t0 = time.perf_counter()
        await asyncio.sleep(60)  # opened and running
        print(f"day {0:5.1f}  wall {time.perf_counter() - t0:6.1f} s  {figures()}", flush=True)
        day = 0.0
        while not run.done():
            done, _ = await asyncio.wait([run], timeout=every)
            day += every / 86400
            if not done:
                print(f"day {day:5.1f}  wall {time.perf_counter() - t0:6.1f} s  {figures()}", flush=True)
        results = run.result()
        print(f"end        wall {time.perf_counter() - t0:6.1f} s  {figures()}  "
              f"({len(results)} channels: {', '.join(sorted({r.outcome.reason or 'completed' for r in results}))})")

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{CHANNELS} channels, {DAYS:g} days of C/3 cycling at 60 degC on the virtual clock")
        print(f"before     {figures(in_loop=False)}")
        clock.run(campaign(Path(tmp)))
        print(f"after      {figures(in_loop=False)} (the run closed)")


if __name__ == "__main__":
    main()
