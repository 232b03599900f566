"""Simulated PalmSens potentiostat: MethodSCRIPT host commands and scripts, on a serial line.

Scripts are run as the instrument runs them: `e`, the script's lines, an empty line; the reply is
the echo, `M0000` when the measurement loop starts, one `P` package per point (paced in time, as
a real sweep takes time), `*` at the loop's end and an empty line when the script is done. `Z`
aborts a running loop. The impedance comes from the simulated cell at the temperature and
pressure of the moment (simulators.cell.SolidStateCell.impedance), with seeded noise.

Limits of the model: a chronopotentiometry reads the cell's instantaneous response to its current
and does not move its state of charge (the steps are short); the DC bias of an EIS is recorded,
not modelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
from collections.abc import AsyncIterator, Callable

from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.parameters import PRESETS
from cellbench.simulators.server import ServeOptions, serve_lines

PREFIX = {"a": 1e-18, "f": 1e-15, "p": 1e-12, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
ENCODE = [("G", 1e9), ("M", 1e6), ("k", 1e3), (" ", 1.0), ("m", 1e-3), ("u", 1e-6), ("n", 1e-9), ("p", 1e-12),
          ("f", 1e-15)]
LIMIT = 2**27 - 1
KNOWN = ("var", "set_pgstat_chan", "set_pgstat_mode", "set_autoranging", "set_range", "set_max_bandwidth",
         "set_e", "set_i", "cell_on", "cell_off", "wait", "pck_start", "pck_add", "pck_end", "endloop",
         "on_finished:", "meas_loop_eis", "meas_loop_geis", "meas_loop_ocp", "meas_loop_cp", "meas_loop_ca")


def parse_si(text: str) -> float:
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)([afpnumkMG]?)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * PREFIX.get(m.group(2), 1.0)


def encode(var_type: str, value: float) -> str:
    """One package value: type, 7 hex digits of (mantissa + 2^27), SI prefix; the finest prefix that fits."""
    if math.isnan(value):
        return f"{var_type}     nan"
    for prefix, scale in reversed(ENCODE):
        mantissa = round(value / scale)
        if abs(mantissa) <= LIMIT:
            return f"{var_type}{mantissa + 2**27:07X}{prefix}"
    raise ValueError(f"{value} is beyond what a package can carry")


class PalmSensSim:
    name = "palmsens"

    def __init__(self, cell: SolidStateCell, now: Callable[[], float], *, seed: int = 0, noise: float = 0.002,
                 serial: str = "ES4SIM0001") -> None:
        self.cell = cell
        self._now = now
        self._rng = random.Random(seed)
        self.noise = noise  # relative noise on |Z|
        self.serial = serial
        self.cell_on = False
        self._script: list[str] | None = None
        self._running = False
        self._abort = False

    def handle(self, line: str) -> str | AsyncIterator[str] | None:
        if self._script is not None:
            if line.strip() == "":
                script, self._script = self._script, None
                return self._run(script)
            self._script.append(line)
            return None
        cmd = line.strip()
        if cmd == "t":
            return "espbl21#\nR1.0.2 MethodSCRIPT sim*"  # two lines, the last ending in '*'
        if cmd == "i":
            return self.serial
        if cmd == "v":
            return "v0001"
        if cmd == "Z":
            if self._running:
                self._abort = True
                return None  # the running script answers with Z itself
            return "Z!0006"
        if cmd == "e":
            self._script = []
            return None
        return "!0001"  # unknown command

    async def _run(self, script: list[str]) -> AsyncIterator[str]:
        yield "e"
        try:
            loop_line, pck = self._compile(script)
        except ValueError as exc:
            yield f"!4003: {exc}"  # a script error, reported as the instrument does: a hex code
            yield ""
            return
        self._running, self._abort = True, False
        self.cell_on = True
        try:
            if loop_line is not None:
                yield "M0000"
                async for package in self._loop(loop_line, pck):
                    if self._abort:
                        yield "Z"
                        break
                    yield package
                yield "*"
        finally:
            self._running = False
            self.cell_on = False
        yield ""

    def _compile(self, script: list[str]) -> tuple[list[str] | None, list[str]]:
        loop_line, pck = None, []
        for raw in script:
            words = raw.split()
            if not words:
                continue
            if words[0] not in KNOWN:
                raise ValueError(f"unknown command {words[0]!r}")
            if words[0].startswith("meas_loop_"):
                loop_line = words
            elif words[0] == "pck_add":
                pck.append(words[1])
        return loop_line, pck

    async def _loop(self, words: list[str], pck: list[str]) -> AsyncIterator[str]:
        kind = words[0]
        if kind in ("meas_loop_eis", "meas_loop_geis"):
            f_var, r_var, j_var = words[1:4]
            f_start, f_end = parse_si(words[5]), parse_si(words[6])
            n = int(words[7])
            roles = {f_var: "dc", r_var: "cc", j_var: "cd"}
            for k in range(n):
                f = f_start * (f_end / f_start) ** (k / max(n - 1, 1))
                await asyncio.sleep(max(0.05, 2.0 / f))  # two periods a point, as a real sweep takes
                if self._abort:
                    return
                z = self.cell.impedance(f) * (1 + self._rng.gauss(0.0, self.noise))
                values = {"dc": f, "cc": z.real, "cd": z.imag}
                yield "P" + ";".join(encode(roles[v], values[roles[v]]) for v in pck if v in roles)
        elif kind in ("meas_loop_ocp", "meas_loop_cp"):
            e_var = words[1]
            current = parse_si(words[2]) if kind == "meas_loop_cp" else 0.0
            interval, duration = parse_si(words[-2]), parse_si(words[-1])
            for _ in range(max(1, int(duration / interval))):
                await asyncio.sleep(interval)
                if self._abort:
                    return
                e, r = self.cell.thevenin(interval)
                potential = e + current * r
                yield "P" + ";".join(encode("ab", potential) for v in pck if v == e_var)
        else:
            raise ValueError(f"{kind} is not simulated")


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated PalmSens potentiostat on a cell, for `cellbench sim serve palmsens` (best with --serial)."""
    cell = SolidStateCell(PRESETS[options.cell], soc=options.soc)
    sim = PalmSensSim(cell, asyncio.get_running_loop().time, seed=options.seed)
    async with serve_lines(sim, options) as resource:
        yield f"a simulated PalmSens potentiostat ({options.cell} cell) at {resource}"
