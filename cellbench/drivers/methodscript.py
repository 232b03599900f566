"""PalmSens MethodSCRIPT: the data-package format, the scripts for our techniques, and the driver.

A data package is a `P` line of `;`-separated values. Each value is a 2-character variable type,
7 hex digits and an SI-prefix character, optionally followed by `,`-separated metadata (status
bits `1X`, current range `2XX`, noise `4...`). value = (int(hex, 16) - 2**27) × prefix.
Written from the published format; the vendor's own parser is licensed for their hardware only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cellbench.drivers.errors import InstrumentError, ProtocolError
from cellbench.drivers.registry import DriverSpec, Opened, OpenRequest, SerialSettings
from cellbench.drivers.transport import LineTransport, open_line_driver
from cellbench.roles import ImpedancePoint

PREFIXES = {
    "a": 1e-18, "f": 1e-15, "p": 1e-12, "n": 1e-9, "u": 1e-6, "m": 1e-3, " ": 1.0, "i": 1.0,
    "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}
STATUS_BITS = {1: "timing error", 2: "overload", 4: "underload", 8: "overload warning"}
OFFSET = 2**27
_VALUE = re.compile(r"^([a-z]{2})([0-9A-Fa-f]{7})([afpnum kMGTPEi])$")
_NAN = re.compile(r"^([a-z]{2})\s+nan$")
_ERROR = re.compile(r"!([0-9A-Fa-f]{4})")


@dataclass(frozen=True)
class Value:
    var_type: str
    value: float
    status: int = 0
    current_range: int | None = None
    metadata: tuple[str, ...] = field(default_factory=tuple)

    @property
    def flags(self) -> list[str]:
        return [name for bit, name in STATUS_BITS.items() if self.status & bit]


class MethodScriptError(ProtocolError):
    """A line that is not MethodSCRIPT output."""


def decode_value(token: str) -> Value:
    """One value of a data package, e.g. 'cc896D904m,10,287'."""
    head, *meta = token.split(",")
    if m := _NAN.match(head):
        var_type, number = m.group(1), math.nan
    elif m := _VALUE.match(head):
        var_type = m.group(1)
        number = (int(m.group(2), 16) - OFFSET) * PREFIXES[m.group(3)]
    else:
        raise ValueError(f"{token!r} is not a MethodSCRIPT value (type, 7 hex digits, SI prefix)")
    status, current_range = 0, None
    for item in meta:
        if not item:
            continue
        if item[0] == "1":
            status = int(item[1:] or "0", 16)
        elif item[0] == "2":
            current_range = int(item[1:] or "0", 16)
    return Value(var_type, number, status, current_range, tuple(meta))


def parse_package(line: str) -> list[Value]:
    """A whole `P` line: the values in the order the script added them."""
    if not line.startswith("P"):
        raise ValueError(f"{line!r} is not a data package (it must start with P)")
    body = line[1:].rstrip("\r\n")
    if not body:
        raise ValueError("an empty data package")
    return [decode_value(t) for t in body.split(";")]


def check_error(line: str) -> str | None:
    """The hex error code of a line holding `!XXXX`, or None."""
    m = _ERROR.search(line)
    return m.group(1).upper() if m else None


INT32 = 2**31 - 1  # a literal's integer mantissa must fit a signed 32-bit integer


def si(value: float) -> str:
    """A number as MethodSCRIPT writes it: an integer mantissa that fits 32 bits and an SI prefix (15m, 200k, 0).
    The largest prefix that writes it exactly, else the finest whose mantissa still fits (3.8073535 V is
    3807354u, not 3807353500n, which the firmware refuses)."""
    if value == 0:
        return "0"
    scales = (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("m", 1e-3), ("u", 1e-6), ("n", 1e-9), ("p", 1e-12))
    for prefix, scale in scales:
        mantissa = value / scale
        if (abs(mantissa) >= 1 and abs(round(mantissa)) <= INT32
                and abs(mantissa - round(mantissa)) < 1e-9 * max(1.0, abs(mantissa))):
            return f"{round(mantissa)}{prefix}"
    for prefix, scale in reversed(scales):
        if abs(round(value / scale)) <= INT32:
            return f"{round(value / scale)}{prefix}"
    raise ValueError(f"{value} cannot be written as a MethodSCRIPT literal")


def _ranges(current_range: float) -> list[str]:
    """The current range for the cell: start in it, autorange three decades below it, never above."""
    return [f"set_range ba {si(current_range)}", f"set_autoranging ba {si(current_range / 1000)} {si(current_range)}"]


# PalmSens' galvanostatic examples (MSLoopExample009-CP, MSLoopExample013-GEIS): the galvanostat mode, the applied
# current's range (`db`) fixed, the measured potential's (`ab`) autoranged
GALVANOSTAT_MODE = 6
POTENTIAL_RANGE = 4.0  # V: the `ab` range a battery's potential fits in (PalmSens' OCP example uses it)


def _galvanostatic(current_range: float) -> list[str]:
    return [f"set_pgstat_mode {GALVANOSTAT_MODE}", f"set_range ab {si(POTENTIAL_RANGE)}",
            f"set_autoranging ab 100m {si(POTENTIAL_RANGE)}", f"set_range db {si(current_range)}",
            f"set_autoranging db {si(current_range)} {si(current_range)}"]


def eis_script(*, f_start: float, f_end: float, n_points: int, amplitude: float, e_dc: float = 0.0,
               galvanostatic: bool = False, i_dc: float = 0.0, current_range: float = 10e-3) -> list[str]:
    """Potentiostatic EIS around e_dc (V; a battery's open-circuit voltage, measured first with the cell off),
    or galvanostatic around i_dc (A). The DC level is set before the cell goes on, so a 3.8 V cell is never
    pulled toward 0 V when the potentiostat connects."""
    loop = (f"meas_loop_geis f r j {si(amplitude)} {si(f_start)} {si(f_end)} {n_points} {si(i_dc)}"
            if galvanostatic else
            f"meas_loop_eis f r j {si(amplitude)} {si(f_start)} {si(f_end)} {n_points} {si(e_dc)}")
    level = f"set_i {si(i_dc)}" if galvanostatic else f"set_e {si(e_dc)}"
    mode = _galvanostatic(current_range) if galvanostatic else ["set_pgstat_mode 3", *_ranges(current_range)]
    return [
        "var f", "var r", "var j", "set_pgstat_chan 0", *mode,
        level, "cell_on", loop,
        "  pck_start", "  pck_add f", "  pck_add r", "  pck_add j", "  pck_end", "endloop",
        "on_finished:", "cell_off",
    ]


def ocp_script(*, interval: float, duration: float) -> list[str]:
    """Open-circuit potential: measured with the cell off (the instrument refuses it with the cell on)."""
    return ["var e", "set_pgstat_chan 0", "set_pgstat_mode 3", "cell_off",
            f"meas_loop_ocp e {si(interval)} {si(duration)}", "  pck_start", "  pck_add e", "  pck_end",
            "endloop", "on_finished:", "cell_off"]


def cp_script(*, current: float, interval: float, duration: float, current_range: float = 10e-3) -> list[str]:
    """Chronopotentiometry in the manual's form: potential and current variables, the current, the interval
    and the run time, in the galvanostat mode; the current is set before the cell goes on."""
    return ["var e", "var i", "set_pgstat_chan 0", *_galvanostatic(current_range),
            f"set_i {si(current)}", "cell_on",
            f"meas_loop_cp e i {si(current)} {si(interval)} {si(duration)}", "  pck_start", "  pck_add e",
            "  pck_add i", "  pck_end", "endloop", "on_finished:", "cell_off"]


_OUTPUT = re.compile(r"^(e|P.*|M[0-9A-Fa-f]{4}|\*|L|\+|C[0-9A-Fa-f]{4}|-|Z|)$")


def _is_output(line: str) -> bool:
    """Whether a line is something a running MethodSCRIPT prints."""
    return bool(_OUTPUT.match(line))


class PalmSens:
    """A PalmSens potentiostat (EmStat, Sensit) speaking MethodSCRIPT over a serial line."""

    model = "PalmSens MethodSCRIPT"

    def __init__(self, transport: LineTransport, *, script_timeout: float = 3600.0) -> None:
        self._io = transport
        self.script_timeout = script_timeout

    @property
    def name(self) -> str:
        return self._io.name

    async def identify(self) -> str:
        """Firmware version (`t`, two lines, the last ending in '*') and serial number (`i`)."""
        lines = await self._io.query_lines("t", lambda line: line.endswith("*") or check_error(line) is not None)
        self._raise_if_error("t", lines)
        if lines and lines[0].startswith("t"):
            lines[0] = lines[0][1:]  # the command's echo
        serial = (await self._io.query("i")).strip()
        serial = serial[1:] if serial.startswith("i") else serial
        return " ".join(x.rstrip("*").strip() for x in lines if x.rstrip("*").strip()) + f", serial {serial}"

    async def abort(self) -> None:
        """Stop a running script (`Z`)."""
        await self._io.interrupt("Z")

    async def run(self, script: Sequence[str], *, timeout: float | None = None) -> list[list[Value]]:
        """Send a script, wait for it to finish, and return its data packages."""
        text = "\n".join(["e", *script, ""])
        lines = await self._io.query_lines(
            text, lambda line: line == "" or check_error(line) is not None or not _is_output(line),
            timeout or self.script_timeout,
        )
        self._raise_if_error("script", lines)
        if lines[0] != "e":
            raise MethodScriptError(self.name, "e", lines[0], "the echo 'e' of a script")
        packages: list[list[Value]] = []
        for line in lines[1:]:
            if not _is_output(line):
                raise MethodScriptError(self.name, "script", line, "MethodSCRIPT output")
            if line.startswith("P"):
                try:
                    packages.append(parse_package(line))
                except ValueError as exc:
                    raise MethodScriptError(self.name, "script", line, f"a data package ({exc})") from None
        return packages

    async def impedance(self, *, f_start: float, f_end: float, n_points: int, amplitude: float,
                        e_dc: float = 0.0, current_range: float = 10e-3) -> list[ImpedancePoint]:
        """Potentiostatic EIS: a voltage amplitude around e_dc (V), in a current range for the cell (A)."""
        return self._points(await self.run(eis_script(f_start=f_start, f_end=f_end, n_points=n_points,
                                                      amplitude=amplitude, e_dc=e_dc, current_range=current_range)))

    async def galvanostatic_impedance(self, *, f_start: float, f_end: float, n_points: int, amplitude: float,
                                      i_dc: float = 0.0, current_range: float = 10e-3) -> list[ImpedancePoint]:
        """Galvanostatic EIS: a current amplitude (A) around i_dc."""
        return self._points(await self.run(eis_script(f_start=f_start, f_end=f_end, n_points=n_points,
                                                      amplitude=amplitude, galvanostatic=True, i_dc=i_dc,
                                                      current_range=current_range)))

    def _unclipped(self, technique: str, packages: list[list[Value]]) -> list[list[Value]]:
        """The packages of a technique, refused whole when a current in them overloaded its range (status bit 2):
        a clipped current makes the impedance or the potential a number about another current."""
        for pkg in packages:
            for v in pkg:
                if "overload" in v.flags:
                    range_text = f" (range code {v.current_range})" if v.current_range is not None else ""
                    raise InstrumentError(self.name, [f"{technique}: a current overloaded its range{range_text}: "
                                                      "give the step a larger current range"], technique)
        return packages

    def _points(self, packages: list[list[Value]]) -> list[ImpedancePoint]:
        points = []
        for pkg in self._unclipped("EIS", packages):
            by_type = {v.var_type: v.value for v in pkg}
            if not {"dc", "cc", "cd"} <= set(by_type):
                raise MethodScriptError(self.name, "EIS", str(pkg), "frequency, Z real and Z imaginary")
            points.append(ImpedancePoint(by_type["dc"], by_type["cc"], by_type["cd"]))
        return points

    async def open_circuit_potential(self, *, interval: float, duration: float) -> list[float]:
        return [pkg[0].value for pkg in await self.run(ocp_script(interval=interval, duration=duration))]

    async def chronopotentiometry(self, *, current: float, interval: float, duration: float) -> list[float]:
        script = cp_script(current=current, interval=interval, duration=duration,
                           current_range=max(abs(current) * 2, 1e-6))
        return [pkg[0].value for pkg in self._unclipped("chronopotentiometry", await self.run(script))]

    def _raise_if_error(self, command: str, lines: list[str]) -> None:
        for line in lines:
            if (code := check_error(line)) is not None:
                raise InstrumentError(self.name, [f"!{code} in {line!r}"], command)


async def _open(req: OpenRequest) -> Opened:
    return await open_line_driver(req, PalmSens, PalmSens.identify)


class PalmSensSettings(SerialSettings):
    """A PalmSens potentiostat on its serial line (USB or Bluetooth)."""

    driver: Literal["palmsens"]


DRIVERS = [
    DriverSpec("palmsens", ("potentiostat",), _open, "PalmSens potentiostat (EmStat, Sensit), MethodSCRIPT on serial",
               baud_rate=230400, simulator="cellbench.simulators.palmsens:serve",
               rehearsal="cellbench.simulators.palmsens:rehearse", settings=PalmSensSettings),
]
