"""``${...}`` templates: compiled once when a flow loads, rendered per task at run time.

A reference is a dotted path: ``${task_id.key.sub}``, ``${event.payload.x}``,
``${input.x}``, ``${flow.name}``, ``${run.id}``; a numeric part indexes a list
(``${fetch.items.0}``). A string that is exactly one reference keeps the value's type; a
reference inside a longer string is rendered as text (strings as they are, everything else
as JSON). ``$${`` writes a literal ``${``. A reference with no value is a
:class:`TemplateError` naming it, unless it ends with ``?`` (``${event.payload.plan?}``),
which reads a missing value as null.

URL templates (:func:`compile_url`, for config fields such as ``http.request``'s ``url``)
are stricter: the scheme, host and port must be written in the flow file, and every value
interpolated after them is percent-encoded as one URL component (RFC 3986: only
``A-Z a-z 0-9 - . _ ~`` stay as they are), so event data can add to a path or a query
value but never move the request to another host (``"@evil:1/x"`` becomes
``%40evil%3A1%2Fx``), add a query parameter or start a fragment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import msgspec

from mfo_actors.taskflow._errors import TemplateError

__all__ = [
    "RESERVED_ROOTS",
    "Ref",
    "Template",
    "UrlTemplate",
    "compile_template",
    "compile_tree",
    "compile_url",
    "render_tree",
    "tree_refs",
]

# Roots that are not task ids; a task may not be named like one of them.
RESERVED_ROOTS = frozenset({"event", "input", "flow", "run", "session"})

_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}")
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*|\d+")
_json_encode = msgspec.json.encode


class Ref:
    """One reference ``${root.a.b}``; :meth:`resolve` walks dicts, lists and Structs."""

    __slots__ = ("optional", "path", "root", "text")

    def __init__(self, text: str) -> None:
        text = text.strip()
        self.optional = text.endswith("?")
        if self.optional:
            text = text[:-1]
        parts = text.split(".") if text else []
        if not parts or not all(_PART.fullmatch(p) for p in parts) or parts[0].isdigit():
            raise ValueError(f"invalid reference ${{{text}}} (expected ${{name.key.sub}})")
        self.text = text + ("?" if self.optional else "")
        self.root = parts[0]
        self.path: tuple[str | int, ...] = tuple(int(p) if p.isdigit() else p for p in parts[1:])

    def __repr__(self) -> str:
        return f"Ref(${{{self.text}}})"

    def resolve(self, scope: Mapping[str, Any]) -> Any:
        try:
            value = scope[self.root]
        except KeyError:
            if self.optional:
                return None
            raise TemplateError(f"${{{self.text}}}: {_missing_root(self.root)}") from None
        for i, part in enumerate(self.path):
            try:
                if isinstance(value, Mapping):
                    value = value[str(part)]
                elif isinstance(value, list | tuple) and isinstance(part, int):
                    value = value[part]
                elif isinstance(value, msgspec.Struct) and isinstance(part, str):
                    value = getattr(value, part)
                else:
                    raise LookupError
            except (LookupError, AttributeError):
                if self.optional:
                    return None
                where = ".".join(str(p) for p in (self.root, *self.path[:i]))
                raise TemplateError(
                    f"${{{self.text}}}: {where} has no {part!r}"
                ) from None
        return value


def _missing_root(root: str) -> str:
    if root == "event":
        return "this run was not started by an event"
    if root == "session":
        return "no chat session in this run yet (an mfo.chat task with session: sets it)"
    if root in RESERVED_ROOTS:
        return f"no {root} in this run"
    return f"task {root!r} has no outputs (it was skipped or failed)"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return _json_encode(value).decode()


class Template:
    """A string with references; ``exact`` is set when it is one reference and nothing else."""

    __slots__ = ("exact", "parts", "refs", "source")

    def __init__(self, source: str, parts: list[str | Ref]) -> None:
        self.source = source
        self.parts = parts
        self.refs = [p for p in parts if isinstance(p, Ref)]
        self.exact = parts[0] if len(parts) == 1 and isinstance(parts[0], Ref) else None

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def render(self, scope: Mapping[str, Any]) -> Any:
        if self.exact is not None:
            return self.exact.resolve(scope)
        return "".join(p if isinstance(p, str) else _as_text(p.resolve(scope)) for p in self.parts)


class UrlTemplate(Template):
    """A URL whose interpolated values are percent-encoded (see the module docstring)."""

    __slots__ = ()

    def render(self, scope: Mapping[str, Any]) -> Any:
        return "".join(p if isinstance(p, str) else quote(_as_text(p.resolve(scope)), safe="")
                       for p in self.parts)


# The literal start of a URL template: scheme://authority, ended by the path, query or fragment.
_URL_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#${}]*[/?#]")


def compile_url(template: Template) -> UrlTemplate:
    """*template* as a :class:`UrlTemplate`.

    Raises:
      ValueError: the scheme, host or port is not written out before the first reference.
    """
    first = template.parts[0]
    if not isinstance(first, str) or not _URL_ORIGIN.match(first):
        raise ValueError(
            "the scheme, host and port of a URL must be written in the flow file; only the "
            "path, query and fragment may use ${...} (their values are percent-encoded), "
            f"got {template.source!r}")
    return UrlTemplate(template.source, template.parts)


def compile_template(text: str) -> str | Template:
    """Compile *text*: a plain ``str`` when it has no references, else a :class:`Template`.

    Raises:
      ValueError: an unclosed ``${`` or a malformed reference (the loader adds file and line).
    """
    if "${" not in text:
        return text
    parts: list[str | Ref] = []
    pos = 0
    literal = ""
    for match in _TOKEN.finditer(text):
        segment = text[pos : match.start()]
        if "${" in segment:
            raise ValueError(f"unclosed ${{ in {text!r}")
        literal += segment
        pos = match.end()
        if match.group(0) == "$${":
            literal += "${"
            continue
        if literal:
            parts.append(literal)
            literal = ""
        parts.append(Ref(match.group(1)))
    rest = text[pos:]
    if "${" in rest.replace("$${", ""):
        raise ValueError(f"unclosed ${{ in {text!r}")
    literal += rest
    if literal:
        parts.append(literal)
    if not any(isinstance(p, Ref) for p in parts):
        return "".join(p for p in parts if isinstance(p, str))
    return Template(text, parts)


def compile_tree(value: Any) -> tuple[Any, bool]:
    """Compile every string in nested dicts/lists; returns ``(tree, has_templates)``."""
    if isinstance(value, str):
        compiled = compile_template(value)
        return compiled, isinstance(compiled, Template)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        any_t = False
        for k, v in value.items():
            out[k], t = compile_tree(v)
            any_t = any_t or t
        return out, any_t
    if isinstance(value, list):
        items = []
        any_t = False
        for v in value:
            c, t = compile_tree(v)
            items.append(c)
            any_t = any_t or t
        return items, any_t
    return value, False


def render_tree(tree: Any, scope: Mapping[str, Any]) -> Any:
    """Render a compiled tree into plain data."""
    if isinstance(tree, Template):
        return tree.render(scope)
    if isinstance(tree, dict):
        return {k: render_tree(v, scope) for k, v in tree.items()}
    if isinstance(tree, list):
        return [render_tree(v, scope) for v in tree]
    return tree


def tree_refs(
    tree: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], Ref]]:
    """Yield ``(key path, ref)`` for every reference in a compiled tree."""
    if isinstance(tree, Template):
        for ref in tree.refs:
            yield path, ref
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_refs(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from tree_refs(v, (*path, i))
