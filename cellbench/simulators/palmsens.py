"""Simulated PalmSens potentiostat: MethodSCRIPT host commands and scripts, on a serial line.

Scripts are run as the instrument runs them: `e`, the script's lines, an empty line; the reply is
the echo, `M` and four hex digits when a measurement loop starts, one `P` package per point (paced in
time, as a real sweep takes time), `*` at the loop's end and an empty line when the script is done;
`on_finished:` runs after the script's end, an error or an abort, and the cell is left off. Variables
(`var`, `store_var`, `add_var`, ...) and `set_e` with a variable work as in PalmSens' own example scripts.
An open-circuit measurement with the cell on is refused (`!0014`), as the instrument refuses it. `Z`
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
from cellbench.simulators.rehearsal import Rehearsal, Rehearsed
from cellbench.simulators.server import ServeOptions, SimServer, cell_of, serve_lines

PREFIX = {"a": 1e-18, "f": 1e-15, "p": 1e-12, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
ENCODE = [("G", 1e9), ("M", 1e6), ("k", 1e3), (" ", 1.0), ("m", 1e-3), ("u", 1e-6), ("n", 1e-9), ("p", 1e-12),
          ("f", 1e-15)]
LIMIT = 2**27 - 1
# commands that set up the instrument and change nothing the simulation models
SETUP = {"set_pgstat_chan", "set_autoranging", "set_range", "set_range_minmax", "set_max_bandwidth",
         "set_acquisition_frac_autoadjust", "set_acquisition_frac", "set_gpio_cfg", "set_gpio", "set_cr",
         "set_poly_we_mode", "send_string", "pck_start", "pck_end", "pck_add", "set_script_output", "hibernate"}
MEASURE = ("meas_loop_eis", "meas_loop_geis", "meas_loop_ocp", "meas_loop_cp", "meas_loop_ca")
KNOWN = SETUP | set(MEASURE) | {"var", "store_var", "copy_var", "add_var", "sub_var", "mul_var", "div_var", "set_e",
                                "set_i", "cell_on", "cell_off", "wait", "endloop", "on_finished:", "timer_start",
                                "timer_get", "set_pgstat_mode"}
# the loop marker `M` and four hex digits: the technique, as the MethodSCRIPT manual numbers them (EIS 000D,
# OCP 000B); the others' numbers are not confirmed from the manual and kept apart from those
LOOP_ID = {"meas_loop_eis": 0x000D, "meas_loop_ocp": 0x000B, "meas_loop_geis": 0x0001, "meas_loop_cp": 0x0003,
           "meas_loop_ca": 0x0004}
GALVANOSTATIC = ("meas_loop_cp", "meas_loop_geis")
GALVANOSTAT_MODE = 6  # set_pgstat_mode 6, as PalmSens' CP and GEIS examples set it
INT32 = 2**31 - 1  # a literal's mantissa must fit a signed 32-bit integer
ERR_UNKNOWN = "4001"  # a command the script language does not know (the manual's 4001 family)
ERR_CELL_ON = "0014"  # an open-circuit measurement asked with the cell on (PalmSens' error table)
ERR_SCRIPT = "4004"  # a command the simulator cannot parse (wrong arguments)
# Package metadata (PalmSens' own parsers: `,1X` status bits, `,2XX` range): the EmStat4's current ranges are
# decades from 100 pA (code 0) to 100 mA (code 27), three codes apart; status 2 is an overload
ES4_CURRENT_RANGES = [(3 * k, 100e-12 * 10**k) for k in range(10)]
STATUS_OK, STATUS_OVERLOAD = 0x0, 0x2


def range_code(amps: float) -> tuple[int, float]:
    """The EmStat4 current range that holds `amps` (the smallest decade at or above it, at most 100 mA)."""
    for code, full_scale in ES4_CURRENT_RANGES:
        if abs(amps) <= full_scale * (1 + 1e-9):
            return code, full_scale
    return ES4_CURRENT_RANGES[-1]


class ScriptError(Exception):
    def __init__(self, code: str, line: int, why: str) -> None:
        super().__init__(why)
        self.code, self.line = code, line


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
        self.e_set = 0.0  # the potential set_e last applied (V)
        self.e_at_cell_on: float | None = None  # the potential applied when the cell last went on
        self.i_set = 0.0
        self._vars: dict[str, float] = {}
        self._script: list[str] | None = None
        self._running = False
        self._abort = False
        self.mode = 3  # set_pgstat_mode
        self._timer: float | None = None  # timer_start's moment
        self.current_range = 10e-3  # set_range ba/db: the range in use when autoranging is off (A)
        self.autorange: tuple[float, float] | None = None  # set_autoranging ba: the lowest and highest range

    def handle(self, line: str) -> str | AsyncIterator[str] | None:
        if self._script is not None:
            if line.strip() == "":
                script, self._script = self._script, None
                return self._run(script)
            self._script.append(line)
            return None
        cmd = line.strip()
        if cmd == "t":  # the echo, then the firmware: two lines, the last ending in '*'
            return "tES4SIM v1.3 (cellbench MethodSCRIPT simulator)\nR*"
        if cmd == "i":
            return f"i{self.serial}"
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
        """Run a script as the firmware does: line by line, measurement loops with their package bodies,
        `on_finished:` always at the end (after an error or an abort too)."""
        yield "e"
        lines = [(n, raw.split("#", 1)[0].split()) for n, raw in enumerate(script, start=2)]
        lines = [(n, words) for n, words in lines if words]
        try:  # the firmware reads the whole script first: one error and no line of it runs
            self._check(lines)
        except ScriptError as exc:
            yield f"!{exc.code}: line {exc.line}: {exc}"
            yield ""
            return
        split = next((k for k, (_, w) in enumerate(lines) if w[0] == "on_finished:"), len(lines))
        body, finish = lines[:split], lines[split + 1:]
        self._running, self._abort = True, False
        self._vars, self._timer = {}, None
        try:
            async for out in self._execute(body):
                yield out
        except ScriptError as exc:
            yield f"!{exc.code}: line {exc.line}: {exc}"
        except BaseException:  # the connection went (the generator closed) or the server stopped
            self._running = self.cell_on = False
            raise
        self._running = False
        if self._abort:
            yield "Z"  # aborted: said once, wherever the script stood
        try:
            async for out in self._execute(finish):
                yield out
        except ScriptError as exc:
            yield f"!{exc.code}: line {exc.line}: {exc}"
        self.cell_on = False  # whatever the script said, the cell is left off at its end
        yield ""

    def _check(self, lines: list[tuple[int, list[str]]]) -> None:
        """What the firmware refuses before running anything: an unknown command, a literal out of range."""
        for n, words in lines:
            if words[0] not in KNOWN:
                raise ScriptError(ERR_UNKNOWN, n, f"unknown command {words[0]!r}")
            for word in words[1:]:
                m = re.fullmatch(r"([-+]?\d+)[afpnumkMGi]?", word)
                if m and abs(int(m.group(1))) > INT32:
                    raise ScriptError(ERR_SCRIPT, n, f"the literal {word} is beyond a 32-bit integer")

    def _value(self, word: str, line: int) -> float:
        if word in self._vars:
            return self._vars[word]
        try:
            return float(word[:-1]) if word.endswith("i") and word[:-1].lstrip("-").isdigit() else parse_si(word)
        except ValueError:
            raise ScriptError(ERR_SCRIPT, line, f"{word!r} is neither a variable nor a number") from None

    async def _execute(self, lines: list[tuple[int, list[str]]]) -> AsyncIterator[str]:
        k = 0
        while k < len(lines):
            n, words = lines[k]
            cmd, args = words[0], words[1:]
            k += 1
            if self._abort:
                return
            if cmd in MEASURE:
                depth, end = 1, k
                while end < len(lines) and depth:
                    depth += lines[end][1][0].startswith(("meas_loop_", "loop"))
                    depth -= lines[end][1][0] == "endloop"
                    end += 1
                if depth:
                    raise ScriptError(ERR_SCRIPT, n, f"{cmd} without its endloop")
                pck = [w[1] for _, w in lines[k:end - 1] if w[0] == "pck_add" and len(w) > 1]
                timed = [w[1] for _, w in lines[k:end - 1] if w[0] == "timer_get" and len(w) > 1]
                k = end
                if cmd in GALVANOSTATIC and self.mode != GALVANOSTAT_MODE:
                    raise ScriptError(ERR_SCRIPT, n, f"{cmd} runs in the galvanostat mode (set_pgstat_mode "
                                                     f"{GALVANOSTAT_MODE}), not mode {self.mode}")
                yield f"M{LOOP_ID[cmd]:04X}"
                async for package in self._loop(n, cmd, args, pck, timed):
                    if self._abort:
                        return
                    yield package
                yield "*"
            elif cmd == "var":
                for name in args:
                    self._vars.setdefault(name, 0.0)
            elif cmd in ("store_var", "copy_var"):
                if len(args) < 2:
                    raise ScriptError(ERR_SCRIPT, n, f"{cmd} needs a variable and a value")
                if cmd == "store_var":
                    self._vars[args[0]] = self._value(args[1], n)
                else:
                    self._vars[args[1]] = self._value(args[0], n)
            elif cmd in ("add_var", "sub_var", "mul_var", "div_var"):
                if len(args) < 2 or args[0] not in self._vars:
                    raise ScriptError(ERR_SCRIPT, n, f"{cmd} needs a declared variable and a value")
                a, b = self._vars[args[0]], self._value(args[1], n)
                if cmd == "div_var" and b == 0:
                    raise ScriptError(ERR_SCRIPT, n, "division by zero")
                self._vars[args[0]] = {"add_var": a + b, "sub_var": a - b, "mul_var": a * b}.get(cmd, a / (b or 1))
            elif cmd == "set_e":
                self.e_set = self._value(args[0], n) if args else 0.0
            elif cmd == "set_i":
                self.i_set = self._value(args[0], n) if args else 0.0
            elif cmd == "cell_on":
                self.cell_on = True
                self.e_at_cell_on = self.e_set
            elif cmd == "cell_off":
                self.cell_on = False
            elif cmd == "wait":
                await asyncio.sleep(self._value(args[0], n) if args else 0.0)
            elif cmd == "set_pgstat_mode":
                self.mode = int(self._value(args[0], n)) if args else self.mode
            elif cmd == "timer_start":
                self._timer = self._now()
            elif cmd == "timer_get":
                if args:
                    self._vars[args[0]] = self._elapsed()
            elif cmd == "set_range" and len(args) == 2 and args[0] in ("ba", "db"):
                self.current_range = range_code(self._value(args[1], n))[1]
                self.autorange = None
            elif cmd == "set_autoranging" and len(args) == 3 and args[0] in ("ba", "db"):
                low, high = (range_code(self._value(a, n))[1] for a in args[1:])
                self.autorange = None if low == high else (low, high)
            elif cmd in SETUP or cmd == "endloop":
                continue
            else:
                raise ScriptError(ERR_UNKNOWN, n, f"unknown command {cmd!r}")

    def _current_metadata(self, amps: float) -> str:
        """A current's metadata as the instrument appends it: `,1` and the status digit, `,2` and the range's two
        hex digits; an overload when the current is beyond a fixed range (autoranging moves up within its
        limits first)."""
        full_scale = self.current_range
        if self.autorange is not None:
            low, high = self.autorange
            full_scale = min(max(range_code(amps)[1], low), high)
        code = range_code(full_scale)[0]
        status = STATUS_OVERLOAD if abs(amps) > full_scale * (1 + 1e-9) else STATUS_OK
        return f",1{status:X},2{code:02X}"

    def _elapsed(self) -> float:
        return 0.0 if self._timer is None else self._now() - self._timer

    def _loop(self, n: int, kind: str, args: list[str], pck: list[str], timed: list[str]) -> AsyncIterator[str]:
        if kind in ("meas_loop_eis", "meas_loop_geis"):
            if len(args) < 7:
                raise ScriptError(ERR_SCRIPT, n, f"{kind} needs f, Z', Z'', amplitude, f_start, f_end, n and a bias")
            return self._eis(n, args, pck)
        if kind == "meas_loop_ocp":
            if self.cell_on:
                raise ScriptError(ERR_CELL_ON, n, "an open-circuit measurement with the cell on")
            if len(args) < 3:
                raise ScriptError(ERR_SCRIPT, n, "meas_loop_ocp needs a variable, an interval and a run time")
            return self._series(n, args[0], None, 0.0, args[-2], args[-1], pck, timed)
        if kind == "meas_loop_cp":
            # the manual's form: potential and current variables, the current, the interval, the run time
            # (the one-variable form of older scripts is taken too)
            if len(args) == 5:
                return self._series(n, args[0], args[1], self._value(args[2], n), args[3], args[4], pck, timed)
            if len(args) == 4:
                return self._series(n, args[0], None, self._value(args[1], n), args[2], args[3], pck, timed)
            raise ScriptError(ERR_SCRIPT, n, "meas_loop_cp needs E, I, the current, an interval and a run time")
        raise ScriptError(ERR_SCRIPT, n, f"{kind} is not simulated")

    async def _eis(self, n: int, args: list[str], pck: list[str]) -> AsyncIterator[str]:
        f_var, r_var, j_var = args[:3]
        amplitude, f_start, f_end = (self._value(a, n) for a in args[3:6])
        points = int(self._value(args[6], n))
        if f_start <= 0 or f_end <= 0 or not 1 <= points <= 10_000:
            raise ScriptError(ERR_SCRIPT, n, "frequencies must be positive and the points between 1 and 10000")
        roles = {f_var: "dc", r_var: "cc", j_var: "cd"}
        for k in range(points):
            f = f_start * (f_end / f_start) ** (k / max(points - 1, 1))
            await asyncio.sleep(max(0.05, 2.0 / f))  # two periods a point, as a real sweep takes
            if self._abort:
                return
            z = self.cell.impedance(f) * (1 + self._rng.gauss(0.0, self.noise))
            values = {"dc": f, "cc": z.real, "cd": z.imag}
            # the impedance's parts carry the metadata of the current they were measured in (the manual's
            # example package: `cc…m,10,287`): the AC current of a potentiostatic sweep, the applied one of a GEIS
            ac = amplitude if self.mode == GALVANOSTAT_MODE else amplitude / max(abs(z), 1e-12)
            meta = {"dc": "", "cc": self._current_metadata(ac), "cd": self._current_metadata(ac)}
            yield "P" + ";".join(encode(roles[v], values[roles[v]]) + meta[roles[v]] for v in pck if v in roles)

    async def _series(self, n: int, e_var: str, i_var: str | None, current: float, interval_word: str,
                      run_word: str, pck: list[str], timed: list[str]) -> AsyncIterator[str]:
        interval, duration = self._value(interval_word, n), self._value(run_word, n)
        if interval <= 0 or duration < 0 or duration / interval > 1_000_000:
            raise ScriptError(ERR_SCRIPT, n, "the interval must be positive and the points at most a million")
        for _ in range(max(1, int(duration / interval + 1e-9))):  # 300 ms at 100 ms: 3 points, not 2.999...
            await asyncio.sleep(interval)
            if self._abort:
                return
            e, r = self.cell.thevenin(interval)
            potential = e + current * r
            self._vars[e_var] = potential
            values = {e_var: encode("ab", potential)}
            if i_var is not None:
                self._vars[i_var] = current
                values[i_var] = encode("ba", current) + self._current_metadata(current)
            for name in timed:  # timer_get in the loop body: the time since timer_start, in seconds
                self._vars[name] = self._elapsed()
                values[name] = encode("eb", self._vars[name])
            yield "P" + ";".join(values[v] for v in pck if v in values)


@contextlib.asynccontextmanager
async def serve(options: ServeOptions) -> AsyncIterator[str]:
    """A simulated PalmSens potentiostat on a cell, for `cellbench sim serve palmsens` (best with --serial)."""
    cell = cell_of(options)
    sim = PalmSensSim(cell, asyncio.get_running_loop().time, seed=options.seed)
    async with serve_lines(sim, options) as resource:
        yield f"a simulated PalmSens potentiostat ({options.cell} cell) at {resource}"


async def rehearse(r: Rehearsal) -> Rehearsed:
    """A potentiostat on the first cell it is given (one shared by channels measures the first one's)."""
    pstat = PalmSensSim(r.cells[0], r.time, seed=r.seed, noise=0.002)
    server = await SimServer(pstat).start()
    r.stack.push_async_callback(server.close)
    return Rehearsed(server.resource)
