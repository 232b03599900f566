"""The 2450's trigger model as its reference manual builds it (section 6, `:TRIGger:BLOCk:…`, pages 6-186 to
6-209): numbered blocks defined one command each, run from block 1 by `:INITiate`, stopped by `:ABORt`, its
state answered by `:TRIGger:STATe?` (`IDLE;IDLE;9`: the state twice and the block it last executed).

Simulated blocks: buffer clear, source output on/off, constant delay, measure (a count of readings into a
buffer), branch on constant limits (ABOVe, BELow, INSide, OUTSide on the last reading of a measure block),
branch on counter, branch always, no-op. A running model is integrated lazily: when the client next speaks, every
block due since is run in order, each reading taken at its own moment in the cell's state of that moment, and
the model stops exactly where the instrument would (a limit branch on the reading that crossed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cellbench.simulators.scpi import ScpiError, parse_bool, parse_float, unquote

MAX_BLOCKS = 63  # block numbers the model takes
LIMIT_TYPES = {"ABOV": "ABOVE", "BEL": "BELOW", "INS": "INSIDE", "OUTS": "OUTSIDE"}  # short form: long form
STEADY_LIMIT = 1_000_000  # blocks run at one instant without time passing: a loop with no delay, failed


class Machine(Protocol):
    """What the trigger model acts on: the simulated instrument."""

    def integrate_to(self, t: float) -> None: ...
    def set_output(self, on: bool) -> None: ...
    def take_reading(self, buffer: str, t: float) -> float: ...
    def clear_buffer(self, buffer: str) -> None: ...
    def has_buffer(self, buffer: str) -> bool: ...


@dataclass(frozen=True)
class Block:
    kind: str  # BUFFER_CLEAR, SOURCE_OUTPUT, DELAY_CONSTANT, MEASURE, BRANCH_LIMIT_CONSTANT, BRANCH_COUNTER, ...
    buffer: str = "defbuffer1"
    on: bool = False
    seconds: float = 0.0
    count: int = 1
    limit: str = ""  # ABOVE, BELOW, INSIDE, OUTSIDE
    low: float = 0.0
    high: float = 0.0
    to: int = 0  # the block a branch goes to
    measure_block: int = 0  # the measure block whose last reading a limit branch compares (0: the one before)


def _limit_type(word: str) -> str:
    w = word.strip().upper()
    for short, full in LIMIT_TYPES.items():
        if w.startswith(short) and full.startswith(w):
            return full
    raise ScpiError(-224, f"limit type {word!r}: ABOVe, BELow, INSide or OUTSide")


def _int(word: str) -> int:
    value = parse_float(word)
    if value != int(value):
        raise ScpiError(-104, f"not an integer: {word!r}")
    return int(value)


def _buffer(args: list[str], k: int) -> str:
    return unquote(args[k]) if len(args) > k else "defbuffer1"


def _limits(args: list[str]) -> Block:
    """`<limitType>, <limitA>, <limitB>, <branchToBlock>[, <measureBlock>]`: BELow tests limit A, ABOVe limit B,
    INside and OUTside both (swapped when A is the higher)."""
    limit, a, b = _limit_type(args[0]), parse_float(args[1]), parse_float(args[2])
    low, high = (min(a, b), max(a, b)) if limit in ("INSIDE", "OUTSIDE") else (a, b)
    return Block("BRANCH_LIMIT_CONSTANT", limit=limit, low=low, high=high, to=_int(args[3]),
                 measure_block=_int(args[4]) if len(args) > 4 else 0)


def _measure(args: list[str]) -> Block:
    count = args[1].strip().upper() if len(args) > 1 else "1"
    if count.startswith("INF"):
        raise ScpiError(-224, "an infinite measure count is not simulated")
    return Block("MEASURE", buffer=_buffer(args, 0), count=_int(count))


def _delay(args: list[str]) -> Block:
    seconds = parse_float(args[0])
    if seconds != 0 and not 167e-9 <= seconds <= 10_000:
        raise ScpiError(-222, "a delay is 167 ns to 10,000 s, or 0")
    return Block("DELAY_CONSTANT", seconds=seconds)


# each block command: how many arguments after the block number it takes (least, most), and how it is read
BLOCK_COMMANDS: dict[str, tuple[int, int, Callable[[list[str]], Block]]] = {
    ":TRIGger:BLOCk:BUFFer:CLEar": (0, 1, lambda a: Block("BUFFER_CLEAR", buffer=_buffer(a, 0))),
    ":TRIGger:BLOCk:SOURce:STATe": (1, 1, lambda a: Block("SOURCE_OUTPUT", on=parse_bool(a[0]))),
    ":TRIGger:BLOCk:DELay:CONStant": (1, 1, _delay),
    ":TRIGger:BLOCk:MEASure": (0, 2, _measure),
    ":TRIGger:BLOCk:BRANch:LIMit:CONStant": (4, 5, _limits),
    ":TRIGger:BLOCk:BRANch:COUNter": (2, 2, lambda a: Block("BRANCH_COUNTER", count=_int(a[0]), to=_int(a[1]))),
    ":TRIGger:BLOCk:BRANch:ALWays": (1, 1, lambda a: Block("BRANCH_ALWAYS", to=_int(a[0]))),
    ":TRIGger:BLOCk:NOP": (0, 0, lambda a: Block("NOP")),
}


@dataclass
class TriggerModel:
    """A trigger model built block by block (after `:TRIGger:LOAD "Empty"`)."""

    blocks: dict[int, Block] = field(default_factory=dict)
    state: str = "EMPTY"  # EMPTY, BUILDING, RUNNING, IDLE, ABORTED, FAILED
    last: int = 0  # the block last executed
    wake: float = 0.0  # the model's own time: a delay holds it until then
    _pc: int = 1
    _counters: dict[int, int] = field(default_factory=dict)
    _readings: dict[int, float] = field(default_factory=dict)  # each measure block's last reading
    _last_measure: int = 0

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def end(self) -> float:
        """When something next happens in it (what a client held behind *WAI sleeps until): the end of the delay
        it is held in."""
        block = self.blocks.get(self._pc)
        return self.wake + (block.seconds if block is not None and block.kind == "DELAY_CONSTANT" else 0.0)

    def define(self, command: str, args: list[str]) -> None:
        least, most, read = BLOCK_COMMANDS[command]
        if self.running:
            raise ScpiError(-200, "the trigger model is running")
        if not args:
            raise ScpiError(-109, "a block number")
        number, rest = _int(args[0]), args[1:]
        if not 1 <= number <= MAX_BLOCKS:
            raise ScpiError(-222, f"block numbers are 1 to {MAX_BLOCKS}")
        if not least <= len(rest) <= most:
            raise ScpiError(-109 if len(rest) < least else -108, f"{command} takes {least} to {most} parameters")
        self.blocks[number] = read(rest)
        self.state = "BUILDING"

    def start(self, now: float, machine: Machine) -> None:
        if not self.blocks:
            raise ScpiError(-224, "no trigger model loaded")
        top = max(self.blocks)
        if (gap := next((n for n in range(1, top + 1) if n not in self.blocks), None)) is not None:
            raise ScpiError(-224, f"block {gap} is not defined")
        for n, block in self.blocks.items():
            if block.kind.startswith("BRANCH") and block.kind != "BRANCH_COUNTER" and not 1 <= block.to <= top + 1:
                raise ScpiError(-224, f"block {n} branches to block {block.to}, which is not defined")
            if block.kind in ("MEASURE", "BUFFER_CLEAR") and not machine.has_buffer(block.buffer):
                raise ScpiError(-224, f"block {n}: no reading buffer {block.buffer!r}")
        self.state, self.last, self.wake, self._pc = "RUNNING", 0, now, 1
        self._counters, self._readings, self._last_measure = {}, {}, 0

    def abort(self) -> None:
        if self.running:
            self.state = "ABORTED"

    def status(self) -> str:
        return f"{self.state};{self.state};{self.last}"

    def run(self, machine: Machine, now: float) -> None:
        """Run every block due by `now`, in order; stop at a delay that ends later, or at the model's end."""
        steady = 0
        while self.running:
            block = self.blocks.get(self._pc)
            if block is None:  # past the last block: the model ends
                self.state = "IDLE"
                return
            if block.kind == "DELAY_CONSTANT" and self.wake + block.seconds > now + 1e-12:
                return  # held in the delay; the host's next line finds it further on
            steady = 0 if block.kind == "DELAY_CONSTANT" and block.seconds > 0 else steady + 1
            if steady > STEADY_LIMIT:
                self.state = "FAILED"
                return
            self.last = self._pc
            self._pc = self._execute(self._pc, block, machine)

    def _execute(self, n: int, block: Block, machine: Machine) -> int:
        kind = block.kind
        if kind == "DELAY_CONSTANT":
            self.wake += block.seconds
        elif kind == "BUFFER_CLEAR":
            machine.clear_buffer(block.buffer)
        elif kind == "SOURCE_OUTPUT":
            machine.integrate_to(self.wake)
            machine.set_output(block.on)
        elif kind == "MEASURE":
            for _ in range(block.count):
                self._readings[n] = machine.take_reading(block.buffer, self.wake)
            self._last_measure = n
        elif kind == "BRANCH_LIMIT_CONSTANT":
            which = block.measure_block or self._last_measure
            value = self._readings.get(which, math.nan)
            met = {"ABOVE": value > block.high, "BELOW": value < block.low,
                   "INSIDE": block.low <= value <= block.high,
                   "OUTSIDE": value < block.low or value > block.high}[block.limit]
            return block.to if met else n + 1
        elif kind == "BRANCH_COUNTER":
            self._counters[n] = self._counters.get(n, 0) + 1
            if self._counters[n] < block.count:
                return block.to
            self._counters[n] = 0  # through: counted afresh the next time the model comes round to it
            return n + 1
        elif kind == "BRANCH_ALWAYS":
            return block.to
        return n + 1
