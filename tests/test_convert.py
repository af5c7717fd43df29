"""Converters from Alpaca, ShareGPT and OpenAI files to MiniMind JSONL: exact output rows, bad lines, the CLI.
`.venv/bin/pytest tests/test_convert.py`."""

import json
import subprocess
import sys

import pytest

from minimind import MiniMindError
from minimind.chat import render
from minimind.data.convert import convert_file, detect_format
from minimind.data.formats import parse_row

CALC = {"type": "function", "function": {"name": "calc", "description": "evaluate arithmetic",
                                         "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}


def write_jsonl(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def convert(tmp_path, src, fmt="auto"):
    out = tmp_path / "out" / "converted.jsonl"
    written, bad = convert_file(src, out, fmt=fmt)
    rows = read_jsonl(out)
    assert written == len(rows)
    kind = "dpo" if "chosen" in rows[0] else "sft"
    for row in rows:  # every converted row loads and renders
        parsed = parse_row(row, kind)
        for messages in ([parsed["messages"]] if kind == "sft" else [parsed["chosen"], parsed["rejected"]]):
            render(messages, parsed["tools"])
    return rows, [str(b) for b in bad]


def test_alpaca_json_array(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet me.", "input": "", "output": "Hello!", "system": "Be kind.",
         "history": [["Who are you?", "A small model."]]},
        {"instruction": "", "input": "", "output": "orphan"},
    ], indent=2, ensure_ascii=False), encoding="utf-8")
    rows, bad = convert(tmp_path, src)
    assert rows == [
        {"conversations": [{"role": "user", "content": "Add the numbers.\n2 and 3"},
                           {"role": "assistant", "content": "5"}]},
        {"conversations": [{"role": "system", "content": "Be kind."},
                           {"role": "user", "content": "Who are you?"},
                           {"role": "assistant", "content": "A small model."},
                           {"role": "user", "content": "Greet me."},
                           {"role": "assistant", "content": "Hello!"}]},
    ]
    # indent=2 puts the third element's opening brace on line 19.
    assert bad == [f"{src}:19: message 0: empty user content"]


def test_json_array_with_trailing_garbage(tmp_path):
    src = tmp_path / "a.json"
    src.write_text('[{"instruction": "Q", "output": "A"}]\n\n]\n', encoding="utf-8")
    rows, bad = convert(tmp_path, src)
    assert len(rows) == 1 and bad == [f"{src}:3: extra data after the JSON array"]


def test_alpaca_jsonl_bad_lines(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", {"instruction": "Q", "output": "A"}, "{broken",
                      {"instruction": "Q", "output": 3}, {"instruction": "Q", "history": "x", "output": "A"},
                      {"output": "A"})
    rows, bad = convert(tmp_path, src)
    assert rows == [{"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    assert bad == [f"{src}:2: invalid JSON: Expecting property name enclosed in double quotes at column 2",
                   f"{src}:3: 'output' must be a string, got number",
                   f"{src}:4: 'history' must be an array of [question, answer] pairs, got string",
                   f"{src}:5: missing field 'instruction'"]


def test_alpaca_dpo(tmp_path):
    src = write_jsonl(tmp_path / "dpo.jsonl",
                      {"instruction": "Capital of France?", "input": "", "chosen": "Paris.", "rejected": "Rome."},
                      {"instruction": "Q", "output": "plain sft row"})
    rows, bad = convert(tmp_path, src)
    user = {"role": "user", "content": "Capital of France?"}
    assert rows == [{"chosen": [user, {"role": "assistant", "content": "Paris."}],
                     "rejected": [user, {"role": "assistant", "content": "Rome."}]}]
    assert bad == [f"{src}:2: a sft row in a file of dpo rows"]


def test_sharegpt_with_tools_and_function_calls(tmp_path):
    src = write_jsonl(tmp_path / "sharegpt.jsonl", {
        "system": "You are helpful.", "tools": json.dumps([CALC]),
        "conversations": [
            {"from": "human", "value": "What is 6 * 7?"},
            {"from": "function_call", "value": json.dumps({"name": "calc", "arguments": {"expr": "6 * 7"}})},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "It is 42."},
        ]}, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]})
    rows, bad = convert(tmp_path, src)
    assert rows == [
        {"conversations": [
            {"role": "system", "content": "You are helpful.", "tools": [CALC]},
            {"role": "user", "content": "What is 6 * 7?"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "arguments": {"expr": "6 * 7"}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "It is 42."}]},
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    assert bad == [f"{src}:3: message 1 has 'from' 'bot'; expected one of human, user, gpt, assistant, system, "
                   "function_call, observation, tool"]


def test_sharegpt_tools_without_system_go_top_level(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", {"tools": [CALC], "conversations": [
        {"from": "human", "value": "6 * 7?"}, {"from": "function_call", "value": {"name": "calc",
                                                                                 "arguments": "{\"expr\": \"6*7\"}"}},
        {"from": "tool", "value": "42"}, {"from": "gpt", "value": "42"}]})
    rows, _ = convert(tmp_path, src, fmt="sharegpt")
    assert rows[0]["tools"] == [CALC]
    assert rows[0]["conversations"][1]["tool_calls"] == [{"name": "calc", "arguments": {"expr": "6*7"}}]


def test_sharegpt_dpo(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", {"conversations": [{"from": "human", "value": "Q"}],
                                             "chosen": {"from": "gpt", "value": "good"},
                                             "rejected": {"from": "gpt", "value": "bad"}})
    rows, _ = convert(tmp_path, src)
    assert rows == [{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                     "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}]


def test_openai_messages(tmp_path):
    src = write_jsonl(tmp_path / "openai.jsonl", {"tools": [CALC], "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "6 * 7?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "Use calc.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": "{\"expr\": \"6*7\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "42"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "name": "bot"}]})
    rows, bad = convert(tmp_path, src)
    assert rows == [
        {"conversations": [
            {"role": "system", "content": "Use tools.", "tools": [CALC]},
            {"role": "user", "content": "6 * 7?"},
            {"role": "assistant", "content": "", "reasoning_content": "Use calc.",
             "tool_calls": [{"name": "calc", "arguments": {"expr": "6*7"}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "42"}]},
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    assert bad == []


def test_openai_preference_rows(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", {"prompt": "Q", "chosen": "good", "rejected": "bad"})
    rows, _ = convert(tmp_path, src)
    assert rows == [{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                     "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}]


@pytest.mark.parametrize("row,fmt", [
    ({"instruction": "x", "output": "y"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "x"}]}, "openai"),
    ({"conversations": [{"role": "user", "content": "x"}]}, "openai"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_nothing_convertible_writes_nothing(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", {"foo": 1})
    out = tmp_path / "out.jsonl"
    with pytest.raises(MiniMindError, match=r"no rows converted, .*out.jsonl not written; first problem: .*x.jsonl:1: "
                                            r"cannot tell the format"):
        convert_file(src, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # no temp file left behind


def test_cli_convert(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", {"instruction": "Q", "output": "A"}, {"instruction": "Q"})
    out = tmp_path / "sft.jsonl"
    proc = subprocess.run([sys.executable, "-m", "minimind", "data", "convert", str(src), "--out", str(out),
                           "--from", "alpaca"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 1 rows to {out} (1 bad lines skipped)"
    assert proc.stderr.strip() == f"{src}:2: missing field 'output'"
    assert read_jsonl(out) == [{"conversations": [{"role": "user", "content": "Q"},
                                                  {"role": "assistant", "content": "A"}]}]
    check = subprocess.run([sys.executable, "-m", "minimind", "data", "check", str(out)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == f"{out}: sft, 1 valid rows, 0 bad lines"
