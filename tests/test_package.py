"""The package as a user installs it: one import root, nothing else at the top of site-packages."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_cellbench_and_nothing_else(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("cellbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cellbench"}
    # the data a run needs travels with the code
    assert "cellbench/profiles/library/formation-and-cycling.yaml" in names
    assert "cellbench/bench/examples/desk.yaml" in names
    assert "cellbench/py.typed" in names


def test_the_sdist_and_wheel_are_publishable(tmp_path: Path) -> None:
    """Built as a release is, they pass `twine check --strict`; the wheel says its license (with the file), its
    classifiers and version, and keeps the analysis stack in its extra."""
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".whl") for n in built) and any(n.endswith(".tar.gz") for n in built), built
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, tmp_path.iterdir())],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    (wheel,) = tmp_path.glob("cellbench-*.whl")
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist())
    assert "License-Expression: Apache-2.0" in metadata and "Classifier: Typing :: Typed" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    def named(line: str) -> str:
        return re.split(r"[<>=!~;\[ ]", line.removeprefix("Requires-Dist:").strip())[0].lower()

    core = {named(r) for r in requires if "extra ==" not in r}
    analysis = {named(r) for r in requires if 'extra == "analysis"' in r}
    assert {"pandas", "pyarrow", "matplotlib", "scipy", "impedance", "jinja2"} <= analysis
    assert not core & analysis and {"pyvisa", "pydantic", "aiomqtt", "pymodbus"} <= core


def find_python(version: str) -> str | None:
    """An interpreter of this version that runs: on PATH, or one of pyenv's (whose shims need its set-up)."""
    import shutil

    candidates = [shutil.which(f"python{version}"), *map(str, sorted(Path.home().glob(
        f".pyenv/versions/{version}*/bin/python{version}")))]
    for python in filter(None, candidates):
        done = subprocess.run([python, "-c", "import venv"], capture_output=True, timeout=30)
        if done.returncode == 0:
            return python
    return None


def fresh_venv(python: str, where: Path) -> Path:
    subprocess.run([python, "-m", "venv", str(where)], check=True, capture_output=True, timeout=120)
    return where / "bin"


def site_packages_mb(venv: Path) -> float:
    return sum(f.stat().st_size for f in venv.parent.rglob("*") if f.is_file()) / 1e6


@pytest.mark.parametrize("version", ["3.11", "3.13"])
def test_a_controller_installs_light_and_says_which_extra_the_desk_work_needs(tmp_path: Path, version: str) -> None:
    """A bench PC installs the wheel without the analysis extra: no pandas, pyarrow or matplotlib; it runs the
    demo and exports the CSV, and the commands that need the extra say which one in a line."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"no working python{version} on this machine")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("cellbench-*.whl")
    bin_ = fresh_venv(python, tmp_path / "venv")
    installed = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    size = site_packages_mb(bin_)
    print(f"controller install on Python {version}: {size:.1f} MB")  # the figure (aim: under 60 MB)
    listed = subprocess.run([str(bin_ / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, timeout=60).stdout.lower()
    assert not any(f"{heavy}==" in listed for heavy in ("pandas", "pyarrow", "matplotlib", "scipy", "impedance"))
    cellbench = str(bin_ / "cellbench")
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "CELLBENCH_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cellbench, *args], capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)

    version_said = run("--version")
    assert version_said.returncode == 0 and version_said.stdout.startswith("cellbench 0."), version_said.stderr
    demo = run("demo", "--runs-dir", "runs")
    assert demo.returncode == 0 and "per-cycle summary" in demo.stdout, demo.stdout[-2000:] + demo.stderr[-2000:]
    (db,) = (tmp_path / "runs").glob("*.sqlite")
    exported = run("export", str(db), "--out", "out")
    assert exported.returncode == 0 and list((tmp_path / "out").glob("*.bdf.csv")), exported.stderr
    assert not list((tmp_path / "out").glob("*.parquet"))
    assert "Parquet export needs the analysis extra" in " ".join(exported.stderr.split())
    report = run("report", str(db))
    said = " ".join(report.stderr.split())
    assert report.returncode == 1 and "the report needs the analysis extra" in said, said
    assert "pip install 'cellbench[analysis]'" in said and "Traceback" not in said
