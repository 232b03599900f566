"""Queries per second against a served 2450 (its own process): our VISA and native transports against plain
pyvisa-py, a bare asyncio client and PyMeasure's adapter, in one run, interleaved, with the ratios.

Run: .venv/bin/python benchmarks/transport.py [queries] [repeats]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)
import pyvisa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellbench.drivers.transport import open_transport
from tests.test_cli import serve

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
COMMAND = ":MEAS:VOLT?"
REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 5


def rate(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return N / (time.perf_counter() - t0)


CPU: dict[str, list[float]] = {}  # client CPU µs per query (this process), beside the rates: less noisy when shared


def timed(name: str, fn: Callable[[], float]) -> float:
    c0 = time.process_time()
    got = fn()
    CPU.setdefault(name, []).append((time.process_time() - c0) / N * 1e6)
    return got


def plain_pyvisa(resource: str) -> float:
    rm = pyvisa.ResourceManager("@py")
    inst = rm.open_resource(resource, read_termination="\n", write_termination="\n", timeout=5000)
    try:
        return rate(lambda: [inst.query(COMMAND) for _ in range(N)])
    finally:
        inst.close()
        rm.close()


def pymeasure_adapter(resource: str) -> float:
    from pymeasure.adapters import VISAAdapter

    adapter = VISAAdapter(resource, visa_library="@py", read_termination="\n", write_termination="\n")
    try:
        def run() -> None:
            for _ in range(N):
                adapter.write(COMMAND)
                adapter.read()
        return rate(run)
    finally:
        adapter.close()


async def ours(resource: str, backend: str) -> float:
    t = await open_transport(resource, name="smu", timeout=5, backend=backend)  # type: ignore[arg-type]
    try:
        t0 = time.perf_counter()
        for _ in range(N):
            await t.query(COMMAND)
        return N / (time.perf_counter() - t0)
    finally:
        await t.close()


async def bare_asyncio(resource: str) -> float:
    _, host, port, _ = resource.split("::")
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.perf_counter()
    for _ in range(N):
        writer.write(COMMAND.encode() + b"\n")
        await writer.drain()
        await reader.readline()
    elapsed = time.perf_counter() - t0
    writer.close()
    return N / elapsed


def main() -> None:
    proc, resource = serve("keithley2450", "--port", "0")
    rows: dict[str, list[float]] = {}
    try:
        for _ in range(REPEATS):
            for name, fn in (("plain pyvisa-py", lambda: plain_pyvisa(resource)),
                             ("ours, VISA", lambda: asyncio.run(ours(resource, "visa"))),
                             ("bare asyncio", lambda: asyncio.run(bare_asyncio(resource))),
                             ("ours, native", lambda: asyncio.run(ours(resource, "native"))),
                             ("PyMeasure VISAAdapter", lambda: pymeasure_adapter(resource))):
                rows.setdefault(name, []).append(timed(name, fn))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    med = {name: statistics.median(v) for name, v in rows.items()}
    best = {name: max(v) for name, v in rows.items()}  # the least disturbed repeat (as timeit takes the least time)
    cpu = {name: statistics.median(v) for name, v in CPU.items()}
    for name, values in rows.items():
        print(f"{name:22s} median {med[name]:8,.0f} q/s, best {best[name]:8,.0f} "
              f"({', '.join(f'{v:,.0f}' for v in values)}); client CPU {cpu[name]:5.1f} µs per query")
    for ours_, theirs, target in (("ours, VISA", "plain pyvisa-py", ">= 0.7"),
                                  ("ours, native", "bare asyncio", ">= 0.9"),
                                  ("ours, native", "PyMeasure VISAAdapter", "> 1")):
        print(f"{ours_} / {theirs}: rate {med[ours_] / med[theirs]:.2f} (median), {best[ours_] / best[theirs]:.2f} "
              f"(best); CPU per query {cpu[theirs] / cpu[ours_]:.2f} (theirs / ours) (target {target})")

if __name__ == "__main__":
    main()
