"""Client instructions per query against a served 2450 (its own process): our native transport, PyMeasure's
adapter and a bare asyncio client, each counted by valgrind's callgrind (instructions, not seconds: the same
count whatever else a shared machine is doing). Each client runs twice, with N and 2N queries; the difference
over N is its cost per query, start-up and imports left out. PyMeasure's first few hundred queries cost more
(150k instructions each from 100 to 600 queries, 98k after), so N is 1000 by default: steady state.

Run: .venv/bin/python benchmarks/transport_instructions.py [N]   (default 1000; needs valgrind)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_cli import serve

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ROOT = Path(__file__).resolve().parent.parent
CLIENT = r"""
import asyncio, sys
kind, resource, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "ours, native":
    sys.path.insert(0, sys.argv[4])
    from cellbench.drivers.transport import open_transport
    async def main():
        t = await open_transport(resource, name="smu", timeout=5, backend="native")
        for _ in range(n):
            await t.query(":MEAS:VOLT?")
        await t.close()
    asyncio.run(main())
elif kind == "bare asyncio":
    async def main():
        _, host, port, _ = resource.split("::")
        r, w = await asyncio.open_connection(host, int(port))
        for _ in range(n):
            w.write(b":MEAS:VOLT?\n")
            await w.drain()
            await r.readline()
        w.close()
    asyncio.run(main())
else:
    from pymeasure.adapters import VISAAdapter
    a = VISAAdapter(resource, visa_library="@py", read_termination="\n", write_termination="\n")
    for _ in range(n):
        a.write(":MEAS:VOLT?")
        a.read()
    a.close()
"""


def instructions(kind: str, resource: str, n: int, folder: Path) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder / 'cg.out'}",
                          sys.executable, "-c", CLIENT, kind, resource, str(n), str(ROOT)],
                         capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", out.stderr)
    assert m, out.stderr[-500:]
    return int(m.group(1))


def main() -> None:
    if shutil.which("valgrind") is None:
        print("skipped: valgrind is needed (Debian's valgrind package)")
        return
    proc, resource = serve("keithley2450", "--port", "0")
    per: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("ours, native", "PyMeasure VISAAdapter", "bare asyncio"):
                base = instructions(kind, resource, N, Path(tmp))
                more = instructions(kind, resource, 2 * N, Path(tmp))
                per[kind] = (more - base) / N
                print(f"{kind:22s} {per[kind]:9,.0f} instructions per query", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"PyMeasure / ours: {per['PyMeasure VISAAdapter'] / per['ours, native']:.2f} (> 1: ours does less); "
          f"bare asyncio / ours: {per['bare asyncio'] / per['ours, native']:.2f}")


if __name__ == "__main__":
    main()
