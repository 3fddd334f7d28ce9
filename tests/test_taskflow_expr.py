"""Templating (typing, text rendering, missing values) and the ``when:`` language (never eval)."""

from __future__ import annotations

import pytest

from mfo_actors.taskflow import (
    ExpressionError,
    ExpressionSyntaxError,
    Template,
    TemplateError,
    compile_expression,
    compile_template,
)

SCOPE = {
    "a": {"n": 3, "f": 1.5, "ok": True, "none": None, "items": [10, {"x": "deep"}],
          "d": {"k": "v"}, "s": "text"},
    "input": {"name": "Ada"},
    "flow": {"name": "demo"},
    "run": {"id": "01RUN"},
    "event": {"source": "crm", "type": "user.signup", "payload": {"plan": "pro", "seats": 5}},
}


def render(text: str) -> object:
    compiled = compile_template(text)
    return compiled if isinstance(compiled, str) else compiled.render(SCOPE)


def test_exact_reference_keeps_type() -> None:
    assert render("${a.n}") == 3
    assert render("${a.f}") == 1.5
    assert render("${a.ok}") is True
    assert render("${a.none}") is None
    assert render("${a.d}") == {"k": "v"}
    assert render("${a.items.1.x}") == "deep"
    assert render("${event.payload.seats}") == 5
    assert render("  ${a.n} ".strip()) == 3


def test_embedded_references_render_as_text() -> None:
    assert render("n=${a.n}") == "n=3"
    assert render("${a.ok}/${a.none}/${a.d}") == 'true/null/{"k":"v"}'
    assert render("hi ${input.name} from ${flow.name} (${run.id}) via ${event.source}") == (
        "hi Ada from demo (01RUN) via crm")


def test_plain_strings_and_escapes() -> None:
    assert compile_template("no refs") == "no refs"
    assert compile_template("literal $${a.n}") == "literal ${a.n}"
    assert render("$${x} and ${a.n}") == "${x} and 3"
    assert isinstance(compile_template("${a.n}"), Template)


@pytest.mark.parametrize("text", ["${a.n", "x ${a ${b}", "${}", "${a..b}", "${1abc}", "${a b}"])
def test_malformed_templates(text: str) -> None:
    with pytest.raises(ValueError):
        compile_template(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("${ghost.x}", "task 'ghost' has no outputs"),
        ("${a.missing}", "a has no 'missing'"),
        ("${a.items.5}", "a.items has no 5"),
        ("x ${a.n.deeper}", "a.n has no 'deeper'"),
    ],
)
def test_missing_value_names_the_reference(text: str, fragment: str) -> None:
    compiled = compile_template(text)
    assert isinstance(compiled, Template)
    with pytest.raises(TemplateError) as info:
        compiled.render(SCOPE)
    assert fragment in str(info.value)
    assert str(info.value).startswith("${")


def test_optional_reference_reads_missing_as_null() -> None:
    assert render("${a.missing?}") is None
    assert render("${ghost.x?}") is None
    assert render("${a.n?}") == 3
    assert render("x=${a.missing.deeper?}") == "x=null"
    assert compile_expression("${event.payload.nope?} == null").evaluate(SCOPE) is True


def test_missing_event_is_explained() -> None:
    compiled = compile_template("${event.payload.x}")
    assert isinstance(compiled, Template)
    with pytest.raises(TemplateError, match="not started by an event"):
        compiled.render({"input": {}})


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("${a.n} == 3", True),
        ("${a.n} != 3", False),
        ("${a.n} < 4 and ${a.n} <= 3 and ${a.n} > 2 and ${a.n} >= 3", True),
        ("${a.ok} == true", True),
        ("${a.none} == null", True),
        ("${a.s} == 'text'", True),
        ('${a.s} == "text"', True),
        ("${event.payload.plan} in ['pro', 'team']", True),
        ("${event.payload.plan} not in ['pro', 'team']", False),
        ("'x' in ${a.s}", True),
        ("not ${a.ok}", False),
        ("not not ${a.ok}", True),
        ("${a.ok} and (${a.n} == 1 or ${a.n} == 3)", True),
        ("false or null or 0", 0),
        ("${a.f} == 1.5", True),
        ("-2 < ${a.n}", True),
        ("1e3 == 1000", True),
        ("True == true and None == null", True),
        ("[1, [2, 3]] == [1, [2, 3]]", True),
        ("[] == []", True),
        ("'it\\'s' == \"it's\"", True),
        ("${a.d.k} == 'v'", True),
    ],
)
def test_expression_values(expr: str, expected: object) -> None:
    assert compile_expression(expr).evaluate(SCOPE) == expected


def test_short_circuit_skips_missing_values() -> None:
    assert compile_expression("false and ${ghost.x} == 1").evaluate(SCOPE) is False
    assert compile_expression("true or ${ghost.x}").evaluate(SCOPE) is True
    with pytest.raises(TemplateError, match="ghost"):
        compile_expression("true and ${ghost.x} == 1").evaluate(SCOPE)


def test_expression_refs_are_listed() -> None:
    expr = compile_expression("${a.n} == 1 or ${b.x.y} in [${input.k}]")
    assert [r.text for r in expr.refs] == ["a.n", "b.x.y", "input.k"]


def test_incomparable_types_are_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="cannot compare str < int"):
        compile_expression("${a.s} < 1").evaluate(SCOPE)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('touch /tmp/pwned')",
        "open('/etc/passwd')",
        "${a.n}.__class__",
        "().__class__.__bases__[0].__subclasses__()",
        "lambda: 1",
        "[x for x in ${a.items}]",
        "${a.n} + 1",
        "${a.n} == 1; import os",
        "exec('1')",
        "a.n == 1",
        "${a.n} = 3",
        "1 ==",
        "(1 == 1",
        "1 == 1)",
        "[1, 2",
        "'unterminated",
        "1 < 2 < 3",
        "",
        "   ",
        "and",
        "not",
        "'bad \\q escape'",
        "${a.n} ==== 3",
        "`id`",
        "${}",
    ],
)
def test_malicious_and_malformed_expressions_are_syntax_errors(text: str) -> None:
    with pytest.raises(ExpressionSyntaxError):
        compile_expression(text)


def test_limits() -> None:
    with pytest.raises(ExpressionSyntaxError, match="longer than"):
        compile_expression("1 == 1 and " * 500 + "true")
    with pytest.raises(ExpressionSyntaxError, match="nesting"):
        compile_expression("(" * 100 + "1" + ")" * 100)
    with pytest.raises(ExpressionSyntaxError, match="nesting"):
        compile_expression("not " * 100 + "true")
    assert compile_expression("(" * 20 + "1" + ")" * 20).evaluate({}) == 1


def test_syntax_error_reports_column() -> None:
    with pytest.raises(ExpressionSyntaxError) as info:
        compile_expression("${a.n} == 1 and __import__")
    assert info.value.column == 17
    assert "__import__" in str(info.value)


def test_long_and_or_chains_do_not_recurse() -> None:
    # Within the length limit, `1or 1or ...` is ~1,000 operands: evaluating it must not
    # nest one Python call per operand (RecursionError instead of a value).
    chain = "0or " * 1000 + "1"
    assert len(chain) <= 4096
    assert compile_expression(chain).evaluate({}) == 1
    assert compile_expression("1and " * 800 + "0").evaluate({}) == 0
    assert compile_expression("1 and 2 and 3").evaluate({}) == 3
    assert compile_expression("0 or '' or null").evaluate({}) is None
