"""Rule-based, verifiable rewards for RL (exact answers, format, tool use, repetition), composable with weights,
and an optional reward-model scorer. `score(samples, parse_weights("answer:1,format:0.2,repetition:0.5"))`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from minimind import MiniMindError
from minimind.chat import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, parse_assistant
from minimind.data.tasks import NUMBER_RE, is_correct
from minimind.tools import ToolCall


@dataclass
class Sample:
    """What a reward function sees: one sampled reply (all turns) and the prompt row it answers."""

    text: str  # the final assistant turn as generated, with "<think>\n" in front when the prompt opened it
    row: dict  # the prompt row: answer, gt, task, ...
    thinking: bool = False  # the prompt opened <think>
    turns: list[str] = field(default_factory=list)  # every assistant turn's text (agent rollouts)
    tool_calls: list[ToolCall] = field(default_factory=list)
    bad_calls: int = 0  # <tool_call> blocks that did not parse as {"name", "arguments"}
    finished: bool = True  # ended with <|im_end|> (not cut off by a length or turn limit)


# ---- the parts --------------------------------------------------------------------------------------


def _matches(expected: Any, text: str) -> bool:
    """A `gt` item is found in the answer: as a number within 1e-6 of one in the text, else as a substring."""
    want = str(expected).strip()
    if NUMBER_RE.fullmatch(want.replace(",", "")):
        numbers = [float(n.replace(",", "")) for n in NUMBER_RE.findall(text)]
        return any(abs(n - float(want.replace(",", ""))) < 1e-6 for n in numbers)
    return bool(want) and want.lower() in text.lower()


def answer_reward(s: Sample) -> float:
    """1 for the right answer, else 0. Task rows: the answer after "The answer is", in the last \\boxed{} or
    the last number (minimind.data.tasks.is_correct). MiniMind agent rows: the share of `gt` items found in
    the final reply. Rows with neither score 0."""
    gt = s.row.get("gt")
    if gt:
        content = parse_assistant(s.text)["content"]
        return sum(_matches(g, content) for g in gt) / len(gt)
    if s.row.get("answer") is None:
        return 0.0
    return float(is_correct(s.row, s.text))


def format_reward(s: Sample) -> float:
    """Well-formedness, in [-1, 1]: one closing </think> (exactly when the prompt opened thinking, and none
    in a reply that was not thinking), a non-empty visible answer, every <tool_call> block valid JSON with a
    name, and a finished reply. Each of the four checks adds +0.25 or -0.25."""
    text = s.text
    closes = text.count(THINK_CLOSE)
    think_ok = (closes == 1 and text.count(THINK_OPEN) <= 1) if s.thinking else (closes == 0)
    answer_ok = bool(parse_assistant(text)["content"].strip())
    calls_ok = text.count(CALL_OPEN) == text.count(CALL_CLOSE) and s.bad_calls == 0
    checks = (think_ok, answer_ok, calls_ok, s.finished)
    return sum(0.25 if ok else -0.25 for ok in checks)


_WORD_RE = re.compile(r"[\u3400-\u9fff]|[^\s\u3400-\u9fff]+")


def repetition_penalty(s: Sample, n: int = 3) -> float:
    """Minus the share of repeated word n-grams (a CJK character counts as a word), in [-1, 0]: a reply that
    loops scores near -1, fresh text 0."""
    reply = parse_assistant(s.text)
    words = _WORD_RE.findall((reply["reasoning_content"] or "") + " " + reply["content"])
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return -(1 - len(set(grams)) / len(grams))


def length_reward(s: Sample) -> float:
    """MiniMind's length score: +0.5 for a reply of 5-800 characters (after thinking), else -0.5."""
    return 0.5 if 5 <= len(parse_assistant(s.text)["content"]) <= 800 else -0.5


def expected_calls(row: dict) -> int | None:
    """How many tool calls a row wants: len(gt) for MiniMind agent rows, 1 for the calculator tasks, else None."""
    if row.get("gt"):
        return len(row["gt"])
    if row.get("task") == "calculator":
        return 1
    return None


def tool_reward(s: Sample) -> float:
    """MiniMind's tool-use score: +0.5 when the number of valid calls matches what the row wants and no call
    failed; else -0.5 per call too many, too few or failed (at least -1.5). Rows that want no particular
    number score 0."""
    want = expected_calls(s.row)
    if want is None:
        return 0.0
    valid = sum(c.valid for c in s.tool_calls)
    gap = abs(valid - want) + (len(s.tool_calls) - valid) + s.bad_calls
    return 0.5 if gap == 0 else -0.5 * min(gap, 3)


def tool_correct(s: Sample) -> float:
    """1 when a calculator (or other tool) call returned the expected answer, i.e. the tool was used right."""
    expected = s.row.get("answer")
    if expected is None and s.row.get("gt"):
        expected = s.row["gt"][0]
    if expected is None:
        return 0.0
    return float(any(c.valid and _matches(expected, c.result) and not c.result.startswith("error")
                     for c in s.tool_calls))


REWARDS: dict[str, Callable[[Sample], float]] = {
    "answer": answer_reward,
    "format": format_reward,
    "repetition": repetition_penalty,
    "length": length_reward,
    "tool": tool_reward,
    "tool_correct": tool_correct,
}


def parse_weights(spec: str) -> dict[str, float]:
    """"answer:1,format:0.2" -> {"answer": 1.0, "format": 0.2}. "rm" is the reward model's score."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, value = part.partition(":")
        name = name.strip()
        if name not in REWARDS and name != "rm":
            raise MiniMindError(f"rewards: unknown reward {name!r}; known: {', '.join([*REWARDS, 'rm'])}")
        try:
            weights[name] = float(value) if value.strip() else 1.0
        except ValueError:
            raise MiniMindError(f"rewards: weight of {name!r} must be a number, not {value!r}") from None
    if not weights:
        raise MiniMindError("rewards: name at least one reward, e.g. \"answer:1,format:0.2\"")
    return weights


def score(samples: Sequence[Sample], weights: dict[str, float],
          reward_model: Callable[[Sequence[Sample]], list[float]] | None = None,
          ) -> tuple[list[float], dict[str, list[float]]]:
    """Total reward of each sample (the weighted sum of its parts) and each part's raw values."""
    parts: dict[str, list[float]] = {}
    for name in weights:
        if name == "rm":
            if reward_model is None:
                raise MiniMindError("rewards name \"rm\" but no reward_model directory is set")
            parts[name] = [float(v) for v in reward_model(samples)]
        else:
            parts[name] = [REWARDS[name](s) for s in samples]
    totals = [sum(weights[n] * parts[n][i] for n in weights) for i in range(len(samples))]
    return totals, parts

