"""Operating the bench day to day, through the CLI as a technician does: two runs started in the background,
seen from another terminal with `status` and `runs`, each with its log file, and a notify hook at the end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_cli import serve
from tests.test_unattended import ask, run_env

PROFILE = """
name: long charge
sample_period: 0.5 s
steps:
  - charge: {current: 0.1 mA, until: [4.2 V, 2 h]}
"""


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellbench", *args], capture_output=True, text=True,
                          env=run_env(tmp_path), timeout=60)


def bench_file(tmp_path: Path, name: str, resource: str, cell_id: str, notify: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        operator: ana
        notify: ["{sys.executable}", "-c", "import sys; open(r'{notify}', 'w').write(sys.stdin.read())"]
        instruments:
          smu1: {{driver: keithley2450, resource: "{resource}", timeout: 2 s}}
        cells:
          c: {{id: {cell_id}, capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
        channels:
          ch1: {{cycler: smu1, cell: c}}
    """))
    return path


def wait_for(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_status_and_runs_see_two_background_runs_from_another_terminal(tmp_path: Path) -> None:
    profile = tmp_path / "charge.yaml"
    profile.write_text(PROFILE)
    servers = [serve("keithley2450", "--port", "0", "--soc", "0.3") for _ in range(2)]
    procs = []
    try:
        for k, (_, resource) in enumerate(servers):
            bench = bench_file(tmp_path, f"bench{k}", resource, f"P-00{k}", tmp_path / f"notified{k}.json")
            procs.append(subprocess.Popen(  # in the background, output to a file: no terminal
                [sys.executable, "-m", "cellbench", "run", str(profile), "--bench", str(bench),
                 "--runs-dir", str(tmp_path / "runs")],
                stdout=(tmp_path / f"out{k}.txt").open("w"), stderr=subprocess.STDOUT, env=run_env(tmp_path)))
        for _, resource in servers:
            wait_for(lambda r=resource: ask(r, ":OUTP?") == "1")

        def both_sampled() -> bool:
            live = json.loads(cli(tmp_path, "status", "--json").stdout)
            return len(live) == 2 and all(r["voltage"] is not None for r in live)

        wait_for(both_sampled)
        live = {r["cell_id"]: r for r in json.loads(cli(tmp_path, "status", "--json").stdout)}
        assert set(live) == {"P-000", "P-001"}
        for r in live.values():
            assert r["state"] == "running" and r["step_count"] == 1 and r["total_steps"] == 1
            assert r["step_type"] == "CC Charge" and r["current"] == pytest.approx(1e-4, rel=1e-3)
            assert 3.0 < r["voltage"] < 4.2 and r["test_time"] > 0
        table = cli(tmp_path, "status")
        assert table.returncode == 0 and "P-000" in table.stdout and "P-001" in table.stdout
        assert "1/1 CC Charge" in table.stdout and "+0.1000" in table.stdout

        procs[0].terminate()  # one run stops (SIGTERM); the other goes on
        procs[0].wait(timeout=30)
        listed = {r["cell_id"]: r for r in json.loads(cli(tmp_path, "runs", "--json").stdout)}
        assert listed["P-000"]["state"] == "interrupted" and "SIGTERM" in listed["P-000"]["reason"]
        assert listed["P-001"]["state"] == "running"
        running = json.loads(cli(tmp_path, "runs", "--state", "running", "--json").stdout)
        assert [r["cell_id"] for r in running] == ["P-001"]
        assert [r["cell_id"] for r in json.loads(cli(tmp_path, "runs", "--cell", "P-000", "--json").stdout)] == [
            "P-000"]
        assert json.loads(cli(tmp_path, "runs", "--since", "2999-01-01", "--json").stdout) == []
        assert cli(tmp_path, "runs", "--since", "yesterday").returncode == 2

        notified = json.loads((tmp_path / "notified0.json").read_text())  # the bench's notify hook, on stdin
        assert (notified["state"], notified["cell_id"], notified["operator"]) == ("interrupted", "P-000", "ana")
        assert notified["reason"].startswith("interrupted: SIGTERM")

        procs[1].kill()  # a hard death: the registry still says running, the process is gone
        procs[1].wait(timeout=30)
        listed = {r["cell_id"]: r for r in json.loads(cli(tmp_path, "runs", "--json").stdout)}
        assert listed["P-001"]["state"] == "interrupted" and "is gone" in listed["P-001"]["reason"]
        assert json.loads(cli(tmp_path, "status", "--json").stdout) == []
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=10)

    out = (tmp_path / "out0.txt").read_text()
    (db,) = (tmp_path / "runs").glob("*Z-P-000.sqlite")
    assert str(db) in out.replace("\n", "")  # the database path is said at the start
    log = db.with_suffix(".log").read_text()  # the run's log beside its database, UTC and run ID on each line
    lines = log.splitlines()
    assert all(line[:4].isdigit() and f"[{db.stem}]" in line for line in lines)
    assert lines[0][19:24].endswith("Z") or "Z " in lines[0][:30]
    assert "step 1 started: CC Charge" in log and "interrupted: SIGTERM" in log
