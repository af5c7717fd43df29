"""Converters from Alpaca, ShareGPT and OpenAI `messages` data to MiniMind's SFT / DPO JSONL, streamed.
`minimind data convert alpaca.json --out sft.jsonl` or `convert_file("alpaca.json", "sft.jsonl")`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minimind import MiniMindError
from minimind.chat import normalize
from minimind.data.formats import BadLine, decode_line, json_type, parse_row, read_lines

FORMATS = ("alpaca", "sharegpt", "openai")

# ShareGPT speaker names (including LLaMA-Factory's function-calling ones) -> roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}


# ---------------------------------------------------------------------------------------------- output


def _arguments(args: Any) -> Any:
    """MiniMind writes tool-call arguments as an object; OpenAI as a JSON string. Decode when it is one."""
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except json.JSONDecodeError:
            return args
        return decoded if isinstance(decoded, dict) else args
    return args


def _minimind_message(m: dict) -> dict:
    """A normalised message in MiniMind's schema: role, content, and reasoning_content / tool_calls."""
    out = {"role": m["role"], "content": m["content"]}
    if m["role"] == "assistant":
        if m.get("reasoning_content"):
            out["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls"):
            out["tool_calls"] = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                                 for c in m["tool_calls"]]
    return out


def _minimind_conversation(messages: Any, tools: Any = None) -> tuple[list[dict], list[dict] | None]:
    """Messages in MiniMind's schema. MiniMind keeps `tools` on the system message; with no system message
    they are returned to go in a top-level `tools` field (inserting an empty system turn would change the
    rendered text)."""
    messages, tools = normalize(messages, tools)
    out = [_minimind_message(m) for m in messages]
    if tools and out and out[0]["role"] == "system":
        out[0]["tools"] = tools
        tools = None
    return out, tools


def sft_row(messages: Any, tools: Any = None) -> dict:
    """A MiniMind SFT row: {"conversations": [...]} (+ "tools" when there is no system message to hold it)."""
    conversation, tools = _minimind_conversation(messages, tools)
    return {"conversations": conversation, **({"tools": tools} if tools else {})}


def dpo_row(chosen: Any, rejected: Any, tools: Any = None) -> dict:
    """A MiniMind DPO row: {"chosen": [messages], "rejected": [messages]} (+ "tools" as for sft_row)."""
    chosen, chosen_tools = _minimind_conversation(chosen, tools)
    rejected, rejected_tools = _minimind_conversation(rejected, tools)
    tools = chosen_tools or rejected_tools
    return {"chosen": chosen, "rejected": rejected, **({"tools": tools} if tools else {})}


# ---------------------------------------------------------------------------------------------- input


def _string(row: dict, key: str, required: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(row[key], str):
        raise ValueError(f"'{key}' must be a string, got {json_type(row[key])}")
    return row[key]


def _alpaca_prompt(row: dict) -> list[dict]:
    """system, the `history` pairs, then instruction + input as one user turn (Alpaca joins them with \\n)."""
    system = _string(row, "system")
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise ValueError(f"'history' must be an array of [question, answer] pairs, got {json_type(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ValueError(f"history[{i}] must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = "\n".join(s for s in (_string(row, "instruction", required=True), _string(row, "input")) if s)
    return messages + [{"role": "user", "content": user}]


def from_alpaca(row: dict) -> dict:
    """Alpaca `instruction`/`input`/`output` (+ `system`, `history`) -> SFT; with `chosen`/`rejected` -> DPO."""
    prompt = _alpaca_prompt(row)
    if "chosen" in row or "rejected" in row:
        chosen, rejected = (_string(row, k, required=True) for k in ("chosen", "rejected"))
        return dpo_row(prompt + [{"role": "assistant", "content": chosen}],
                       prompt + [{"role": "assistant", "content": rejected}])
    return sft_row(prompt + [{"role": "assistant", "content": _string(row, "output", required=True)}])


def _sharegpt_message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object, got {json_type(m)}")
    speaker = m.get("from")
    if speaker not in SHAREGPT_ROLES:
        raise ValueError(f"{where} has 'from' {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
    value = m.get("value")
    if speaker == "function_call":  # the call itself, JSON {"name", "arguments"}; normalize() decodes it
        return {"role": "assistant", "content": "", "tool_calls": value}
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} 'value' must be a string, got {json_type(value)}")
    return {"role": SHAREGPT_ROLES[speaker], "content": value or ""}


def from_sharegpt(row: dict) -> dict:
    """ShareGPT `conversations` of {from, value} (+ `system`, `tools`) -> SFT; with `chosen`/`rejected`
    turns after the conversation (LLaMA-Factory's preference layout) -> DPO."""
    turns = row.get("conversations")
    if turns is None:
        raise ValueError("missing field 'conversations'")
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' must be an array, got {json_type(turns)}")
    messages = [_sharegpt_message(m, f"message {i}") for i, m in enumerate(turns)]
    system = _string(row, "system")
    if system:
        if messages and messages[0]["role"] == "system":
            raise ValueError("both a 'system' field and a system turn")
        messages.insert(0, {"role": "system", "content": system})
    if "chosen" in row or "rejected" in row:
        sides = []
        for key in ("chosen", "rejected"):
            value = row.get(key)
            if value is None:
                raise ValueError(f"missing field '{key}'")
            sides.append(messages + [{"role": "assistant", "content": value} if isinstance(value, str)
                                     else _sharegpt_message(value, f"'{key}'")])
        return dpo_row(*sides, tools=row.get("tools"))
    return sft_row(messages, row.get("tools"))


def from_openai(row: dict) -> dict:
    """OpenAI `messages` (tool_calls objects, top-level `tools`) -> SFT; `prompt`/`chosen`/`rejected` -> DPO."""
    if "chosen" in row or "rejected" in row:
        pair = parse_row(row, "dpo")
        return dpo_row(pair["chosen"], pair["rejected"], pair["tools"])
    return sft_row(row)


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai}


def detect_format(row: Any) -> str:
    """alpaca, sharegpt or openai, from one source row's keys."""
    if not isinstance(row, dict):
        raise ValueError(f"row is {json_type(row)}, not a JSON object")
    if "instruction" in row or "output" in row:
        return "alpaca"
    turns = row.get("conversations", row.get("messages"))
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return "sharegpt" if "from" in turns[0] else "openai"
    if "prompt" in row and "chosen" in row:
        return "openai"
    raise ValueError("cannot tell the format: expected 'instruction' (alpaca), 'conversations' of "
                     "{from, value} (sharegpt) or 'messages' (openai)")


def _json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a file holding one JSON array (how Alpaca ships), each with the line it starts on.
    The file is read whole: such files are small; big data comes as JSONL and is streamed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        yield 1, ValueError(f"not valid UTF-8 (byte {e.start + 1})")
        return
    decoder, pos, line, seen = json.JSONDecoder(), text.index("[") + 1, 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            rest = text[pos + 1:]
            if rest.strip():
                extra = pos + 1 + len(rest) - len(rest.lstrip())
                yield text.count("\n", 0, extra) + 1, ValueError("extra data after the JSON array")
            return
        line += text.count("\n", seen, pos)
        seen = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, ValueError(f"invalid JSON: {e.msg} at column {e.colno}")
            return  # the rest of the array cannot be located reliably
        yield line, value


def source_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line, decoded row or the ValueError decoding raised) from a JSONL file or a JSON-array file."""
    path = Path(path)
    if not path.is_file():
        raise MiniMindError(f"{path}: no such file")
    with path.open("rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        yield from _json_array(path)
        return
    for line, raw in read_lines(path):
        try:
            yield line, decode_line(raw)
        except ValueError as e:
            yield line, e


def convert_file(src: str | Path, dst: str | Path, fmt: str = "auto") -> tuple[int, list[BadLine]]:
    """Convert `src` (alpaca, sharegpt, openai or auto: detected from the first row) to MiniMind JSONL at
    `dst`, written atomically. Returns (rows written, the bad input lines that were skipped)."""
    src, dst = Path(src), Path(dst)
    if fmt != "auto" and fmt not in FORMATS:
        raise MiniMindError(f"unknown source format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    bad: list[BadLine] = []
    written, kind = 0, None
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for line, row in source_rows(src):
                try:
                    if isinstance(row, ValueError):
                        raise row
                    if fmt == "auto":
                        fmt = detect_format(row)
                    if not isinstance(row, dict):
                        raise ValueError(f"row is {json_type(row)}, not a JSON object")
                    converted = CONVERTERS[fmt](row)
                    row_kind = "dpo" if "chosen" in converted else "sft"
                    if kind is not None and row_kind != kind:
                        raise ValueError(f"a {row_kind} row in a file of {kind} rows")
                    parse_row(converted, row_kind)  # what we write must load
                    kind = row_kind
                except ValueError as e:
                    bad.append(BadLine(str(src), line, str(e)))
                    continue
                out.write(json.dumps(converted, ensure_ascii=False) + "\n")
                written += 1
        if not written:
            first = f"; first problem: {bad[0]}" if bad else ""
            raise MiniMindError(f"{src}: no rows converted, {dst} not written{first}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return written, bad
