"""Tool routes (``/api/tools``): echo, uppercase, and a calculator that runs only arithmetic."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

from mfo_actors.client import models as m
from mfo_actors.http import Request, Response
from mfo_actors.mock_server._base import HTTPError, MockPart, allow, decode_json, json_response

__all__ = ["ToolRoutes"]


_TOOLS: tuple[m.Tool, ...] = (
    m.Tool(id="echo", description="Returns its parameters unchanged",
           parameters={"text": {"type": "string", "description": "Anything"}}),
    m.Tool(id="calculator", description="Evaluates an arithmetic expression",
           parameters={"expression": {"type": "string", "description": "e.g. 15 * 7"}},
           example="15 * 7"),
    m.Tool(id="uppercase", description="Upper-cases a text",
           parameters={"text": {"type": "string", "description": "The text"}}),
)

_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def _calculate(expression: str) -> float | int:
    """Arithmetic on numbers only (no names, no calls): safe to run on any input."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / // % ** are allowed")

    if len(expression) > 200:
        raise ValueError("expression too long")
    result = ev(ast.parse(expression, mode="eval"))
    if isinstance(result, float) and result.is_integer():
        return int(result)
    return result  # type: ignore[no-any-return]


class ToolRoutes(MockPart):
    """``/api/tools``: a fixed set of tools."""

    async def _api_tools(self, method: str, rest: list[str], request: Request) -> Response:
        if not rest:
            allow(method, "GET")
            return json_response(m.ToolList(tools=list(_TOOLS)))
        if len(rest) != 1:
            raise HTTPError(404, "not_found", "no such tools endpoint")
        tool = next((t for t in _TOOLS if t.id == rest[0]), None)
        if tool is None:
            raise HTTPError(404, "not_found", f"no tool {rest[0]}")
        if method == "GET":
            return json_response(tool)
        allow(method, "POST")
        params = decode_json(request) or {}
        if not isinstance(params, dict):
            raise HTTPError(400, "invalid_request", "tool parameters must be a JSON object")
        if tool.id == "echo":
            return json_response(m.ToolResult(result=params))
        if tool.id == "uppercase":
            return json_response(m.ToolResult(result=str(params.get("text", "")).upper()))
        expression = params.get("expression")
        if not isinstance(expression, str):
            raise HTTPError(400, "invalid_request", "Missing required field: expression")
        try:
            return json_response(m.ToolResult(result=_calculate(expression)))
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
            raise HTTPError(400, "invalid_expression", str(exc)) from None
