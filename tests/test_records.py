"""A run's record never says what did not happen: `completed` only when the program's end was reached, and no
way the output can fail (a closed pipe, a full disk) ends a run."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_unattended import run_env


def ends(db: Path) -> tuple[list[str], int]:
    with sqlite3.connect(db) as con:
        said = [m for (m,) in con.execute("SELECT message FROM events WHERE kind = 'end'")]
        (count,) = con.execute("SELECT count(*) FROM samples").fetchone()
    return said, count


@pytest.mark.parametrize("output", ["closed pipe", "full disk"])
def test_a_run_whose_output_fails_goes_on_to_its_end(tmp_path: Path, output: str) -> None:
    """`cellbench demo | head -3` once stopped the run after its first sample and recorded it `completed`; with
    its output on a full disk likewise. The run goes on, silently, to its real end; the record says so."""
    argv = [sys.executable, "-m", "cellbench", "demo", "--runs-dir", str(tmp_path / "runs")]
    env = run_env(tmp_path)
    if output == "closed pipe":
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        proc.stdout.read(40)  # the first words, then the reader goes away (as `head` does)
        proc.stdout.close()
        proc.wait(timeout=300)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    else:
        with open("/dev/full", "w") as full:
            done = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, env=env, timeout=300, text=True)
        proc, stderr = done, done.stderr  # type: ignore[assignment]
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    (db,) = (tmp_path / "runs").glob("*.sqlite")
    said, samples = ends(db)
    assert said == ["completed"] and samples > 10_000  # the whole demo: 135 h of test time


def test_an_error_nobody_expected_is_recorded_as_a_failure_never_as_completed(tmp_path: Path) -> None:
    """A progress subscriber that raises (anything but the run's own stops) ends the run: its record says
    `failed` and why, not `completed`."""
    from cellbench.bench.faces.simbench import SimulatedBench
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.profiles.parse import parse_profile

    text = "name: t\nsample_period: 1 s\nsteps:\n  - rest: 1 h\n"
    profile = parse_profile(text, "t.yaml")
    clock = VirtualClock()
    seen = [0]

    def progress(channel: str, p: object) -> None:
        seen[0] += 1
        if seen[0] == 5:
            raise RuntimeError("the display's bug")

    async def main() -> None:
        async with SimulatedBench() as bench:
            await bench.run(profile, text, clock, runs_dir=tmp_path / "runs", on_progress=progress)

    with pytest.raises(RuntimeError, match="the display's bug"):
        clock.run(main())
    (db,) = (tmp_path / "runs").glob("*.sqlite")
    said, _ = ends(db)
    assert said == ["failed: RuntimeError: the display's bug"]
