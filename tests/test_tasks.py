"""Generated-task tests: determinism, the train/held-out split, every answer recomputed from its question (by
parsing, never eval), answer extraction from varied model output, the calculator tool. `pytest tests/test_tasks.py`."""

import json
import operator
import re

import pytest

from minimind import MiniMindError
from minimind.chat import render
from minimind.data.formats import parse_row
from minimind.data.tasks import (
    FAMILIES,
    _key,
    arithmetic_drill,
    extract_answer,
    heldout_split,
    is_correct,
    make_dpo_pairs,
    make_tasks,
    prompt_row,
    question_of,
    split_of,
)
from minimind.tools import calculator

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
# Unit names as the questions spell them -> size in the base unit; written here independently of tasks.py.
UNIT_SIZE = {"kilometers": 1000, "meters": 1, "kilograms": 1000, "grams": 1, "hours": 60, "minutes": 1,
             "千米": 1000, "米": 1, "千克": 1000, "克": 1, "小时": 60, "分钟": 1}


@pytest.fixture(scope="module")
def split():
    return heldout_split(1500, 500, seed=0)


def reply_of(row: dict) -> dict:
    return row["conversations"][-1]


def perfect_output(row: dict) -> str:
    """What a model that learned the row would generate for its final turn."""
    reply = reply_of(row)
    return f"<think>\n{reply.get('reasoning_content', '')}\n</think>\n\n{reply['content']}<|im_end|>"


def expected_answer(row: dict) -> str:
    """The answer recomputed from the question text alone."""
    q = question_of(row)
    family = row["task"]
    if family in ("arithmetic", "calculator"):
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", q).groups()
        return str(OPS[op](int(a), int(b)))
    if family == "counting":
        quoted = re.findall(r'"([^"]+)"', q)
        if len(quoted) == 2:  # a letter and a word, in either order
            letter, word = sorted(quoted, key=len)
            return str(word.count(letter))
        return str(len(quoted[0].split()))
    if family in ("units", "converter"):
        value = int(re.search(r"\d+", q).group(0))
        # Longest names first, so that 千克 is not read as 克.
        first, second = re.findall("|".join(sorted(UNIT_SIZE, key=len, reverse=True)), q)
        # English asks "how many <to> are in <v> <from>" or "convert <v> <from> to <to>"; Chinese puts <from> first.
        frm, to = (second, first) if q.startswith("How many") else (first, second)
        return str(value * UNIT_SIZE[frm] // UNIT_SIZE[to])
    assert family == "identity"
    return "MiniMind"


def chain_holds(chain: str) -> bool:
    """'3 + 6 + 1 = 10' -> True, computed left to right (every chain in the working uses one kind of op)."""
    left, right = chain.rsplit(" = ", 1)
    tokens = left.split()
    value = int(tokens[0])
    for op, n in zip(tokens[1::2], tokens[2::2]):
        value = OPS[op](value, int(n))
    return value == int(right)


def test_deterministic_and_seeded():
    assert make_tasks(60, seed=3) == make_tasks(60, seed=3)
    assert make_tasks(60, seed=3) != make_tasks(60, seed=4)
    assert heldout_split(50, 20, seed=1) == heldout_split(50, 20, seed=1)


def test_families_balanced_and_checked():
    rows = make_tasks(20 * len(FAMILIES), seed=0)
    assert {r["task"] for r in rows} == set(FAMILIES)
    assert all(sum(r["task"] == f for r in rows) == 20 for f in FAMILIES)
    assert {r["task"] for r in make_tasks(10, 0, ["units"])} == {"units"}
    with pytest.raises(MiniMindError, match="unknown task family"):
        make_tasks(3, 0, ["poetry"])
    with pytest.raises(MiniMindError, match="unknown split"):
        make_tasks(3, 0, split="test")


def test_heldout_never_in_training(split):
    train, heldout = split
    assert len(heldout) == 500 and len(train) == 1500
    assert not {question_of(r) for r in train} & {question_of(r) for r in heldout}

    def problems(rows):  # the arithmetic problem itself, whatever the wording, language or operand order
        out = set()
        for r in rows:
            m = re.search(r"(\d+) ([-+*]) (\d+)", question_of(r))
            if m:
                a, op, b = m.groups()
                out.add((op, *sorted((a, b))) if op in "+*" else (op, a, b))
        return out

    other_seeds = [r for seed in (1, 2) for r in make_tasks(500, seed, ["arithmetic", "calculator"])]
    assert not problems(train + other_seeds) & problems(heldout)


def test_every_answer_recomputed_from_the_question(split):
    for row in split[0] + split[1]:
        assert row["answer"] == expected_answer(row), row
        assert is_correct(row, perfect_output(row)), row
        if row["task"] != "identity":
            assert extract_answer(perfect_output(row)) == row["answer"], row


def test_worked_steps_are_true(split):
    rows = [r for r in split[0] if "reasoning_content" in reply_of(r)]
    for row in rows:
        reasoning = reply_of(row)["reasoning_content"]
        chains = re.findall(r"\d+(?: [-+*/] \d+)+ = \d+", reasoning)
        assert chains or row["task"] == "counting", reasoning
        assert all(chain_holds(c) for c in chains), reasoning
        assert row["answer"] in reasoning.splitlines()[-1]
    assert any(r["task"] == "arithmetic" and "进 1" in reply_of(r)["reasoning_content"] for r in rows)
    assert any("(borrow 1)" in reply_of(r).get("reasoning_content", "") for r in rows)


def test_worked_steps_restate_the_problem_first(split):
    for row in split[0]:
        if row["task"] == "arithmetic":
            first = reply_of(row)["reasoning_content"].splitlines()[0]
            assert first in question_of(row) and re.fullmatch(r"\d+ [-+] \d+", first), row  # products: calculator


def test_arithmetic_drill_is_true_covers_every_form_and_leaves_out_held_out_problems():
    docs = arithmetic_drill(200, seed=0)
    assert arithmetic_drill(200, seed=0) == docs and len(docs) == 200
    facts = [line for doc in docs for line in doc.splitlines()]
    assert len(facts) == 200 * 24 and all(chain_holds(f) for f in facts)
    shapes = {re.sub(r"\d+", "n", f) for f in facts}
    assert shapes == {"n + n = n", "n + n + n = n", "n - n = n", "n - n - n = n"}
    two = [f.split(" = ")[0].split() for f in facts if f.count(" ") == 4]
    keys = {_key(int(a), op, int(b)) for a, op, b in two}
    assert {split_of(k) for k in keys} == {"train"}
    # The table is covered: every train-split sum of two digits appears.
    wanted = {_key(a, "+", b) for a in range(10) for b in range(10) if split_of(_key(a, "+", b)) == "train"}
    assert wanted <= keys


def test_both_languages_and_the_answer_phrase(split):
    rows = split[0]
    zh = [r for r in rows if re.search(r"[\u4e00-\u9fff]", question_of(r))]
    assert 0.35 < len(zh) / len(rows) < 0.65
    for r in rows:
        if r["task"] != "identity":
            assert re.fullmatch(r"(The answer is|答案是) \d+.*[.。]", reply_of(r)["content"]), reply_of(r)
    assert any(question_of(r).startswith("计算 ") for r in zh)


def test_calculator_rows_are_tool_conversations(split):
    rows = [r for r in split[0] if r["task"] == "calculator"]
    assert rows
    for row in rows:
        system, user, call, tool, final = row["conversations"]
        assert [t["function"]["name"] for t in system["tools"]] == ["calculator", "unit_convert"]
        assert system["tools"][0]["function"]["parameters"]["required"] == ["expression"]
        (tool_call,) = call["tool_calls"]
        expression = tool_call["arguments"]["expression"]
        assert tool_call["name"] == "calculator" and re.fullmatch(r"\d+[-+*]\d+", expression)
        assert expression == re.search(r"(\d+) ([-+*]) (\d+)", user["content"]).expand(r"\1\2\3")
        assert tool["role"] == "tool" and tool["content"] == row["answer"] == calculator(expression)
        assert final["role"] == "assistant" and row["answer"] in final["content"]
        text = render(row["conversations"])
        call_json = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        assert f"<tool_call>\n{call_json}\n</tool_call>" in text
        assert f"<tool_response>\n{row['answer']}\n</tool_response>" in text


def test_converter_rows_call_the_unit_tool(split):
    rows = [r for r in split[0] if r["task"] == "converter"]
    assert rows
    for row in rows:
        _, user, call, tool, final = row["conversations"]
        (tool_call,) = call["tool_calls"]
        args = tool_call["arguments"]
        assert tool_call["name"] == "unit_convert" and str(args["value"]) in user["content"]
        assert tool["content"] == row["answer"] == expected_answer(row)
        assert row["answer"] in final["content"]


def test_rows_render_and_validate(split):
    for row in split[0][:300] + split[1][:100]:
        assert render(row["conversations"]).endswith("<|im_end|>\n")
        parse_row(row, "sft")
        prompt = prompt_row(row)
        assert prompt["conversations"][-1]["role"] == "user" and prompt["answer"] == row["answer"]
        assert parse_row(prompt, "rl")["answer"] == row["answer"]


def test_dpo_pairs_prefer_the_right_answer(split):
    pairs = make_dpo_pairs(split[0][:200], seed=0)
    assert pairs == make_dpo_pairs(split[0][:200], seed=0)
    for task, pair in zip(split[0][:200], pairs):
        parse_row(pair, "dpo")
        assert pair["chosen"] == task["conversations"]
        rejected = pair["rejected"][-1]
        assert not is_correct(task, rejected["content"]), pair
        assert not rejected.get("tool_calls")


@pytest.mark.parametrize("text, answer", [
    ("The answer is 579.", "579"),
    ("<think>\n23 + 45 = 68, maybe 69\n</think>\n\nThe answer is 68.", "68"),
    ("<think>\nThe answer is 5.\n</think>\n\nThe answer is 7.<|im_end|>", "7"),
    ("答案是 1035。", "1035"),
    ("答案是：42", "42"),
    ("答案是１２。", "12"),  # full-width digits
    ("So 23 * 45 = 1035. The answer is 1,035.<|im_end|>The answer is 9", "1035"),
    ("The answer is 23 + 45 = 68.", "68"),
    ("I think it is \\boxed{42} or so", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("First 12, then 30, finally 44 apples", "44"),
    ("The answer is -3.", "-3"),
    ("The answer is 3.5 hours. Then more text 99", "3.5"),
    ("The answer is 3000 meters.", "3000"),
    ("The answer is MiniMind.", "MiniMind"),
    ("no numbers here", None),
    ("<think>\nstill thinking about 23 + 45 = 68", None),  # cut off while thinking: no answer given
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_is_correct():
    task = {"answer": "1035", "task": "arithmetic"}
    assert is_correct(task, "<think>\n23 * 40 = 920\n</think>\n\nThe answer is 1035.")
    assert is_correct(task, "答案是 1,035。")
    assert is_correct(task, "\\boxed{1035}")
    assert is_correct(task, "1035.0")
    assert not is_correct(task, "The answer is 1034.")
    assert not is_correct(task, "<think>\nThe answer is 1035\n</think>\n\nThe answer is 1030.")
    assert not is_correct(task, "The answer is unknown.")
    assert not is_correct(task, "<think>\n1035")
    identity = {"answer": "MiniMind", "task": "identity"}
    assert is_correct(identity, "<think>\n\n</think>\n\n我是 minimind，一个小型语言模型。")
    assert not is_correct(identity, "<think>\nI am MiniMind\n</think>\n\nI am a cat.")


@pytest.mark.parametrize("expression, result", [
    ("23*45", "1035"), ("256 * 37", "9472"), ("(1 + 2) * 3 / 4", "2.25"), ("-5 - -3", "-2"), ("1/3", "0.333333"),
    ("2 × 3 ÷ 4", "1.5"), ("10 - 2 - 3", "5"), ("2 + 3 * 4", "14"), ("1.5*2", "3"),
])
def test_calculator(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize("expression", ["1/0", "2**3", "__import__('os')", "(1+2", "", "1 2", "9" * 300])
def test_calculator_rejects_what_it_cannot_compute(expression):
    assert calculator(expression).startswith("error: ")
