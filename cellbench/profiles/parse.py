"""Read a profile file: YAML with line numbers, validated by the schema, errors as file:line: field: why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode
from ruamel.yaml.reader import ReaderError

from cellbench.profiles.schema import Profile

Path_ = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class InputError(ValueError):
    """A profile or bench file that cannot be used; each problem names its file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# Bounds on what a profile or a bench file may be: far above any real one, far below what hurts.
MAX_TEXT = 1_000_000  # characters
MAX_DEPTH = 40  # nesting of mappings and lists
MAX_VALUES = 200_000  # values once YAML aliases are expanded (an alias bomb expands to billions)


def read_text(path: Path, what: str, limit: int = MAX_TEXT) -> str:
    """A file's text, refused in one line when it is not a regular file, too large, or not UTF-8."""
    try:
        if not path.is_file():
            why = "not a regular file" if path.exists() else "no such file"
            raise InputError([f"{path}: cannot read the {what}: {why}"])
        with path.open("rb") as f:
            data = f.read(limit * 4 + 1)
    except OSError as exc:
        raise InputError([f"{path}: cannot read the {what}: {exc.strerror}"]) from None
    if len(data) > limit * 4:
        raise InputError([f"{path}: more than {limit * 4:,} bytes: too large for a {what}"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError([f"{path}: not UTF-8 text (byte {exc.start}): not a {what}"]) from None


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML into plain Python plus a map from each node's path to its 1-based line.

    Refused in one line: more than MAX_TEXT characters, characters YAML does not allow (a NUL), nesting
    deeper than MAX_DEPTH, more than MAX_VALUES values once aliases are expanded, an alias of itself."""
    if len(text) > MAX_TEXT:
        raise InputError([f"{source}: {len(text):,} characters: more than a profile or bench file holds "
                          f"(at most {MAX_TEXT:,})"])
    try:
        _bounded(YAML(typ="rt").compose(text), source)
        doc = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or exc.context or "invalid YAML"
        raise InputError([f"{source}:{line}: YAML syntax: {problem}"]) from None
    except ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise InputError([f"{source}:{line}: a character YAML does not allow ({char!r})"]) from None
    except YAMLError as exc:
        raise InputError([f"{source}: YAML syntax: {str(exc).splitlines()[0]}"]) from None
    except RecursionError:
        raise InputError([f"{source}: nested deeper than {MAX_DEPTH} levels"]) from None
    lines: dict[Path_, int] = {(): 1}
    return _plain(doc, (), lines), lines


def _bounded(root: Node | None, source: str) -> None:
    """Refuse a document nested too deeply or too large once its aliases are expanded (without expanding)."""
    if root is None:
        return
    size: dict[int, int] = {}
    stack: list[tuple[Node, int, bool]] = [(root, 1, False)]
    open_: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise InputError([f"{source}:{line}: nested deeper than {MAX_DEPTH} levels"])
        children = _children(node)
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_VALUES:
                raise InputError([f"{source}:{node.start_mark.line + 1}: more than {MAX_VALUES:,} values once its "
                                  "aliases are expanded: refused"])
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            raise InputError([f"{source}:{node.start_mark.line + 1}: an alias that contains itself"])
        open_.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _plain(node: Any, path: Path_, lines: dict[Path_, int]) -> Any:
    if isinstance(node, CommentedMap):
        out = {}
        for key, value in node.items():
            line = node.lc.key(key)[0] + 1
            lines[(*path, str(key))] = line
            out[str(key)] = _plain(value, (*path, str(key)), lines)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, value in enumerate(node):
            lines[(*path, i)] = node.lc.item(i)[0] + 1
            items.append(_plain(value, (*path, i), lines))
        return items
    if isinstance(node, str):
        return str(node)
    return node


def data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """The longest walk through the data that the error location spells (union tags skipped)."""
    if not loc:
        return ()
    head, rest = loc[0], loc[1:]
    best = data_path(data, rest)  # head may be a tag or a validator's name: skip it
    child: Any = None
    if isinstance(data, dict) and head in data:
        child = data[head]
    elif isinstance(data, list) and isinstance(head, int) and 0 <= head < len(data):
        child = data[head]
    else:
        return best
    inner = (head, *data_path(child, rest))
    return inner if len(inner) >= len(best) else best


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def explain(exc: ValidationError, data: Any, lines: dict[Path_, int], source: str) -> list[str]:
    """Turn pydantic's errors into 'file:line: field: message' lines, one per problem."""
    problems = []
    for err in exc.errors(include_url=False):
        path = data_path(data, err["loc"])
        line_path = path
        key = (err.get("ctx") or {}).get("key")
        if key is not None and (*path, key) in lines:
            line_path = (*path, key)
        line = lines.get(line_path) or _nearest_line(line_path, lines)
        message = err["msg"]
        if err["type"] == "missing":
            missing = err["loc"][-1]
            message = f"'{missing}' is required"
        elif err["type"] == "extra_forbidden":
            message = f"unknown key '{err['loc'][-1]}'"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        where = f"{format_path(path)}: " if path else ""
        problems.append(f"{source}:{line}: {where}{message}")
    return sorted(set(problems), key=problems.index)


def _nearest_line(path: Path_, lines: dict[Path_, int]) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


def validate_yaml(
    text: str, source: str, model: type[M], checks: Callable[[M], list[tuple[Path_, str]]] | None = None
) -> M:
    """Parse YAML text into a pydantic model; raise InputError listing every problem with its line.

    ``checks`` sees the valid model and returns further problems as (path in the data, message),
    for rules that span fields (a channel naming an instrument that is not there).
    """
    data, lines = load_yaml(text, source)
    if not isinstance(data, dict):
        raise InputError([f"{source}:1: expected a mapping of keys to values at the top level"])
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        raise InputError(explain(exc, data, lines, source)) from None
    problems = checks(result) if checks else []
    if problems:
        raise InputError(locate(text, source, problems))
    return result


def locate(text: str, source: str, problems: list[tuple[Path_, str]]) -> list[str]:
    """Problems found on a valid model, as 'file:line: field: message' against its YAML text."""
    _, lines = load_yaml(text, source)
    return [f"{source}:{_nearest_line(path, lines)}: {format_path(path)}: {message}" for path, message in problems]


def parse_profile(text: str, source: str = "<profile>", base_dir: Path | None = None) -> Profile:
    """Validate profile text; raise InputError listing every problem with its line."""
    from cellbench.profiles.checks import profile_checks

    return validate_yaml(text, source, Profile, profile_checks(base_dir or Path(".")))


def load_profile(path: str | Path) -> tuple[Profile, str]:
    """Read and validate a profile file; return the profile and its text (recorded with the run)."""
    p = Path(path)
    text = read_text(p, "profile")
    return parse_profile(text, p.name, p.parent), text
