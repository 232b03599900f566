"""Ready profiles shipped with cellbench, read by name."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def library_path(name: str) -> Path:
    """The file of a library profile, by name with or without .yaml."""
    stem = name.removesuffix(".yaml")
    path = Path(str(files(__name__) / f"{stem}.yaml"))
    if not path.exists():
        raise FileNotFoundError(f"no library profile '{stem}' (have: {', '.join(library_names())})")
    return path


def library_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in files(__name__).iterdir() if p.name.endswith(".yaml"))
