"""`python -m cellbench`: the command line, the same as the `cellbench` script."""

from cellbench.bench.faces.cli import app

app(prog_name="cellbench")
