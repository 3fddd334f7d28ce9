"""The ``when:`` expression language: a tokenizer and a recursive-descent parser, never eval.

Grammar (lowest precedence first)::

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in") operand)?
    operand    := literal | reference | "(" expr ")" | "[" (expr ("," expr)*)? "]"
    literal    := 'string' | "string" | number | true | false | null
    reference  := ${name.key.sub}

``True``/``False``/``None`` are accepted as spellings of the literals. Any other bare name
(``__import__``, ``os``) is a syntax error, so an expression can only read values and compare
them. Expressions compile to a tree of closures once, at load; evaluating one is a few calls.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from mfo_actors.taskflow._errors import ExpressionError, ExpressionSyntaxError
from mfo_actors.taskflow._template import Ref

__all__ = ["Expression", "compile_expression"]

MAX_EXPRESSION_LENGTH = 4096  # a condition longer than this is a mistake, not a condition
MAX_NESTING = 64  # parentheses/list depth; keeps the recursive parser far from Python's limit

Scope = Mapping[str, Any]
Evaluator = Callable[[Scope], Any]

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<ref>\$\{[^{}]*\})
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in"}
_LITERALS: dict[str, Any] = {
    "true": True, "false": False, "null": None, "True": True, "False": False, "None": None,
}  # fmt: skip
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
    "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
}  # fmt: skip

_Token = tuple[str, str, int]  # kind, text, 1-based column


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionSyntaxError(f"unexpected character {text[pos]!r}", column=pos + 1)
        kind = match.lastgroup or ""
        if kind != "ws":
            value = match.group()
            if kind == "name" and value in _KEYWORDS:
                kind = "kw"
            elif kind == "name" and value in _LITERALS:
                kind = "literal"
            tokens.append((kind, value, pos + 1))
        pos = match.end()
    tokens.append(("end", "", len(text) + 1))
    return tokens


def _unquote(text: str, column: int) -> str:
    body = text[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise ExpressionSyntaxError(f"unknown escape \\{nxt}", column=column + i + 1)
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0
        self.refs: list[Ref] = []

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, text: str) -> None:
        kind, value, col = self.take()
        if value != text or kind not in ("op", "kw"):
            raise ExpressionSyntaxError(f"expected {text!r}, got {_describe(kind, value)}",
                                        column=col)

    def parse(self) -> Evaluator:
        ev = self.or_expr()
        kind, value, col = self.peek()
        if kind != "end":
            raise ExpressionSyntaxError(f"unexpected {_describe(kind, value)}", column=col)
        return ev

    def or_expr(self) -> Evaluator:
        terms = [self.and_expr()]
        while self.peek()[:2] == ("kw", "or"):
            self.take()
            terms.append(self.and_expr())
        if len(terms) == 1:
            return terms[0]

        # One flat loop, not a closure per operand: a long chain (``1or 1or ...``) must not
        # nest evaluation calls as deep as it is long (RecursionError at run time).
        def any_of(s: Scope) -> Any:
            value: Any = None
            for term in terms:
                value = term(s)
                if value:
                    return value
            return value

        return any_of

    def and_expr(self) -> Evaluator:
        terms = [self.not_expr()]
        while self.peek()[:2] == ("kw", "and"):
            self.take()
            terms.append(self.not_expr())
        if len(terms) == 1:
            return terms[0]

        def all_of(s: Scope) -> Any:
            value: Any = None
            for term in terms:
                value = term(s)
                if not value:
                    return value
            return value

        return all_of

    def not_expr(self) -> Evaluator:
        if self.peek()[:2] == ("kw", "not"):
            self.take()
            self._enter()
            inner = self.not_expr()
            self.depth -= 1
            return lambda s: not inner(s)
        return self.comparison()

    def comparison(self) -> Evaluator:
        left = self.operand()
        kind, value, _ = self.peek()
        if (kind == "op" and value in _COMPARE) or (kind == "kw" and value == "in"):
            self.take()
            op_name = value
        elif (kind, value) == ("kw", "not") and self.tokens[self.pos + 1][:2] == ("kw", "in"):
            self.pos += 2
            op_name = "not in"
        else:
            return left
        right = self.operand()
        op = _COMPARE[op_name]

        def compare(s: Scope) -> Any:
            a, b = left(s), right(s)
            try:
                return op(a, b)
            except TypeError:
                raise ExpressionError(
                    f"cannot compare {type(a).__name__} {op_name} {type(b).__name__}"
                ) from None

        nxt = self.peek()
        if nxt[0] == "op" and nxt[1] in _COMPARE:
            raise ExpressionSyntaxError("chained comparisons need 'and'", column=nxt[2])
        return compare

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ExpressionSyntaxError(f"nesting deeper than {MAX_NESTING}")

    def operand(self) -> Evaluator:
        kind, value, col = self.take()
        if kind == "literal":
            const = _LITERALS[value]
            return lambda s: const
        if kind == "number":
            num: float | int = float(value) if any(c in value for c in ".eE") else int(value)
            return lambda s: num
        if kind == "string":
            text = _unquote(value, col)
            return lambda s: text
        if kind == "ref":
            try:
                ref = Ref(value[2:-1])
            except ValueError as exc:
                raise ExpressionSyntaxError(str(exc), column=col) from None
            self.refs.append(ref)
            return ref.resolve
        if (kind, value) == ("op", "("):
            self._enter()
            inner = self.or_expr()
            self.expect(")")
            self.depth -= 1
            return inner
        if (kind, value) == ("op", "["):
            self._enter()
            items: list[Evaluator] = []
            if self.peek()[1] != "]":
                items.append(self.or_expr())
                while self.peek()[:2] == ("op", ","):
                    self.take()
                    items.append(self.or_expr())
            self.expect("]")
            self.depth -= 1
            return lambda s: [item(s) for item in items]
        if kind == "name":
            raise ExpressionSyntaxError(
                f"unknown name {value!r} (write values as ${{task.key}}, 'text', 1, true, null)",
                column=col,
            )
        raise ExpressionSyntaxError(f"unexpected {_describe(kind, value)}", column=col)


def _describe(kind: str, value: str) -> str:
    return "end of expression" if kind == "end" else repr(value)


class Expression:
    """A compiled expression: ``evaluate(scope)`` returns its value; ``refs`` lists references."""

    __slots__ = ("_eval", "refs", "source")

    def __init__(self, source: str, evaluator: Evaluator, refs: list[Ref]) -> None:
        self.source = source
        self._eval = evaluator
        self.refs = refs

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def evaluate(self, scope: Scope) -> Any:
        """The expression's value; raises TemplateError / ExpressionError on bad data."""
        return self._eval(scope)


def compile_expression(text: str) -> Expression:
    """Parse *text* once.

    Raises:
      ExpressionSyntaxError: the text is not an expression of the language above.
    """
    if not isinstance(text, str):
        raise ExpressionSyntaxError(f"expected an expression string, got {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionSyntaxError(f"expression longer than {MAX_EXPRESSION_LENGTH} characters")
    if not text.strip():
        raise ExpressionSyntaxError("empty expression")
    parser = _Parser(text)
    evaluator = parser.parse()
    return Expression(text, evaluator, parser.refs)
