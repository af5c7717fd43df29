"""Data formats: row validation and normalisation, exact `file:line: problem` reports, kind detection, checks.
`.venv/bin/pytest tests/test_formats.py`."""

import json
import subprocess
import sys

import pytest
from conftest import CORPUS

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.data.formats import BadLine, check_file, detect_kind, format_report, iter_rows, parse_row

U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}

# MiniMind's own SFT layout: tools on the system message and tool_calls as JSON-encoded strings.
MINIMIND_SFT = {"conversations": [
    {"role": "system", "content": "You can use tools.", "tools": json.dumps(
        [{"type": "function", "function": {"name": "calculate_math", "parameters": {"type": "object"}}}])},
    {"role": "user", "content": "256 * 37?"},
    {"role": "assistant", "content": "",
     "tool_calls": '[{"name":"calculate_math","arguments":{"expression":"256 * 37"}}]'},
    {"role": "tool", "content": '{"result":"9472"}'},
    {"role": "assistant", "content": "9472", "reasoning_content": "The tool says 9472."}]}


def write(path, *lines):
    """Lines as given: dicts and lists are JSON-encoded, strings written raw ('' makes a blank line)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def problems(path, kind):
    bad: list[BadLine] = []
    rows = list(iter_rows(path, kind, bad))
    return rows, [str(b) for b in bad]


# ---------------------------------------------------------------------------------------------- valid rows


def test_minimind_sft_row_with_json_string_tools_and_reasoning():
    row = parse_row(MINIMIND_SFT, "sft")
    assert row["tools"] == [{"type": "function", "function": {"name": "calculate_math",
                                                              "parameters": {"type": "object"}}}]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert row["messages"][2]["tool_calls"] == [
        {"type": "function", "function": {"name": "calculate_math", "arguments": {"expression": "256 * 37"}}}]
    assert row["messages"][4]["reasoning_content"] == "The tool says 9472."
    assert "tools" not in row["messages"][0]


def test_openai_messages_alias_and_top_level_tools():
    tools = [{"type": "function", "function": {"name": "f"}}]
    row = parse_row({"messages": [U, A], "tools": tools}, "sft")
    assert row == {"messages": [U, A], "tools": tools}


def test_reasoning_only_assistant_turn_is_not_empty():
    parse_row({"conversations": [U, {"role": "assistant", "content": "", "reasoning_content": "hmm"}]}, "sft")


def test_agent_rl_row_drops_the_placeholder_and_keeps_gt():
    row = parse_row({"conversations": [MINIMIND_SFT["conversations"][0], {"role": "user", "content": "256 * 37?"},
                                       {"role": "assistant", "content": "无"}], "gt": ["9472"]}, "rl")
    assert [m["role"] for m in row["messages"]] == ["system", "user"]
    assert row["gt"] == ["9472"] and row["answer"] is None
    assert row["tools"][0]["function"]["name"] == "calculate_math"


def test_rl_row_ending_with_user_and_numeric_answer():
    assert parse_row({"messages": [U], "answer": 7}, "rl") == {"messages": [U], "answer": "7", "gt": None,
                                                              "tools": None}


def test_dpo_minimind_layout():
    row = parse_row({"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "go away"}]}, "dpo")
    assert row == {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "go away"}], "tools": None}


@pytest.mark.parametrize("prompt", ["hi", [U]])
@pytest.mark.parametrize("chosen", ["hello", [A], A])
def test_dpo_prompt_layout_builds_full_conversations(prompt, chosen):
    row = parse_row({"prompt": prompt, "chosen": chosen, "rejected": "no"}, "dpo")
    assert row["chosen"] == [U, A]
    assert row["rejected"] == [U, {"role": "assistant", "content": "no"}]


def test_txt_pretrain_documents_start_at_their_first_line(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\nfirst doc\nstill first\n\n\nsecond doc\n   \nthird\n", encoding="utf-8")
    assert list(iter_rows(f, "pretrain")) == [(2, {"text": "first doc\nstill first"}),
                                              (6, {"text": "second doc"}), (8, {"text": "third"})]


def test_txt_cannot_hold_chat_rows(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x\n")
    with pytest.raises(MiniMindError, match="a.txt: a .txt file can only hold pretrain text"):
        list(iter_rows(f, "sft"))


# ---------------------------------------------------------------------------------------------- problems


def conv(*messages):
    return {"conversations": list(messages)}


BAD_ROWS = [
    ("sft", "[1, 2]", "row is an array, not a JSON object"),
    ("sft", '"text"', "row is a string, not a JSON object"),
    ("sft", {"text": "x"}, "missing field 'conversations' (or 'messages')"),
    ("sft", {"conversations": "hi"}, "'conversations' must be an array, got string"),
    ("sft", conv({"role": "user", "content": 5}, A), "message 0 content must be a string, got int"),
    ("sft", conv(U, {"role": "bot", "content": "x"}),
     "message 1 has role 'bot'; expected one of system, user, assistant, tool"),
    ("sft", conv({"role": "user", "content": "  "}, A), "message 0: empty user content"),
    ("sft", conv(U, {"role": "assistant", "content": ""}),
     "message 1: empty assistant content (no content, reasoning_content or tool_calls)"),
    ("sft", conv(A), "message 0: assistant turn as the first turn; expected system or user"),
    ("sft", conv(U, U, A), "message 1: user turn after a user turn; expected assistant"),
    ("sft", conv(U, A, A), "message 2: assistant turn after an assistant turn; expected user"),
    ("sft", conv(U, {"role": "system", "content": "s"}, A), "message 1: a system message may only come first"),
    ("sft", conv(U, A, {"role": "tool", "content": "1"}),
     "message 2: a tool message must follow an assistant turn with tool_calls or another tool message"),
    ("sft", conv(U), "conversation ends with a user turn; expected a final assistant turn"),
    ("sft", conv(), "conversation is empty"),
    ("sft", conv(U, {"role": "assistant", "content": "", "tool_calls": "[{"}),
     "message 1 tool_calls is a string but not valid JSON (Expecting property name enclosed in double quotes "
     "at char 2)"),
    ("rl", conv({"role": "system", "content": "s"}, A), "conversation ends with a system turn; expected a final "
                                                         "user turn"),
    ("rl", {"conversations": [U], "gt": "9472"}, "'gt' must be an array, got string"),
    ("rl", {"conversations": [U], "answer": ["x"]}, "'answer' must be a string, got array"),
    ("dpo", {"chosen": [U, A]}, "missing field 'rejected'"),
    ("dpo", {"chosen": "a", "rejected": "b"}, "'chosen' is a string but the row has no 'prompt'"),
    ("dpo", {"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or an array of messages, "
                                                           "got number"),
    ("dpo", {"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, A]},
     "chosen and rejected prompts differ at message 0"),
    ("dpo", {"chosen": [U, A], "rejected": [U]}, "rejected: conversation ends with a user turn; expected a final "
                                                 "assistant turn"),
    ("pretrain", {"txt": "x"}, "missing field 'text'"),
    ("pretrain", {"text": 3}, "'text' must be a string, got number"),
    ("pretrain", {"text": " \n"}, "'text' is empty"),
]


@pytest.mark.parametrize("kind,row,problem", BAD_ROWS)
def test_each_problem_is_reported_at_its_line(tmp_path, kind, row, problem):
    # The bad row sits on line 4, after a good row and a blank line, so line numbers count every line.
    good = {"pretrain": {"text": "ok"}, "sft": conv(U, A), "rl": conv(U), "dpo": {"chosen": [U, A],
                                                                                 "rejected": [U, A]}}[kind]
    f = write(tmp_path / "data.jsonl", good, "", good, row, good)
    rows, bad = problems(f, kind)
    assert bad == [f"{f}:4: {problem}"]
    assert [line for line, _ in rows] == [1, 3, 5]


def test_invalid_json_and_bad_utf8(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": \n{"text": "\xff"}\n')
    _, bad = problems(f, "pretrain")
    assert bad == [f"{f}:2: invalid JSON: Expecting value at column 9", f"{f}:3: not valid UTF-8 (byte 11)"]


def test_without_a_bad_list_the_first_bad_line_raises(tmp_path):
    f = write(tmp_path / "data.jsonl", conv(U, A), conv(U))
    it = iter_rows(f, "sft")
    assert next(it)[0] == 1
    with pytest.raises(MiniMindError, match=r"data.jsonl:2: conversation ends with a user turn"):
        next(it)


def test_missing_file(tmp_path):
    with pytest.raises(MiniMindError, match="nope.jsonl: no such file"):
        list(iter_rows(tmp_path / "nope.jsonl", "sft"))


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("row,kind", [
    ({"text": "x"}, "pretrain"),
    (MINIMIND_SFT, "sft"),
    ({"messages": [U, A]}, "sft"),
    ({"chosen": [U, A], "rejected": [U, A]}, "dpo"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "dpo"),
    (conv(U), "rl"),
    ({"conversations": [U, A], "gt": ["1"]}, "rl"),
    ({"conversations": [U, A], "answer": "1"}, "rl"),
])
def test_detect_kind(tmp_path, row, kind):
    # A bad first line is skipped: detection uses the first valid row.
    assert detect_kind(write(tmp_path / "d.jsonl", "{oops", [1], row)) == kind


def test_detect_kind_txt_and_failure(tmp_path):
    assert detect_kind(tmp_path / "corpus.txt") == "pretrain"
    with pytest.raises(MiniMindError, match="cannot tell the data kind"):
        detect_kind(write(tmp_path / "d.jsonl", "{oops", conv(U, U)))


# ---------------------------------------------------------------------------------------------- check


def test_check_file_counts_every_problem_but_keeps_a_few(tmp_path):
    f = write(tmp_path / "d.jsonl", *([conv(U)] * 5 + [conv(U, A)] * 3))
    report = check_file(f, kind="sft", max_problems=2)
    assert (report.rows, report.n_bad, len(report.bad)) == (3, 5, 2)
    text = format_report(report)
    assert text.splitlines() == [
        f"{f}: sft, 3 valid rows, 5 bad lines",
        f"{f}:1: conversation ends with a user turn; expected a final assistant turn",
        f"{f}:2: conversation ends with a user turn; expected a final assistant turn",
        "... and 3 more bad lines (raise --max-problems to see them)"]


def test_check_file_token_stats_sft(tmp_path, tokenizer):
    rows = [conv(U, {"role": "assistant", "content": text}) for text in CORPUS]
    f = write(tmp_path / "d.jsonl", *rows)
    report = check_file(f, tokenizer=tokenizer)
    lengths = sorted(len(encode_chat(tokenizer, r["conversations"])[0]) for r in rows)
    t = report.tokens
    assert report.kind == "sft" and report.rows == 4 and report.n_bad == 0
    assert (t.min, t.max, t.total) == (lengths[0], lengths[-1], sum(lengths))
    assert t.median == (lengths[1] + lengths[2]) / 2 and t.mean == sum(lengths) / 4
    assert lengths[2] <= t.p95 <= lengths[3]
    assert "tokens per row: min" in format_report(report)


def test_check_file_token_stats_pretrain_txt_dpo_rl(tmp_path, tokenizer):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(CORPUS), encoding="utf-8")
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in CORPUS]
    assert check_file(f, tokenizer=tokenizer).tokens.total == sum(lengths)

    long = {"role": "assistant", "content": CORPUS[0]}
    f = write(tmp_path / "d.jsonl", {"chosen": [U, A], "rejected": [U, long]})
    assert check_file(f, tokenizer=tokenizer).tokens.max == len(encode_chat(tokenizer, [U, long])[0])

    f = write(tmp_path / "r.jsonl", conv(U, A))
    want = len(encode_chat(tokenizer, [U], add_generation_prompt=True)[0])
    assert check_file(f, kind="rl", tokenizer=tokenizer).tokens.max == want


def minimind(*args):
    return subprocess.run([sys.executable, "-m", "minimind", *args], capture_output=True, text=True, timeout=120)


def test_cli_check(tmp_path, tokenizer):
    from minimind.tokenizer import save_tokenizer

    good = write(tmp_path / "good.jsonl", MINIMIND_SFT, conv(U, A))
    tok_dir = tmp_path / "tok"
    save_tokenizer(tokenizer, tok_dir)
    proc = minimind("data", "check", str(good), "--tokenizer", str(tok_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{good}: sft, 2 valid rows, 0 bad lines"
    assert "tokens per row: min" in proc.stdout

    bad = write(tmp_path / "bad.jsonl", conv(U, A), "", conv(U, U))
    proc = minimind("data", "check", str(bad))
    assert proc.returncode == 1
    assert f"{bad}:3: message 1: user turn after a user turn; expected assistant" in proc.stdout.splitlines()

    proc = minimind("data", "check", str(bad), "--kind", "rl")
    assert proc.returncode == 1 and f"{bad}:3:" in proc.stdout

    proc = minimind("data", "check", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "missing.jsonl: no such file" in proc.stderr


def test_deeply_nested_line_is_a_bad_line_not_a_crash(tmp_path):
    deep = '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    f = write(tmp_path / "deep.jsonl", conv(U, A), deep)
    _, bad = problems(f, "sft")
    assert bad == [f"{f}:2: invalid JSON: arrays or objects nested too deeply"]
    proc = minimind("data", "check", str(f))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{f}:2: invalid JSON: arrays or objects nested too deeply" in proc.stdout.splitlines()
