"""The sandboxed tools a model may call (calculator, unit conversion): our own parsers over the arguments,
never `eval` of model text, bounded input and output. `run_tool("calculator", {"expression": "2*3"})`."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MAX_EXPRESSION = 200  # characters: bounds the parser's work (and its recursion) on hostile input
MAX_OUTPUT = 1000  # characters of tool output fed back to the model


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


CALCULATOR_TOOL = _function(
    "calculator", "Evaluate an arithmetic expression with + - * / and parentheses.",
    {"expression": {"type": "string", "description": "for example 23*45"}}, ["expression"])
UNIT_TOOL = _function(
    "unit_convert", "Convert a quantity between units of length (km, m, cm, mm), mass (kg, g) or time (h, min, s).",
    {"value": {"type": "number", "description": "the quantity, for example 3.5"},
     "from_unit": {"type": "string", "description": "for example km"},
     "to_unit": {"type": "string", "description": "for example m"}},
    ["value", "from_unit", "to_unit"])


# ---- calculator --------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?)|(.))")  # ASCII digits only: \d would take ① or ２


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    try:
        number = float(value)
    except OverflowError:
        return "error: result too large"
    if abs(number) < 1e-4:  # six decimals would print 1e-7 as 0: keep six significant digits instead
        return f"{number:.6g}"
    return f"{number:.6f}".rstrip("0").rstrip(".")


def calculator(expression: str) -> str:
    """The `calculator` tool: + - * / and parentheses on decimal numbers, parsed by hand (model output is
    data, never code). Returns the result as text, or "error: ..." for anything else."""
    expression = str(expression)
    # NFKC (for full-width operators) would turn ① into 1 and 2² into 22: numbers are ASCII digits or an error.
    digit = next((c for c in expression if c.isnumeric() and not c.isascii()), None)
    if digit is not None:
        return f"error: numbers must use the digits 0-9, not {digit!r}"
    expression = unicodedata.normalize("NFKC", expression).replace("×", "*").replace("÷", "/").strip()
    if not expression or len(expression) > MAX_EXPRESSION:
        return f"error: expression must be 1-{MAX_EXPRESSION} characters"
    tokens = [m.group(1) or m.group(2) for m in _TOKEN_RE.finditer(expression) if (m.group(1) or m.group(2)).strip()]
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> Fraction:
        value = factor()
        while peek() in ("*", "/"):
            if take() == "*":
                value *= factor()
            else:
                divisor = factor()
                if divisor == 0:
                    raise ValueError("division by zero")
                value /= divisor
        return value

    def factor() -> Fraction:
        token = peek()
        if token in ("+", "-"):
            take()
            return factor() if token == "+" else -factor()
        if token == "(":
            take()
            value = expr()
            if peek() != ")":
                raise ValueError("missing )")
            take()
            return value
        if token is None or not token[0].isdigit():
            raise ValueError(f"unexpected {token!r}" if token else "unexpected end")
        return Fraction(take())

    try:
        value = expr()
        if peek() is not None:
            raise ValueError(f"unexpected {peek()!r}")
    except ValueError as e:
        return f"error: {e}"
    return _format(value)


# ---- unit conversion ---------------------------------------------------------------------------------

# unit -> (dimension, size in the dimension's base unit); names in English and Chinese are accepted.
UNITS: dict[str, tuple[str, Fraction]] = {
    "km": ("length", Fraction(1000)), "m": ("length", Fraction(1)), "cm": ("length", Fraction(1, 100)),
    "mm": ("length", Fraction(1, 1000)), "kg": ("mass", Fraction(1000)), "g": ("mass", Fraction(1)),
    "h": ("time", Fraction(3600)), "min": ("time", Fraction(60)), "s": ("time", Fraction(1)),
}
UNIT_NAMES = {
    "kilometer": "km", "kilometers": "km", "千米": "km", "公里": "km", "meter": "m", "meters": "m", "米": "m",
    "centimeter": "cm", "centimeters": "cm", "厘米": "cm", "millimeter": "mm", "millimeters": "mm", "毫米": "mm",
    "kilogram": "kg", "kilograms": "kg", "千克": "kg", "公斤": "kg", "gram": "g", "grams": "g", "克": "g",
    "hour": "h", "hours": "h", "小时": "h", "minute": "min", "minutes": "min", "分钟": "min",
    "second": "s", "seconds": "s", "秒": "s",
}


def _unit(name: Any) -> str:
    key = str(name).strip().lower()
    key = UNIT_NAMES.get(key, key)
    if key not in UNITS:
        raise ValueError(f"unknown unit {str(name)[:20]!r}; known: {', '.join(UNITS)}")
    return key


def unit_convert(value: Any, from_unit: Any, to_unit: Any) -> str:
    """The `unit_convert` tool: exact conversion within one dimension; "error: ..." for anything else."""
    try:
        text = str(value).strip()
        if len(text) > 30 or not re.fullmatch(r"-?\d+(?:\.\d+)?", text):
            raise ValueError(f"value must be a number, not {text[:30]!r}")
        src, dst = _unit(from_unit), _unit(to_unit)
        if UNITS[src][0] != UNITS[dst][0]:
            raise ValueError(f"cannot convert {UNITS[src][0]} ({src}) to {UNITS[dst][0]} ({dst})")
    except ValueError as e:
        return f"error: {e}"
    return _format(Fraction(text) * UNITS[src][1] / UNITS[dst][1])


# ---- the registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    schema: dict  # the OpenAI function schema shown to the model
    run: Callable[..., str]  # keyword arguments as named in the schema

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


TOOLS: dict[str, Tool] = {t.name: t for t in (Tool(CALCULATOR_TOOL, calculator), Tool(UNIT_TOOL, unit_convert))}


def tool_schemas(names: Sequence[str] | None = None) -> list[dict]:
    """The schemas of the named tools (all when None), for a chat's `tools` list."""
    unknown = [n for n in names or () if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool {unknown[0]!r}; available: {', '.join(TOOLS)}")
    return [TOOLS[n].schema for n in (names or TOOLS)]


def run_tool(name: str, arguments: dict | str) -> str:
    """Run one tool call as the model wrote it. Never raises: a bad name or bad arguments come back as an
    "error: ..." text, which is what the model sees as the tool's response."""
    tool = TOOLS.get(str(name))
    if tool is None:
        return f"error: unknown tool {str(name)[:40]!r}; available: {', '.join(TOOLS)}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):  # also a 5,000-digit number (int-str limit) or 100,000-deep nesting
            return "error: arguments are not valid JSON"
    if not isinstance(arguments, dict):
        return "error: arguments must be a JSON object"
    params = tool.schema["function"]["parameters"]
    missing = [k for k in params["required"] if k not in arguments]
    extra = [k for k in arguments if k not in params["properties"]]
    if missing or extra:
        return f"error: {tool.name} takes {', '.join(params['properties'])}" + (
            f"; missing {', '.join(missing)}" if missing else f"; unexpected {', '.join(map(str, extra))[:60]}")
    try:
        return tool.run(**arguments)[:MAX_OUTPUT]
    except (ValueError, RecursionError):  # str() of a 5,000-digit int or of a 100,000-deep list, given as a dict
        return f"error: {tool.name} arguments are too large or too deeply nested"


# ---- the tool loop ------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One tool call a conversation made: what the model wrote and what the sandbox answered."""

    name: str
    arguments: str
    result: str
    valid: bool  # the tool exists and accepted the arguments (the result is not an error)


class ToolLoop:
    """THE tool loop of one conversation, whoever drives it (the terminal chat, the web page, agentic RL
    rollouts, which run many at once): after each assistant message, `step` runs the message's calls in the
    sandbox and returns the tool messages to append before the model goes on, or None when the turn is over:
    the message called nothing (`finished`), or `max_rounds` rounds of calls were answered already (its calls
    are left unrun: nobody would read their results)."""

    def __init__(self, max_rounds: int, run: Callable[[str, str], str] = run_tool) -> None:
        self.max_rounds, self.run = max_rounds, run
        self.rounds = 0
        self.finished = False
        self.calls: list[ToolCall] = []

    def step(self, message: dict) -> list[dict] | None:
        calls = message.get("tool_calls") or []
        if not calls:
            self.finished = True
            return None
        if self.rounds == self.max_rounds:
            return None
        self.rounds += 1
        replies = []
        for call in calls:
            fn = call["function"]
            result = self.run(fn["name"], fn["arguments"])
            self.calls.append(ToolCall(fn["name"], fn["arguments"], result, not result.startswith("error")))
            reply = {"role": "tool", "content": result}
            if "id" in call:  # OpenAI clients pair results with calls by id
                reply["tool_call_id"] = call["id"]
            replies.append(reply)
        return replies
