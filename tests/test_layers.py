"""The arrows between layers run one way, and the folders are the layers: import-linter holds the contracts in
pyproject.toml (faces over bench over drivers, simulators and the language, roles at the bottom; inside bench/,
faces over results and the runner, over ops, over the run-time; the runner reaches drivers only through the
registry). Each contract is shown to fail on a copy of the package with one wrong import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(where: Path, package: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts, on the package found first on the path."""
    return subprocess.run([LINT, "--no-cache"], cwd=where, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package), "COLUMNS": "200"})


def test_the_import_contracts_hold() -> None:
    done = lint(ROOT, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "4 kept" in done.stdout


@pytest.mark.parametrize(("module", "wrong", "contract"), [
    ("bench/runner/run.py", "from cellbench.drivers import smu", "reach a driver only through the registry"),
    ("bench/runtime/engine.py", "from cellbench.bench.ops import runs", "bench/ in rooms"),
    ("bench/runtime/policy.py", "from cellbench.drivers import registry", "the run-time and the results know roles"),
    ("drivers/smu.py", "from cellbench.bench.runtime import engine", "the package"),
    ("roles.py", "from cellbench.profiles import schema", "the package"),
])
def test_each_contract_catches_a_wrong_import(tmp_path: Path, module: str, wrong: str, contract: str) -> None:
    shutil.copytree(ROOT / "cellbench", tmp_path / "cellbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "cellbench" / module
    target.write_text(target.read_text() + f"\n{wrong}  # noqa\n")
    done = lint(tmp_path, tmp_path)
    assert done.returncode != 0 and "1 broken" in done.stdout, done.stdout[-3000:]
    broken = [line for line in done.stdout.splitlines() if " BROKEN" in line]
    assert len(broken) == 1 and contract in broken[0], broken


def test_the_real_run_path_imports_no_simulator() -> None:
    """Everything a real run loads (the CLI, the run, the drivers) reaches no simulator, even indirectly."""
    code = (
        "import sys, cellbench.bench.faces.cli, cellbench.bench.runner.run, cellbench.drivers.registry as r; "
        "r.drivers(); print(sorted(m for m in sys.modules if m.startswith('cellbench.simulators')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
