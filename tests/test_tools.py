"""The sandboxed tools: exact results, and every bad call answered with an error text, never an exception."""

import json

import pytest

from minimind.tools import TOOLS, run_tool, tool_schemas


@pytest.mark.parametrize("args, expected", [
    ({"expression": "23*45"}, "1035"), ({"expression": "(1 + 2) * 3 - 4 / 8"}, "8.5"),
    ('{"expression": "7/3"}', "2.333333"),
    ({"expression": "2×3÷4"}, "1.5"), ({"expression": "-(-5)"}, "5"),
])
def test_calculator(args, expected):
    assert run_tool("calculator", args) == expected


@pytest.mark.parametrize("value, src, dst, expected", [
    (3.5, "km", "m", "3500"), (90, "分钟", "小时", "1.5"), ("2500", "grams", "kg", "2.5"), (2, "h", "s", "7200"),
    (15, "mm", "cm", "1.5"),
])
def test_unit_convert(value, src, dst, expected):
    assert run_tool("unit_convert", {"value": value, "from_unit": src, "to_unit": dst}) == expected


@pytest.mark.parametrize("name, args, fragment", [
    ("calculator", {"expression": "__import__('os').system('x')"}, "unexpected"),
    ("calculator", {"expression": "1/0"}, "division by zero"),
    ("calculator", {"expression": "(" * 150 + "1" + ")" * 150}, "1-200 characters"),
    ("calculator", {"expression": "2**10"}, "unexpected"),
    ("calculator", "{not json", "not valid JSON"),
    ("calculator", "[1, 2]", "JSON object"),
    ("calculator", {}, "missing expression"),
    ("calculator", {"expression": "1", "x": 2}, "unexpected x"),
    ("unit_convert", {"value": 1, "from_unit": "kg", "to_unit": "m"}, "cannot convert mass"),
    ("unit_convert", {"value": "1e9", "from_unit": "kg", "to_unit": "g"}, "must be a number"),
    ("unit_convert", {"value": 1, "from_unit": "parsec", "to_unit": "m"}, "unknown unit"),
    ("rm", {}, "unknown tool"),
])
def test_bad_calls_are_error_texts(name, args, fragment):
    out = run_tool(name, args)
    assert out.startswith("error:") and fragment in out


def test_schemas():
    assert [s["function"]["name"] for s in tool_schemas()] == list(TOOLS)
    assert tool_schemas(["unit_convert"])[0]["function"]["parameters"]["required"] == ["value", "from_unit", "to_unit"]
    with pytest.raises(ValueError, match="unknown tool"):
        tool_schemas(["nope"])


def test_tool_loop_runs_calls_until_a_message_calls_nothing_or_the_round_limit():
    from minimind.tools import ToolLoop

    def calling(expression, call_id=None):
        args = json.dumps({"expression": expression})
        call = {"type": "function", "function": {"name": "calculator", "arguments": args}}
        return {"role": "assistant", "content": "", "tool_calls": [call | ({"id": call_id} if call_id else {})]}

    loop = ToolLoop(max_rounds=2)
    assert loop.step(calling("2*3", "call_1")) == [{"role": "tool", "content": "6", "tool_call_id": "call_1"}]
    assert loop.step(calling("1/0")) == [{"role": "tool", "content": loop.calls[1].result}]
    assert loop.calls[0].valid and not loop.calls[1].valid and loop.calls[1].result.startswith("error")
    ran = []
    loop.run = lambda name, args: ran.append(name) or "x"
    assert loop.step(calling("1+1")) is None and ran == [] and not loop.finished  # third round: left unrun
    done = ToolLoop(max_rounds=2)
    assert done.step({"role": "assistant", "content": "5"}) is None and done.finished and done.calls == []


def _deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BIG_INT = "1" + "0" * 5000  # past Python's int-str limit (4300 digits)
DEEP = "[" * 100_000 + "]" * 100_000  # past the recursion limit


@pytest.mark.parametrize("name, args, expected", [
    ("calculator", f'{{"expression": {BIG_INT}}}', "error: arguments are not valid JSON"),
    ("calculator", f'{{"expression": {DEEP}}}', "error: arguments are not valid JSON"),
    ("calculator", {"expression": 10**5000}, "error: calculator arguments are too large or too deeply nested"),
    ("unit_convert", {"value": 1, "from_unit": _deep_list(100_000), "to_unit": "m"},
     "error: unit_convert arguments are too large or too deeply nested"),
])
def test_run_tool_never_raises_on_hostile_arguments(name, args, expected):
    assert run_tool(name, args) == expected


@pytest.mark.parametrize("expression, expected", [
    ("①+②", "error: numbers must use the digits 0-9, not '①'"),  # NFKC would make it 1+2
    ("2²", "error: numbers must use the digits 0-9, not '²'"),  # NFKC would make it 22
    ("１２+1", "error: numbers must use the digits 0-9, not '１'"),
    ("٣+1", "error: numbers must use the digits 0-9, not '٣'"),
    ("（1+2）＊3", "9"),  # full-width operators are still read as their ASCII forms
    ("1/10000000", "1e-07"), ("-1/3000000", "-3.33333e-07"), ("1/20000", "5e-05"),  # not "0"
    ("1/10000", "0.0001"), ("1/3", "0.333333"), ("12345.678*1", "12345.678"),
])
def test_calculator_digits_and_small_results(expression, expected):
    assert run_tool("calculator", {"expression": expression}) == expected
