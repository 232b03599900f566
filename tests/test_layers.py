"""The arrows between layers run one way: language <- run-time -> roles <- drivers; faces (the CLI, the Python
API, the pytest plugin, ...) on top.

Read from the source with the ast module, so a wrong import fails here before it ships.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cellbench"

# the faces: they may import every layer (simulators only where they make a simulated bench)
FACES = {"cli", "display", "run", "simbench", "instruments", "config", "analysis", "export", "report", "api",
         "guardian", "locks", "runs", "latches", "control"}
MAY_IMPORT_SIMULATORS = {"cellbench.bench.simbench", "cellbench.bench.cli", "cellbench.bench.api"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "cellbench" or module.startswith("cellbench.testing"):  # the pytest plugin is a face too
        return "face"
    if module.startswith("cellbench.profiles"):
        return "language"
    if module.startswith("cellbench.drivers"):
        return "drivers"
    if module.startswith("cellbench.simulators"):
        return "simulators"
    if module == "cellbench.bench.roles":
        return "roles"
    if module.split(".")[2:3] and module.split(".")[2] in FACES:
        return "face"
    return "runtime"  # every other module of cellbench.bench; a new one is held to the strict rule


ALLOWED = {
    "language": {"language"},
    "roles": {"roles"},
    "drivers": {"drivers", "roles"},
    "simulators": {"simulators"},
    "runtime": {"runtime", "roles", "language"},
    "face": {"face", "runtime", "roles", "language", "drivers", "simulators"},
}


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.startswith("cellbench")]


def known_module(name: str) -> str | None:
    """The module an imported name refers to (`from x import y` may name an attribute of x)."""
    while name:
        file = PACKAGE.parent.joinpath(*name.split("."))
        if file.with_suffix(".py").exists() or (file / "__init__.py").exists():
            return name
        name = name.rpartition(".")[0]
    return None


def test_no_import_points_up_or_sideways() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for line, name in imports(path):
            target = known_module(name)
            if target is None or target == me:
                continue
            if layer(target) not in ALLOWED[layer(me)]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer(me)} imports {layer(target)} {target}")
            elif layer(target) == "simulators" and layer(me) == "face" and me not in MAY_IMPORT_SIMULATORS:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports a simulator")
    assert not wrong, "\n".join(wrong)


def test_the_real_run_path_imports_no_simulator() -> None:
    """Everything a real run loads (the CLI, the run, the drivers) reaches no simulator, even indirectly."""
    code = (
        "import sys, cellbench.bench.cli, cellbench.bench.run, cellbench.drivers.registry as r; r.drivers(); "
        "print(sorted(m for m in sys.modules if m.startswith('cellbench.simulators')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The rule itself: a driver importing the engine would be flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("from cellbench.bench.engine import Engine\n")
    (_, name), *_ = imports(bad)
    assert layer("cellbench.drivers.smu") == "drivers" and layer(known_module(name) or "") == "runtime"
    assert "runtime" not in ALLOWED["drivers"]
