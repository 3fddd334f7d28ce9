"""YAML files validated into msgspec Structs (the instance config, flow files).

Parse with PyYAML's SafeLoader keeping the line of every key (:class:`LineMap`), refuse
aliases that expand past :data:`MAX_EXPANDED_NODES` (an alias bomb: nine levels of nine
aliases is 387 million nodes written in ten lines), reject duplicate keys, convert with
msgspec using :func:`dec_hook` for the value types written in
these files (:class:`Duration`, :class:`Size`, :class:`Port`), and map msgspec's validation
errors back to a key path and line (:func:`split_validation_error`, :func:`validation_error`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgspec
import yaml

from mfo_actors.errors import ConfigError

__all__ = [
    "MAX_PROBLEMS",
    "Duration",
    "KeyPath",
    "LineMap",
    "Port",
    "Size",
    "convert_collecting",
    "dec_hook",
    "dotted",
    "parse_duration",
    "parse_port",
    "parse_size",
    "parse_value",
    "parse_yaml",
    "split_validation_error",
    "validation_error",
]


T = TypeVar("T")


class Duration(float):
    """Seconds, written in YAML as ``500ms``, ``30s``, ``1m``, ``1h``, ``1d`` or a number."""


class Size(int):
    """A number of bytes, written in YAML as ``512KiB``, ``1MiB``, ``1GB`` or a number."""


class Port(int):
    """A TCP port, written as ``8080`` or in the seed's Go style ``":8080"``."""


# Nodes a document may expand to through its aliases. Real configs and flows have hundreds;
# every later walk (line map, secrets, msgspec) is linear in this, so it bounds them all.
MAX_EXPANDED_NODES = 20_000

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
    "k": 1024, "m": 1024**2, "g": 1024**3,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")


def parse_duration(value: object) -> Duration:
    """Parse ``"1m30s"``, ``"500ms"`` or a number of seconds; raise ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return Duration(value)
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return Duration(sum(float(n) * _DURATION_UNITS[u] for n, u in parts))
    raise ValueError(f"invalid duration {value!r} (use e.g. 500ms, 30s, 1m, 1h)")


def parse_size(value: object) -> Size:
    """Parse ``"1MiB"``, ``"512KiB"``, ``"10MB"`` or a number of bytes; else ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Size(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match and match.group(2).lower() in _SIZE_UNITS:
            return Size(int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]))
    raise ValueError(f"invalid size {value!r} (use e.g. 512KiB, 1MiB, 10MB)")


def parse_port(value: object) -> Port:
    """Parse ``8080`` or ``":8080"``; raise ValueError otherwise."""
    valid_type = isinstance(value, int | str) and not isinstance(value, bool)
    text = str(value).strip() if valid_type else ""
    if text.startswith(":"):
        text = text[1:]
    if text.isdigit() and 0 <= int(text) <= 65535:
        return Port(int(text))
    raise ValueError(f"invalid port {value!r} (use 8080 or \":8080\")")


def dec_hook(tp: type, obj: object) -> object:
    """msgspec ``dec_hook`` for :class:`Duration`, :class:`Size` and :class:`Port` fields."""
    if tp is Duration:
        return parse_duration(obj)
    if tp is Size:
        return parse_size(obj)
    if tp is Port:
        return parse_port(obj)
    raise NotImplementedError(f"no decoder for {tp!r}")


KeyPath = tuple[str | int, ...]


def dotted(path: KeyPath) -> str:
    """``a.b[0].c`` for the key path ``("a", "b", 0, "c")``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class LineMap:
    """Maps a key path to the 1-based YAML line where it is written."""

    def __init__(self) -> None:
        self._lines: dict[KeyPath, int] = {}

    def record(self, node: yaml.Node, path: KeyPath = ()) -> None:
        self._lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                self._lines[(*path, key)] = key_node.start_mark.line + 1
                self.record(value_node, (*path, key))
                self._lines[(*path, key)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.record(item, (*path, i))

    def written(self, path: KeyPath) -> bool:
        """Whether the file itself has the key at *path*."""
        return path in self._lines

    def line(self, path: KeyPath) -> int | None:
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return self._lines.get(())


def _node_problem(root: yaml.Node) -> tuple[str, int] | None:
    """What makes *root* unusable as a config, with its line: a key that is not a plain
    value (``? [a, b]``), or aliases that expand past :data:`MAX_EXPANDED_NODES` (or loop).
    Linear in the distinct nodes: an alias is the same node object reached twice, and each
    node's expanded size is computed once."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    first_shared: list[int] = []

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            if not first_shared:
                first_shared.append(node.start_mark.line + 1)
            return sizes[key]
        if key in active:
            raise _AliasLoop(node.start_mark.line + 1)
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _ComplexKey(key_node.start_mark.line + 1)
                total += size(key_node) + size(value_node)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
                if total > MAX_EXPANDED_NODES:
                    break
        active.discard(key)
        sizes[key] = total
        return total

    try:
        total = size(root)
    except _AliasLoop as loop:
        return "a YAML alias refers to itself (a recursive anchor)", loop.line
    except _ComplexKey as key:
        return "a key must be a plain value (a name), not a list or a mapping", key.line
    if total > MAX_EXPANDED_NODES:
        line = first_shared[0] if first_shared else root.start_mark.line + 1
        return (f"YAML aliases expand this document past {MAX_EXPANDED_NODES} nodes "
                "(an alias bomb?); write the values out or use fewer aliases"), line
    return None


class _AliasLoop(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _ComplexKey(Exception):
    """A mapping key that is itself a list or a mapping."""

    def __init__(self, line: int) -> None:
        self.line = line


def _duplicate_keys(node: yaml.Node, path: KeyPath = ()) -> Iterator[tuple[KeyPath, int]]:
    """Every key written twice in one mapping (PyYAML would silently keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                yield (*path, key), key_node.start_mark.line + 1
            seen.add(key)
            yield from _duplicate_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path, i))


def parse_yaml(
    text: str,
    file: str,
    *,
    prepare: Callable[[yaml.Node], None] | None = None,
    problems: list[ConfigError] | None = None,
) -> tuple[Any, LineMap]:
    """Parse one YAML document with SafeLoader, keeping the line of every key.

    *prepare* may rewrite the node tree first (after the duplicate-key check). An empty
    document is ``{}``. Given a *problems* list, duplicate keys are added to it (the last
    value wins) instead of raised, so a caller can go on and report everything at once.

    Raises:
      ConfigError: invalid YAML (or a duplicate key, without *problems*), with the file and
        line.
    """
    lines = LineMap()
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}, lines
            unusable = _node_problem(node)
            if unusable is not None:  # nothing after it could be read in reasonable time
                raise ConfigError(unusable[0], file=file, line=unusable[1])
            for path, at in _duplicate_keys(node):
                duplicate = ConfigError("duplicate key", file=file, key=dotted(path), line=at)
                if problems is None:
                    raise duplicate
                problems.append(duplicate)
            if prepare is not None:
                prepare(node)
            lines.record(node)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    except RecursionError:
        # PyYAML's parser (and the walks above) recurse once per nesting level.
        raise ConfigError("invalid YAML: nested too deeply", file=file) from None
    return data, lines


def parse_value(text: str, file: str) -> Any:
    """One YAML value written outside a file (an environment override such as
    ``MFO_WEBHOOK_LISTENER__ROUTES='[...]'``), bounded like :func:`parse_yaml`: a value is
    read by the same loader as the files, so it gets the same alias bound (a bomb in a
    variable made ``check`` run for minutes) and nesting limit.

    Raises:
      yaml.YAMLError: *text* is not YAML (the caller may take it as plain text).
      ConfigError: aliases expanding past :data:`MAX_EXPANDED_NODES`, a key that is not a
        plain value, or nesting too deep, naming *file*.
    """
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            unusable = _node_problem(node)
            if unusable is not None:
                raise ConfigError(unusable[0], file=file)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=file) from None


_AT_PATH = re.compile(r" - at `\$(.*)`$")
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`")
_MISSING_FIELD = re.compile(r"^Object missing required field `([^`]*)`")


def split_validation_error(exc: msgspec.ValidationError) -> tuple[str, KeyPath]:
    """Split msgspec's ``... - at `$.a[0].b``` into a message and a key path."""
    message = str(exc)
    path: list[str | int] = []
    match = _AT_PATH.search(message)
    if match:
        message = message[: match.start()]
        for name, index in _PATH_PART.findall(match.group(1)):
            path.append(int(index) if index else name)
    unknown = _UNKNOWN_FIELD.match(message)
    if unknown:
        path.append(unknown.group(1))
        message = "unknown key"
    return message, tuple(path)


def validation_error(exc: msgspec.ValidationError, *, file: str, lines: LineMap) -> ConfigError:
    """*exc* as a ConfigError naming the file, the dotted key path and its line."""
    message, path = split_validation_error(exc)
    return ConfigError(message, file=file, key=dotted(path) or None, line=lines.line(path))


MAX_PROBLEMS = 100  # per file: past this many, the file is more wrong than right


def convert_collecting(
    data: Any, tp: type[T], *, limit: int = MAX_PROBLEMS
) -> tuple[T | None, list[tuple[str, KeyPath]], list[KeyPath]]:
    """Convert *data* to *tp*, reporting every problem rather than the first.

    msgspec stops at the first invalid value. After each, the key that holds it is removed
    from *data* (modified in place: its default applies) and conversion runs again, so one
    bad key never hides another. A problem inside a list item removes the innermost mapping
    key on its path, never a list item (that would shift the indexes later problems name);
    a problem with an item itself removes the whole list.

    Returns:
      ``(value or None, problems as (message, key path), removed key paths)``; the value is
      None only when a problem could not be removed (the document has the wrong shape).
    """
    problems: list[tuple[str, KeyPath]] = []
    removed: list[KeyPath] = []
    for _ in range(limit):
        try:
            return msgspec.convert(data, tp, dec_hook=dec_hook), problems, removed
        except msgspec.ValidationError as exc:
            message, path = split_validation_error(exc)
            missing = _MISSING_FIELD.match(message)
            if not (missing and (*path, missing.group(1)) in removed):
                # (A required key we removed ourselves is not a second problem.)
                problems.append((message, path))
            cut = _remove_innermost_key(data, path)
            if cut is None:
                break
            removed.append(cut)
    return None, problems, removed


def _remove_innermost_key(data: Any, path: KeyPath) -> KeyPath | None:
    """Delete the deepest mapping key on *path* that *data* has; return its path."""
    for end in range(len(path), 0, -1):
        key = path[end - 1]
        if not isinstance(key, str):
            continue
        container = data
        for part in path[: end - 1]:
            try:
                container = container[part]
            except (KeyError, IndexError, TypeError):
                container = None
                break
        if isinstance(container, dict) and key in container:
            del container[key]
            return path[:end]
    return None
