"""Function tools the model may call: a small registry and two example tools.

Add a tool by decorating an async function with `@registry.tool(...)`; its JSON schema is sent with every model
call (strict mode, so the arguments always match it).
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from openai.types.responses import FunctionToolParam

ToolFunc = Callable[..., Awaitable[Any]]


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the model, not to the user."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    func: ToolFunc

    def spec(self) -> FunctionToolParam:
        """The Responses API function-tool definition."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": True,
        }


class ToolRegistry:
    """Named tools, looked up by the name the model asks for."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def tool(self, name: str, description: str, properties: dict[str, Any]) -> Callable[[ToolFunc], ToolFunc]:
        """Register an async function as a tool; every property is required (strict mode)."""

        def register(func: ToolFunc) -> ToolFunc:
            parameters = {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            }
            self._tools[name] = Tool(name, description, parameters, func)
            return func

        return register

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[FunctionToolParam]:
        return [tool.spec() for tool in self._tools.values()]


registry = ToolRegistry()


@registry.tool(
    "get_current_time",
    "The current date and time in an IANA time zone such as 'Europe/Berlin' or 'UTC'.",
    {"timezone": {"type": "string", "description": "IANA time zone name"}},
)
async def get_current_time(timezone: str) -> dict[str, str]:
    try:
        zone = ZoneInfo(timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolError(f"unknown time zone {timezone!r}") from exc
    now = dt.datetime.now(zone)
    return {"timezone": str(zone), "iso": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A")}


_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_MAX_EXPRESSION_CHARS = 200
_MAX_EXPONENT = 100
# Every intermediate integer stays under this many bits (about 1,200 digits). A bound on the exponent alone is not
# enough: "(((10**100)**100)**100)**100" has only small exponents and would block the event loop (every user's
# webhook) for minutes; and an integer over 4,300 digits cannot even be turned into the JSON the model gets back.
_MAX_INT_BITS = 4096


def _checked(value: float) -> float:
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ToolError("number too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("number too large")
    return value


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return _checked(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            # An unbounded power would let one message burn the CPU for minutes: check before computing.
            if abs(right) > _MAX_EXPONENT:
                raise ToolError("exponent too large")
            exact = isinstance(left, int) and isinstance(right, int) and right > 0
            if exact and int(left).bit_length() * right > _MAX_INT_BITS + right:
                raise ToolError("number too large")
        return _checked(_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _checked(_OPERATORS[type(node.op)](_evaluate(node.operand)))
    raise ToolError("only numbers and + - * / // % ** are allowed")


@registry.tool(
    "calculate",
    "Evaluate an arithmetic expression exactly, e.g. '250000 * 0.07'. Numbers and + - * / // % ** only.",
    {"expression": {"type": "string", "description": "the arithmetic expression"}},
)
async def calculate(expression: str) -> dict[str, float | str]:
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolError("expression too long")
    try:
        tree = ast.parse(expression, mode="eval")
        result = _evaluate(tree)
    except (SyntaxError, ZeroDivisionError, OverflowError) as exc:
        raise ToolError(f"cannot evaluate: {exc.__class__.__name__}") from exc
    return {"expression": expression, "result": result}
