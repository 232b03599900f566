"""`cellbench --help` against the floor of its two libraries (`import typer, rich.console` and typer's help
rendering) in fresh interpreters, interleaved, medians: the start-up a technician waits for on every typo.
Run: .venv/bin/python benchmarks/cli_startup.py [repeats]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import own_state  # noqa: F401  (first: a state folder of its own)

REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
FLOOR = ("import typer\napp = typer.Typer(help='x', no_args_is_help=True)\n"
         "@app.command()\ndef a() -> None: ...\n@app.command()\ndef b() -> None: ...\napp()")


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ours, floor, bare = [], [], []
    for _ in range(REPEATS):
        ours.append(wall([sys.executable, "-m", "cellbench", "--help"]))
        floor.append(wall([sys.executable, "-c", FLOOR, "--help"]))
        bare.append(wall([sys.executable, "-c", "pass"]))
    o, f, b = (statistics.median(x) for x in (ours, floor, bare))
    print(f"{REPEATS} interleaved repeats, medians: python alone {b:.3f} s   a two-command typer app --help {f:.3f} s"
          f"   cellbench --help {o:.3f} s (target 0.2 s)   ratio to the typer floor {o / f:.2f}")


if __name__ == "__main__":
    main()
