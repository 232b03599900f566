"""The cellbench command line: one Typer app, its commands in the modules of this package by what they do."""

from cellbench.bench.faces.cli import profiles, results, running, tools, watching  # noqa: F401  (they add the commands)
from cellbench.bench.faces.cli.common import app

__all__ = ["app"]
