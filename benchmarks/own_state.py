"""Imported first by every benchmark: its runs register, and its cells latch, in a state folder of its own (removed
at exit), never in the machine's (`~/.local/state/cellbench`), where `cellbench runs` would list thousands of
benchmark runs and a safety stop the reaction benchmark provokes would latch a cell for real runs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

FOLDER = tempfile.mkdtemp(prefix="cellbench-benchmark-state-")
os.environ["CELLBENCH_STATE_DIR"] = FOLDER  # the subprocesses a benchmark starts inherit it
atexit.register(shutil.rmtree, FOLDER, True)
