"""Data formats: validate and normalise MiniMind's pretrain / SFT / DPO / RL rows, streamed from JSONL or .txt.
`for line, row in iter_rows("sft.jsonl", "sft"): ...`; `report = check_file("sft.jsonl", tokenizer=tok)`."""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind import MiniMindError
from minimind.chat import encode_chat, normalize

KINDS = ("pretrain", "sft", "dpo", "rl")
TEXT_SUFFIXES = (".txt", ".text", ".md")
DETECT_LINES = 1000  # how far detect_kind looks for a valid row before giving up

# What may follow each turn. "assistant+calls" is an assistant turn with tool_calls, the only one a tool
# message may answer; a tool result is read by the assistant (or followed by more tool results).
NEXT = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
    "assistant+calls": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


@dataclass(frozen=True)
class BadLine:
    """One rejected line; prints as `path:line: problem`, the form editors and CI logs link to."""

    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


# ---------------------------------------------------------------------------------------------- rows


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages a data author understands."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_turns(messages: list[dict], end: str) -> None:
    """Raise ValueError unless the turns are in a trainable order and no user/assistant turn is empty.

    Order: an optional system message first, then user and assistant alternating from user; tool messages
    only after an assistant turn with tool_calls (or another tool message). `end` is the required last role."""
    if not messages:
        raise ValueError("conversation is empty")
    prev = None
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role not in NEXT[prev]:
            if role == "system":
                raise ValueError(f"message {i}: a system message may only come first")
            if role == "tool":
                raise ValueError(f"message {i}: a tool message must follow an assistant turn with tool_calls "
                                 "or another tool message")
            before = prev.split("+")[0] if prev else ""
            after = f"after {'an' if before == 'assistant' else 'a'} {before} turn" if prev else "as the first turn"
            raise ValueError(f"message {i}: {role} turn {after}; expected {' or '.join(NEXT[prev])}")
        if role == "user" and not content.strip():
            raise ValueError(f"message {i}: empty user content")
        if role == "assistant" and not (content.strip() or m.get("tool_calls")
                                        or (m.get("reasoning_content") or "").strip()):
            raise ValueError(f"message {i}: empty assistant content (no content, reasoning_content or tool_calls)")
        prev = "assistant+calls" if role == "assistant" and m.get("tool_calls") else role
    if messages[-1]["role"] != end:
        raise ValueError(f"conversation ends with a {messages[-1]['role']} turn; expected a final {end} turn")


def _conversation(row: dict) -> tuple[list[dict], list[dict] | None]:
    """The row's messages and tools via chat.normalize, after checking the field exists and is a list."""
    key = next((k for k in ("conversations", "messages") if k in row), None)
    if key is None:
        raise ValueError("missing field 'conversations' (or 'messages')")
    if not isinstance(row[key], list):
        raise ValueError(f"'{key}' must be an array, got {json_type(row[key])}")
    return normalize(row)


def _dpo_side(row: dict, side: str, prompt: list | None) -> tuple[list[dict], list[dict] | None]:
    """One full conversation of a DPO pair: `chosen` as messages, or `prompt` + a completion."""
    if side not in row:
        raise ValueError(f"missing field '{side}'")
    value = row[side]
    if prompt is None:
        if isinstance(value, str):
            raise ValueError(f"'{side}' is a string but the row has no 'prompt'")
        if not isinstance(value, list):
            raise ValueError(f"'{side}' must be an array of messages, got {json_type(value)}")
        messages = value
    elif isinstance(value, str):
        messages = prompt + [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        messages = prompt + [value]
    elif isinstance(value, list):
        messages = prompt + value
    else:
        raise ValueError(f"'{side}' must be a string or messages, got {json_type(value)}")
    try:
        messages, tools = normalize(messages, row.get("tools"))
        _check_turns(messages, end="assistant")
    except ValueError as e:
        raise ValueError(f"{side}: {e}") from None
    return messages, tools


def _prompt_part(messages: list[dict]) -> list[dict]:
    """Everything up to and including the last user turn: what both sides of a DPO pair must share."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def _parse_dpo(row: dict) -> dict:
    prompt = None
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not isinstance(prompt, list):
            raise ValueError(f"'prompt' must be a string or an array of messages, got {json_type(prompt)}")
    chosen, chosen_tools = _dpo_side(row, "chosen", prompt)
    rejected, rejected_tools = _dpo_side(row, "rejected", prompt)
    a, b = _prompt_part(chosen), _prompt_part(rejected)
    if a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise ValueError(f"chosen and rejected prompts differ at message {i}")
    return {"chosen": chosen, "rejected": rejected, "tools": chosen_tools or rejected_tools}


def _parse_rl(row: dict) -> dict:
    messages, tools = _conversation(row)
    # MiniMind's rlaif / agent_rl rows end with an assistant placeholder its loaders drop; so do we.
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    _check_turns(messages, end="user")
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # a numeric answer (gsm8k-style) is still an answer
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"'answer' must be a string, got {json_type(answer)}")
    gt = row.get("gt")
    if gt is not None and not isinstance(gt, list):
        raise ValueError(f"'gt' must be an array, got {json_type(gt)}")
    return {"messages": messages, "answer": answer, "gt": gt, "tools": tools}


def parse_row(row: Any, kind: str) -> dict:
    """Validate one decoded JSON row; return it normalised or raise ValueError(problem).

    pretrain -> {"text"}; sft -> {"messages", "tools"}; dpo -> {"chosen", "rejected", "tools"} (full
    conversations); rl -> {"messages" (ending with a user turn), "answer", "gt", "tools"}."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(row, dict):
        raise ValueError(f"row is {'an' if isinstance(row, list) else 'a'} {json_type(row)}, not a JSON object")
    if kind == "pretrain":
        if "text" not in row:
            raise ValueError("missing field 'text'")
        if not isinstance(row["text"], str):
            raise ValueError(f"'text' must be a string, got {json_type(row['text'])}")
        if not row["text"].strip():
            raise ValueError("'text' is empty")
        return {"text": row["text"]}
    if kind == "dpo":
        return _parse_dpo(row)
    if kind == "rl":
        return _parse_rl(row)
    messages, tools = _conversation(row)
    _check_turns(messages, end="assistant")
    return {"messages": messages, "tools": tools}


# ---------------------------------------------------------------------------------------------- files


def read_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for each non-blank line, streamed. Raises MiniMindError if there is no file."""
    path = Path(path)
    if not path.is_file():
        raise MiniMindError(f"{path}: no such file")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors write
            if raw.strip():
                yield lineno, raw


def decode_line(raw: bytes) -> Any:
    """One JSONL line decoded, or ValueError naming what is wrong with it."""
    try:
        text = raw.decode("utf-8").rstrip()  # so a truncated line's error points inside it, not past the \n
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:  # the decoder recurses once per level: a hostile line must not crash the reader
        raise ValueError("invalid JSON: arrays or objects nested too deeply") from None


def _text_documents(path: Path) -> Iterator[tuple[int, str | ValueError]]:
    """A .txt file's documents (separated by blank lines), each with the line number it starts on."""
    lines: list[str] = []
    start, problem = 0, None
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                if lines or problem:
                    yield start, problem or "".join(lines).rstrip("\n")
                lines, start, problem = [], 0, None
                continue
            start = start or lineno
            try:
                lines.append(raw.decode("utf-8").removeprefix("\ufeff"))
            except UnicodeDecodeError as e:
                problem = problem or ValueError(f"line {lineno} is not valid UTF-8 (byte {e.start + 1})")
    if lines or problem:
        yield start, problem or "".join(lines).rstrip("\n")


def _is_text(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def iter_rows(path: str | Path, kind: str, bad: list[BadLine] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, normalised row) lazily (never the whole file in memory). On a bad line: if bad is
    None raise MiniMindError(str(BadLine)), else append to `bad` and go on."""
    path = Path(path)
    if kind not in KINDS:
        raise MiniMindError(f"{path}: unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if _is_text(path):
        if kind != "pretrain":
            raise MiniMindError(f"{path}: a {path.suffix} file can only hold pretrain text, not {kind} rows")
        if not path.is_file():
            raise MiniMindError(f"{path}: no such file")
        items = ((line, doc if isinstance(doc, ValueError) else {"text": doc})
                 for line, doc in _text_documents(path))
    else:
        items = _decoded(path)
    for line, row in items:
        try:
            if isinstance(row, ValueError):
                raise row
            yield line, parse_row(row, kind)
        except ValueError as e:
            problem = BadLine(str(path), line, str(e))
            if bad is None:
                raise MiniMindError(str(problem)) from None
            bad.append(problem)


def _decoded(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, decoded JSON value or the ValueError that decoding raised) for each non-blank line."""
    for line, raw in read_lines(path):
        try:
            yield line, decode_line(raw)
        except ValueError as e:
            yield line, e


def kind_of(row: dict) -> str:
    """Guess a row's kind from its keys (see detect_kind)."""
    if "text" in row:
        return "pretrain"
    if "chosen" in row or "rejected" in row:
        return "dpo"
    if "answer" in row or "gt" in row:
        return "rl"
    messages = row.get("conversations", row.get("messages"))
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "user":
        return "rl"
    return "sft"


def detect_kind(path: str | Path) -> str:
    """The kind of a data file, from the first valid row's keys: text -> pretrain, chosen/rejected -> dpo,
    answer/gt or conversations ending with a user turn -> rl, else sft. A .txt file is pretrain.

    MiniMind's rlaif.jsonl ends its prompts with an assistant placeholder, so it reads as sft: pass the kind."""
    path = Path(path)
    if _is_text(path):
        return "pretrain"
    for line, row in _decoded(path):
        if line > DETECT_LINES:
            break
        if isinstance(row, dict):
            kind = kind_of(row)
            try:
                parse_row(row, kind)
            except ValueError:
                continue
            return kind
    raise MiniMindError(f"{path}: cannot tell the data kind (no valid row in the first {DETECT_LINES:,} lines); "
                        f"pass --kind {'|'.join(KINDS)}")


# ---------------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class TokenStats:
    """Tokens per row (for DPO the longer side, for RL the prompt with its generation header)."""

    min: int
    mean: float
    median: float
    p95: float
    max: int
    total: int


@dataclass
class CheckReport:
    path: str
    kind: str
    rows: int = 0  # valid rows
    bad: list[BadLine] = field(default_factory=list)  # the first max_problems bad lines
    n_bad: int = 0  # all bad lines
    tokens: TokenStats | None = None


class _CappedList(list):
    """Keeps the first `cap` items appended but counts all of them, so a broken big file stays cheap."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap, self.count = cap, 0

    def append(self, item: Any) -> None:
        self.count += 1
        if len(self) < self.cap:
            super().append(item)


def row_tokens(tokenizer: Any, row: dict, kind: str) -> int:
    """How many tokens a normalised row becomes when rendered for training."""
    if kind == "pretrain":
        if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
            return len(tokenizer.encode(row["text"], add_special_tokens=False).ids)
        return len(tokenizer.encode(row["text"], add_special_tokens=False))
    if kind == "dpo":
        return max(len(encode_chat(tokenizer, row[side], row["tools"])[0]) for side in ("chosen", "rejected"))
    return len(encode_chat(tokenizer, row["messages"], row["tools"], add_generation_prompt=kind == "rl")[0])


def check_file(path: str | Path, kind: str | None = None, tokenizer: Any = None, max_problems: int = 50,
               progress: bool = False) -> CheckReport:
    """Validate every row of a data file (streamed); with a tokenizer, also measure tokens per row."""
    import numpy as np
    from tqdm import tqdm

    kind = kind or detect_kind(path)
    bad = _CappedList(max_problems)
    lengths = array("q")  # 8 bytes a row: fine for tens of millions of rows
    report = CheckReport(str(path), kind)
    rows = iter_rows(path, kind, bad)
    for _, row in tqdm(rows, desc=f"checking {Path(path).name}", unit=" rows", disable=not progress):
        report.rows += 1
        if tokenizer is not None:
            lengths.append(row_tokens(tokenizer, row, kind))
    report.bad, report.n_bad = list(bad), bad.count
    report.tokens = token_stats(np.frombuffer(lengths, dtype=np.int64))
    return report


def token_stats(lengths: Any) -> TokenStats | None:
    """Statistics of tokens per row (an int64 array), or None for no rows."""
    import numpy as np

    a = np.asarray(lengths, dtype=np.int64)
    if not len(a):
        return None
    return TokenStats(int(a.min()), float(a.mean()), float(np.median(a)), float(np.percentile(a, 95)),
                      int(a.max()), int(a.sum()))


def format_report(report: CheckReport) -> str:
    """The report as printed by `minimind data check`: a summary, each bad line, token statistics."""
    lines = [f"{report.path}: {report.kind}, {report.rows:,} valid rows, {report.n_bad:,} bad lines"]
    lines += [str(b) for b in report.bad]
    if report.n_bad > len(report.bad):
        lines.append(f"... and {report.n_bad - len(report.bad):,} more bad lines (raise --max-problems to see them)")
    t = report.tokens
    if t is not None:
        lines.append(f"tokens per row: min {t.min:,}, mean {t.mean:,.1f}, median {t.median:,.0f}, "
                     f"p95 {t.p95:,.0f}, max {t.max:,}; {t.total:,} in all")
    return "\n".join(lines)
