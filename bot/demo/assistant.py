"""What the demo model says: deterministic answers by intent, so the demo feels like a small assistant.

A greeting lists what the bot can do (from the tools the request offers); arithmetic and percentages ask for the
`calculate` tool and a question about the time for `get_current_time`, and the answer after the bot ran the tool
quotes the tool's result (never a number worked out here); anything else gets a short answer marked as simulated,
with the turn number and the user's previous message, so multi-turn context stays visible.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ToolRequest", "after_tool", "answer"]

CALCULATE = "calculate"
CLOCK = "get_current_time"
QUOTE_CHARS = 60

_GREETING_RE = re.compile(
    r"^\W*(hi|hello|hey|hiya|howdy|greetings|good (morning|afternoon|evening)|hallo|hola|bonjour)\b"
    r"|what can you do|who are you|\bhelp\b",
    re.IGNORECASE,
)
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
_PERCENT_RE = re.compile(rf"({_NUMBER})\s*(?:%|percent|per cent)\s+of\s+({_NUMBER})", re.IGNORECASE)
_OPERATORS = {
    "+": "+",
    "-": "-",
    "*": "*",
    "x": "*",
    "×": "*",
    "/": "/",
    "÷": "/",
    "^": "**",
    "**": "**",
    "plus": "+",
    "minus": "-",
    "times": "*",
    "multiplied by": "*",
    "divided by": "/",
    "over": "/",
    "to the power of": "**",
}
_OPERATOR = "|".join(re.escape(op) for op in sorted(_OPERATORS, key=len, reverse=True))
_OPERAND = rf"\(*\s*-?\s*(?:{_NUMBER})\s*\)*"
_EXPRESSION_RE = re.compile(rf"{_OPERAND}(?:\s*(?:{_OPERATOR})\s*{_OPERAND})+", re.IGNORECASE)
_DATE_RE = re.compile(r"\d{4}-\d{1,2}-\d{1,2}")
_TOKEN_RE = re.compile(rf"({_NUMBER})|({_OPERATOR})|([()])", re.IGNORECASE)
_TIME_RE = re.compile(
    r"\bwhat(?:'s|’s| is)?\s+(?:the\s+)?(?:current\s+)?time\b|\btime is it\b|\bcurrent time\b|\bwhat day is it\b",
    re.IGNORECASE,
)
_ZONE_RE = re.compile(r"\b([A-Z][A-Za-z]+(?:/[A-Z][A-Za-z_+-]+)+|UTC)\b")
_CITIES = {
    "amsterdam": "Europe/Amsterdam",
    "berlin": "Europe/Berlin",
    "dubai": "Asia/Dubai",
    "hong kong": "Asia/Hong_Kong",
    "lisbon": "Europe/Lisbon",
    "london": "Europe/London",
    "los angeles": "America/Los_Angeles",
    "madrid": "Europe/Madrid",
    "mumbai": "Asia/Kolkata",
    "new york": "America/New_York",
    "paris": "Europe/Paris",
    "rome": "Europe/Rome",
    "san francisco": "America/Los_Angeles",
    "sao paulo": "America/Sao_Paulo",
    "singapore": "Asia/Singapore",
    "sydney": "Australia/Sydney",
    "tokyo": "Asia/Tokyo",
}
_ABILITIES = {
    CALCULATE: 'calculate exactly: sums, percentages, any arithmetic (try "What\'s 17% of 2,340?")',
    CLOCK: 'tell the current date and time in any time zone (try "What time is it in Tokyo?")',
}
_TRY = 'Try "What\'s 17% of 2,340?" or "What time is it?".'


@dataclass(frozen=True)
class ToolRequest:
    """The model asks the bot to run tool `name` with `arguments` before it answers."""

    name: str
    arguments: dict[str, Any]


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return f'"{text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…"}"'


def _greeting(tools: dict[str, str]) -> str:
    lines = ["Hi! I'm wabot, your WhatsApp assistant. Here I run on the demo model, a simulator, not a real AI."]
    abilities = [_ABILITIES.get(name, f"{name}: {description}") for name, description in tools.items()]
    lines.append("What I can do:" if abilities else "With a real model I answer questions in plain language.")
    lines += [f"• {ability}" for ability in abilities]
    lines.append("• remember our conversation, turn by turn")
    lines.append(
        "• answer within the reply deadline; if the model needs longer, I send a short holding reply "
        "and the answer follows as soon as it is ready"
    )
    return "\n".join(lines)


def expression_in(text: str) -> tuple[str, str] | None:
    """(the question as the user wrote it, an expression `calculate` accepts), or None when there is no sum."""
    percent = _PERCENT_RE.search(text)
    if percent:
        share, base = (_plain(n) for n in percent.groups())
        return percent.group(0), f"{share}*{base}/100"
    for match in _EXPRESSION_RE.finditer(text):
        written = match.group(0).strip()
        if _DATE_RE.fullmatch(written):
            continue  # 2026-11-26 is a date, not a subtraction
        tokens = []
        for number, operator, paren in _TOKEN_RE.findall(written):
            tokens.append(_plain(number) if number else _OPERATORS[operator.lower()] if operator else paren)
        if any(token in ("+", "-", "*", "/", "**") for token in tokens[1:]):
            return written, "".join(tokens)
    return None


def _plain(number: str) -> str:
    return number.replace(",", "")


def _zone_in(text: str) -> str:
    lowered = text.lower()
    for city, zone in _CITIES.items():
        if city in lowered:
            return zone
    named = _ZONE_RE.search(text)
    return named.group(1) if named else "UTC"


def _fallback(text: str, turn: int, earlier: str | None) -> str:
    said = f"A real model would answer {_quote(text)} here." if text else "A real model would answer you here."
    context = f"Your previous message was {_quote(earlier)}." if earlier else _TRY
    return f"[turn {turn}] (demo model) {said} {context}"


def answer(text: str, turn: int, tools: dict[str, str], earlier: str | None = None) -> str | ToolRequest:
    """The demo model's reply to the user's turn `text` (directives removed), turn number `turn`.

    `tools` maps the function tools the request offers to their descriptions; `earlier` is the previous turn's
    text, if any. A ToolRequest means: call that tool first, then `after_tool` answers.
    """
    calculation = expression_in(text)
    if calculation is not None:
        if CALCULATE in tools:
            return ToolRequest(CALCULATE, {"expression": calculation[1]})
        return f"[turn {turn}] (demo model) I would use a calculator for {calculation[0]}, but none was offered."
    if _TIME_RE.search(text):
        if CLOCK in tools:
            return ToolRequest(CLOCK, {"timezone": _zone_in(text)})
        return f"[turn {turn}] (demo model) I would look at a clock for that, but none was offered."
    if _GREETING_RE.search(text):
        return _greeting(tools)
    return _fallback(text, turn, earlier)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.12g}"


def after_tool(text: str, name: str, output: str) -> str:
    """The answer once the bot ran tool `name` for the user's turn `text` and sent back `output` (its JSON)."""
    try:
        result = json.loads(output)
    except json.JSONDecodeError:
        result = {"error": output}
    if not isinstance(result, dict):
        result = {"result": result}
    if "error" in result:
        return f"Sorry, the {name} tool could not help with that: {result['error']}."
    if name == CALCULATE and "result" in result:
        calculation = expression_in(text)
        question = calculation[0] if calculation else result.get("expression", "That")
        return f"{question} is {_number(result['result'])}."
    if name == CLOCK and "iso" in result:
        try:
            when = dt.datetime.fromisoformat(str(result["iso"]))
        except ValueError:
            return f"The {name} tool says: {result['iso']}."
        weekday = result.get("weekday") or f"{when:%A}"
        return f"It's {when:%H:%M} on {weekday}, {when.day} {when:%B %Y} ({result.get('timezone', 'UTC')})."
    return f"The {name} tool says: {json.dumps(result)}"
