"""The SCPI grammar, once, for every simulated SCPI instrument.

An instrument lists its commands as header patterns in the manual's notation
(``:SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]``) mapped to handlers or
:class:`Setting` objects. :class:`ScpiTree` then accepts what a real instrument accepts: short and
long forms in any case, optional nodes left out, ``;``-chained commands on one line with the
compound-header rule, a leading ``:`` resetting to the root, common ``*`` commands anywhere,
quoted strings, and an error queue with the standard numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ERROR_TEXT: dict[int, str] = {
    0: "No error",
    -102: "Syntax error",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -222: "Data out of range",
    -224: "Illegal parameter value",
    -230: "Data corrupt or stale",
    -350: "Queue overflow",
}
ERROR_QUEUE_DEPTH = 10


class ScpiError(Exception):
    """A command error that goes into the instrument's error queue."""

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code},{ERROR_TEXT.get(code, 'Error')}{'; ' + detail if detail else ''}")


@dataclass(frozen=True)
class Node:
    long: str
    short: str
    optional: bool

    def matches(self, token: str) -> bool:
        t = token.upper()
        if t in (self.long, self.short):
            return True
        # A numeric suffix of 1 is the default channel: SOUR1 == SOUR.
        return t.endswith("1") and t[:-1] in (self.long, self.short) and not self.long[-1:].isdigit()


_NODE_RE = re.compile(r"(\[)?:?([A-Za-z*][A-Za-z]*)(?:\[?1\]?)?(\])?")


def parse_pattern(pattern: str) -> tuple[list[Node], bool]:
    """Split a manual-style header pattern into nodes; the bool says it is a query."""
    query = pattern.endswith("?")
    body = pattern.rstrip("?")
    nodes = []
    for m in _NODE_RE.finditer(body):
        word = m.group(2)
        short = "".join(c for c in word if c.isupper() or c == "*") or word.upper()
        nodes.append(Node(word.upper(), short, optional=bool(m.group(1))))
    return nodes, query


def match_nodes(tokens: Sequence[str], nodes: Sequence[Node]) -> bool:
    """Whether the header tokens spell the node list, optional nodes free to be left out."""
    if not tokens:
        return all(n.optional for n in nodes)
    if not nodes:
        return False
    head = nodes[0]
    if head.matches(tokens[0]) and match_nodes(tokens[1:], nodes[1:]):
        return True
    return head.optional and match_nodes(tokens, nodes[1:])


def split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on sep, leaving quoted strings ('...' or "...") whole."""
    parts, buf, quote = [], [], ""
    for ch in text:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            buf.append(ch)
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def unquote(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ScpiError(-104, f"not a number: {text!r}") from None


def parse_bool(text: str) -> bool:
    t = text.strip().upper()
    if t in ("1", "ON"):
        return True
    if t in ("0", "OFF"):
        return False
    raise ScpiError(-224, f"expected ON|OFF|1|0, got {text!r}")


@dataclass
class Setting:
    """A remembered instrument setting: set by the command form, answered by the query form.

    kind is ``float``, ``bool`` or ``choice``; a choice lists its values as patterns
    (``"VOLTage[:DC]"``), is answered in short form, and in quotes when ``quoted``.
    """

    name: str
    kind: str = "float"
    default: Any = 0.0
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    quoted: bool = False
    on_change: Callable[[Any], None] | None = None

    def parse(self, args: list[str]) -> Any:
        if not args or not args[0].strip():
            raise ScpiError(-109)
        if len(args) > 1:
            raise ScpiError(-108)
        raw = args[0].strip()
        if self.kind == "bool":
            return parse_bool(raw)
        if self.kind == "choice":
            return self._choice(unquote(raw))
        keyword = raw.upper()
        if self.range and keyword in ("MIN", "MINIMUM"):
            return self.range[0]
        if self.range and keyword in ("MAX", "MAXIMUM"):
            return self.range[1]
        if keyword in ("DEF", "DEFAULT"):
            return self.default
        value = parse_float(raw)
        if self.range and not self.range[0] <= value <= self.range[1]:
            raise ScpiError(-222, f"{value:g} outside {self.range[0]:g} to {self.range[1]:g}")
        return value

    def _choice(self, text: str) -> str:
        tokens = [t for t in text.split(":") if t]
        for choice in self.choices:
            nodes, _ = parse_pattern(choice)
            if match_nodes(tokens, nodes):
                return ":".join(n.short for n in nodes)
        raise ScpiError(-224, f"{text!r} is not one of {', '.join(self.choices)}")

    def format(self, value: Any) -> str:
        if self.kind == "bool":
            return "1" if value else "0"
        if self.kind == "choice":
            return f'"{value}"' if self.quoted else str(value)
        return format_number(value)


def format_number(value: float) -> str:
    return f"{value:.6E}"


Handler = Callable[[list[str]], str | None]


@dataclass
class _Entry:
    nodes: list[Node]
    query: bool
    handler: Handler


@dataclass
class ScpiTree:
    """The command set of one instrument and its state: settings and the error queue."""

    commands: dict[str, Handler | Setting]
    values: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)
    on_error: Callable[[int], None] | None = None  # e.g. the IEEE 488.2 event status register

    def __post_init__(self) -> None:
        self._entries: list[_Entry] = []
        self._common: dict[str, Handler] = {}
        for pattern, target in self.commands.items():
            if isinstance(target, Setting):
                self.values.setdefault(target.name, target.default)
                for query in (False, True):
                    self._add(pattern + ("?" if query else ""), self._setting_handler(target, query))
            else:
                self._add(pattern, target)

    def _add(self, pattern: str, handler: Handler) -> None:
        if pattern.startswith("*"):
            self._common[pattern.upper()] = handler
            return
        nodes, query = parse_pattern(pattern)
        self._entries.append(_Entry(nodes, query, handler))

    def _setting_handler(self, setting: Setting, query: bool) -> Handler:
        def handle(args: list[str]) -> str | None:
            if query:
                return setting.format(self.values[setting.name])
            value = setting.parse(args)
            self.values[setting.name] = value
            if setting.on_change:
                setting.on_change(value)
            return None

        return handle

    def reset(self) -> None:
        """Every setting back to its default (what *RST does)."""
        for target in self.commands.values():
            if isinstance(target, Setting):
                self.values[target.name] = target.default

    def push_error(self, code: int) -> None:
        if self.on_error is not None:
            self.on_error(code)
        if len(self.errors) >= ERROR_QUEUE_DEPTH:
            self.errors[-1] = (-350, ERROR_TEXT[-350])
            return
        self.errors.append((code, ERROR_TEXT.get(code, "Error")))

    def pop_error(self) -> str:
        code, text = self.errors.pop(0) if self.errors else (0, ERROR_TEXT[0])
        severity = 0 if code == 0 else 1
        return f'{code},"{text};{severity};0 0"'

    def execute(self, line: str) -> str | None:
        """Run one program message; the reply line, or None when it held no answered query."""
        replies: list[str] = []
        path: list[str] = []
        for unit in split_outside_quotes(line.strip(), ";"):
            unit = unit.strip()
            if not unit:
                continue
            try:
                reply, path = self._execute_unit(unit, path)
            except ScpiError as err:
                self.push_error(err.code)
                continue
            if reply is not None:
                replies.append(reply)
        return ";".join(replies) if replies else None

    def _execute_unit(self, unit: str, path: list[str]) -> tuple[str | None, list[str]]:
        header, _, rest = unit.partition(" ")
        args = [a.strip() for a in split_outside_quotes(rest, ",")] if rest.strip() else []
        if header.startswith(":*"):  # a common command after a colon (PyMeasure's reset sends ":*CLS"): taken
            header = header[1:]
        if header.startswith("*"):
            handler = self._common.get(header.upper())
            if handler is None:
                raise ScpiError(-113)
            return handler(args), path
        query = header.endswith("?")
        body = header.rstrip("?")
        absolute = body.startswith(":")
        tokens = [t for t in body.split(":") if t]
        if not tokens:
            raise ScpiError(-102)
        full = tokens if absolute else path + tokens
        entry, used = self._find(full, query), full
        if entry is None and not absolute:  # lenient: a relative header may also start at the root
            entry, used = self._find(tokens, query), tokens
        if entry is None:
            raise ScpiError(-113)
        return entry.handler(args), used[:-1]

    def _find(self, tokens: list[str], query: bool) -> _Entry | None:
        for entry in self._entries:
            if entry.query == query and match_nodes(tokens, entry.nodes):
                return entry
        return None
