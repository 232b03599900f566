"""Reaction time on the real clock: from a limit crossing on the wire to the output-off command on the wire.

A simulated 2450 (`cellbench sim serve keithley2450`, its own process) is reached through a line proxy on a
thread of its own. At a random moment within a sample period the proxy starts to report the cell's voltage
beyond a limit in every `:READ?` answer (the crossing: instantaneous, so the figure is the controller's alone);
it time-stamps the first `:OUTP OFF` the controller sends after it. Two cases, each with several trials:

- a profile limit (a discharge `until: 3 V`) at a 1 s sample period: target one sample period + 10 ms;
- a safety limit (the cell's window, 5 V reported) at a 10 s sample period, so that the safety supervisor
  (1 s period) is what catches it: target the supervisor's period + 10 ms;
- the same, crossed adversarially: 1 ms after the engine's first reading of the step (the first `:READ?`
  after `:OUTP ON`), which a supervisor waking at its own cadence took for fresh and acted on a period late.

Run: .venv/bin/python benchmarks/reaction_time.py [trials]
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

from cellbench.bench.ops import runs
from cellbench.bench.runner.config import BenchConfig
from cellbench.bench.runner.run import run_bench
from cellbench.bench.runtime.clock import RealClock
from cellbench.bench.runtime.supervisor import PERIOD as SUPERVISOR_PERIOD
from cellbench.profiles.parse import parse_profile

TRIALS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
SAFETY = "name: safety\nsample_period: 10 s\nsteps:\n  - charge: {current: C/10, until: 1 h}\n"
CASES = {
    # name: (profile, reported voltage after the crossing, the period the target allows, crossed after a reading)
    "profile limit": ("name: limit\nsample_period: 1 s\nsteps:\n  - discharge: {current: C/10, until: 3 V}\n",
                      2.9, 1.0, False),
    "safety limit": (SAFETY, 5.0, SUPERVISOR_PERIOD, False),
    "safety, after a sample": (SAFETY, 5.0, SUPERVISOR_PERIOD, True),
}


class Proxy:
    """A line proxy between the controller and the simulator, on its own thread and event loop."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.cross_at = float("inf")  # time.monotonic() from which readings are reported crossed
        self.value = 0.0
        self.off_at: float | None = None
        self.seen_at: float | None = None  # when the first crossed reading went to the controller
        self.after_first_read = False  # cross just after the step's first reading (the adversarial case)
        self.sourcing_on = False  # the output has gone on
        self.port = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def arm(self, at: float, value: float, after_first_read: bool = False) -> None:
        """Cross at `at` (monotonic), or 1 ms after the first reading that follows the output going on."""
        self.cross_at, self.value, self.off_at, self.seen_at = at, value, None, None
        self.after_first_read, self.sourcing_on = after_first_read, False

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        pending: list[tuple[bool, bool]] = []  # for each query sent: (a :READ?, whether to report it crossed)
        sourcing = ["CURR"]  # a current source answers (voltage, current); a voltage source (current, voltage)

        async def down() -> None:
            while line := await up_r.readline():
                read, crossed = pending.pop(0) if pending else (False, False)
                if read and self.after_first_read and self.sourcing_on:  # the step's first reading: cross after it
                    self.after_first_read, self.cross_at = False, time.monotonic() + 0.001
                if crossed:
                    fields = line.decode().strip().split(",")
                    fields[0 if sourcing[0] == "CURR" else 1] = f"{self.value:+.6E}"
                    line = (",".join(fields) + "\n").encode()
                    self.seen_at = self.seen_at or time.monotonic()
                writer.write(line)
                await writer.drain()

        task = asyncio.ensure_future(down())
        try:
            while line := await reader.readline():
                now = time.monotonic()
                for command in line.decode().strip().split(";"):
                    if "OUTP OFF" in command and now >= self.cross_at and self.off_at is None:
                        self.off_at = now
                    if line.strip() == b":OUTP ON":  # the step's output (an open-circuit read sends it with its set-up)
                        self.sourcing_on = True
                    if m := re.match(r":SOUR\w*:FUNC\w* (CURR|VOLT)", command):
                        sourcing[0] = m.group(1)
                    if "?" in command:
                        read = command.startswith(":READ?")
                        pending.append((read, read and now >= self.cross_at))
                up_w.write(line)
                await up_w.drain()
        finally:
            task.cancel()
            up_w.close()
            writer.close()


def serve_2450() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "cellbench", "sim", "serve", "keithley2450",
                             "--exit-with-parent", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"TCPIP::127\.0\.0\.1::(\d+)::SOCKET", line):
            return proc, int(m.group(1))
    raise RuntimeError("the simulator did not start")


def trial(proxy: Proxy, profile_text: str, value: float, period: float, after_read: bool, rng: random.Random,
          tmp: Path) -> tuple[float, float]:
    """(crossing to output off, first crossed reading to output off) in seconds."""
    bench = BenchConfig.model_validate({
        "name": "reaction",
        "instruments": {"smu": {"driver": "keithley2450", "resource": f"TCPIP::127.0.0.1::{proxy.port}::SOCKET"}},
        "cells": {"c": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}},
        "channels": {"ch": {"cycler": "smu", "cell": "c"}},
    })
    clock = RealClock()
    proxy.arm(float("inf"), value, after_first_read=after_read)  # nothing crossed until the run samples

    async def go() -> None:
        run = asyncio.ensure_future(run_bench(bench, parse_profile(profile_text), profile_text, clock, runs_dir=tmp,
                                              handle_signals=False))
        if not after_read:
            await asyncio.sleep(2.0)  # opened, set up and sampling
            proxy.arm(time.monotonic() + rng.uniform(0.0, period), value)
        await run

    with runs.registry_in(Path(tempfile.mkdtemp(dir=tmp))):  # each trial's safety stop latches its cell anew
        clock.run(go())
    if proxy.off_at is None or proxy.seen_at is None:
        raise RuntimeError("the output was never turned off after the crossing")
    return proxy.off_at - proxy.cross_at, proxy.off_at - proxy.seen_at


def main() -> None:
    proc, port = serve_2450()
    proxy = Proxy(port)
    rng = random.Random(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (profile_text, value, period, after_read) in CASES.items():
                found = [trial(proxy, profile_text, value, period, after_read, rng, Path(tmp))
                         for _ in range(TRIALS)]
                times, after = sorted(t for t, _ in found), sorted(a for _, a in found)
                verdict = "met" if times[-1] <= period + 0.010 else "not met"
                print(f"{name:22s} {TRIALS} trials: crossing to output off: min {times[0] * 1e3:6.1f} ms, median "
                      f"{times[len(times) // 2] * 1e3:6.1f} ms, max {times[-1] * 1e3:6.1f} ms (target <= "
                      f"{period * 1e3:.0f} + 10 ms: {verdict}); first crossed reading to output off: max "
                      f"{after[-1] * 1e3:.1f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
