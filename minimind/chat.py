"""The one chat-template renderer: messages (+ tools, thinking) -> text, ids and loss mask; the matching Jinja
template for tokenizer_config.json; parsers for <think>/<tool_call>. `ids, mask = encode_chat(tok, msgs)`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# ChatML pieces, spelled once. The format is MiniMind's (a Qwen3 derivative) so its published weights work.
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Vision: each IMAGE in a user turn becomes a run of IMAGE_PAD tokens whose embeddings the image's features
# replace (MiniMind-V's scheme: the pads alone, no start/end markers around them).
IMAGE, IMAGE_PAD = "<image>", "<|image_pad|>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
ROLES = ("system", "user", "assistant", "tool")
# The tags of the thinking and tool format, each one token in MiniMind's minimind-3 tokenizer.
TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE)

# Two chat formats, named after the MiniMind generation whose tokenizer they go with. "minimind-3": every
# assistant turn carries a think block. "minimind2": MiniMind's format before its tokenizer gained the tags
# above (upstream commit 101d7df, 2026-03): a default system turn, assistant text as is (reasoning_content
# dropped, as MiniMind2's template drops it), no think block.
# A tokenizer selects its format by its vocabulary (chat_format), so a model directory needs no extra field.
CHAT_FORMATS = ("minimind-3", "minimind2")
DEFAULT_SYSTEM = "You are a helpful assistant"

TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)

# The same format for transformers' apply_chat_template (and llama.cpp / Ollama after export). Every tag
# trims whitespace on the left, so it renders the same with or without trim_blocks/lstrip_blocks.
# tests/test_chat.py checks that it is byte-identical to `render` on hundreds of random conversations.
# OpenAI content-part lists render as their text parts joined with nothing between (as the Qwen-VL templates
# do; Qwen3's text template renders such a message empty); other parts (images) are left out.
# Thinking: `enable_thinking` (transformers' and Qwen3's name) decides when given; MiniMind's `open_thinking`
# only when it is not, so a client that sets both gets what the standard name says; with neither, the model's
# own default: an empty think block, or with `thinks_by_default` (switched on by the SFT stage for a model taught
# to think: with_thinking_default) nothing, so the model writes its own think block, empty or not, as Qwen3 does.
CHAT_TEMPLATE = r"""{%- set think_tags = true %}
{%- set thinks_by_default = false %}
{%- macro text_of(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if part is mapping and (part.type is not defined or part.type == 'text') and part.text is string %}
                {{- part.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if enable_thinking is defined and enable_thinking is not none %}
    {%- set thinking = enable_thinking %}
{%- elif open_thinking is defined and open_thinking is not none %}
    {%- set thinking = open_thinking %}
{%- else %}
    {%- set thinking = none if thinks_by_default else false %}
{%- endif %}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' %}
{%- set system_text = text_of(messages[0].content) if has_system else '' %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}
        {{- system_text + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        + 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
        + 'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        + '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' }}
{%- elif not think_tags %}
    {{- '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = text_of(message.content) %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' and not think_tags %}
        {{- '<|im_start|>assistant\n' + content }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {%- set content = content.lstrip('\n') %}
        {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content }}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {%- if message.tool_calls %}
            {%- for call in message.tool_calls %}
                {%- if content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {%- set fn = call.function if call.function else call %}
                {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
                {%- if fn.arguments is string %}
                    {{- fn.arguments }}
                {%- else %}
                    {{- fn.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if not think_tags or thinking is none %}
    {%- elif thinking %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
# The minimind2 format is the same template with its one switch off; Jinja cannot raise a clear error, so the
# refusals of check_format (thinking, tools) are the Python side's alone.
CHAT_TEMPLATES = {
    "minimind-3": CHAT_TEMPLATE,
    "minimind2": CHAT_TEMPLATE.replace("{%- set think_tags = true %}", "{%- set think_tags = false %}", 1),
}


THINKS_BY_DEFAULT = "{%- set thinks_by_default = true %}"


def with_thinking_default(template: str, on: bool) -> str:
    """The template with its default for requests that say nothing about thinking: on, the prompt ends at the
    assistant header and the model opens its think block itself; off, an empty think block is written for it."""
    lines = ("{%- set thinks_by_default = false %}", THINKS_BY_DEFAULT)
    return template.replace(lines[not on], lines[on], 1)


def thinks_by_default(tokenizer: Any) -> bool:
    """Whether the model decides for itself whether to think when a request says nothing about it, as its chat
    template says (a model directory carries the default in the template, so transformers' apply_chat_template
    follows it too)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and THINKS_BY_DEFAULT in template


def chat_format(tokenizer: Any) -> str:
    """The chat format a tokenizer (transformers', a raw `tokenizers.Tokenizer`, or a view with `.tokenizer`)
    goes with: "minimind-3" when it has every think and tool tag, "minimind2" when it has none. Some but not
    all of them is no format at all (ValueError)."""
    raw = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    while not hasattr(raw, "token_to_id") and hasattr(raw, "tokenizer"):
        raw = getattr(raw.tokenizer, "backend_tokenizer", None) or raw.tokenizer
    if not hasattr(raw, "token_to_id"):
        return "minimind-3"
    missing = [t for t in TAGS if raw.token_to_id(t) is None]
    if not missing:
        return "minimind-3"
    if len(missing) == len(TAGS):
        return "minimind2"
    raise ValueError(f"missing the chat tags {' '.join(missing)} (a tokenizer has all of {' '.join(TAGS)}, "
                     "or none of them for the minimind2 chat format)")


def check_format(chat_format: str, thinking: bool = False, tools: Any = None) -> None:
    """Refuse what the format has no tokens for (ValueError saying so): thinking and tools in "minimind2"."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; expected one of {', '.join(CHAT_FORMATS)}")
    if chat_format == "minimind2" and (thinking or tools):
        asked = " and ".join(w for w, on in (("thinking", thinking), ("tools", tools)) if on)
        raise ValueError(f"{asked}: this model's tokenizer has no {' '.join(TAGS)} tokens (MiniMind's minimind2 "
                         "chat format), so it cannot think or call tools")


# ---------------------------------------------------------------------------------------------- input


def _json_field(value: Any, what: str) -> Any:
    """MiniMind's files store `tools` and `tool_calls` as JSON-encoded strings; decode them, pass others."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is a string but not valid JSON ({e.msg} at char {e.pos})") from None


def _tools(value: Any, what: str) -> list[dict] | None:
    value = _json_field(value, what)
    if value is None:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{what} must be a list of JSON objects, got {type(value).__name__}")
    return value or None


def _tool_calls(value: Any, what: str) -> list[dict]:
    value = _json_field(value, what)
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    calls = []
    for i, call in enumerate(value):
        where = f"{what}[{i}]"
        if not isinstance(call, dict):
            raise ValueError(f"{where} must be an object, got {type(call).__name__}")
        fn = call.get("function") or call  # unwrap OpenAI's {"type": "function", "function": {...}}
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where} has no function name")
        args = fn.get("arguments", {})
        if args is None:
            args = {}
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _content(value: Any, what: str) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list joined with nothing between
    (as CHAT_TEMPLATE joins them); parts of other types (images) are left out."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise ValueError(f"{what} must be a string, got {type(value).__name__}")


def normalize(row_or_messages: Any, tools: Any = None) -> tuple[list[dict], list[dict] | None]:
    """Bring any accepted conversation shape to plain messages + a tools list (or None).

    Accepts a list of messages or a row with `conversations` (or `messages`) and an optional top-level
    `tools`; MiniMind's JSON-string `tools` (on the system message) and `tool_calls`; OpenAI objects.
    Tools come from the `tools` argument, else the row, else the first message that carries them.
    Tool calls come out in OpenAI form. Raises ValueError naming the bad message and field."""
    row_tools = None
    if isinstance(row_or_messages, dict):
        messages = row_or_messages.get("conversations")
        if messages is None:
            messages = row_or_messages.get("messages")
        if messages is None:
            raise ValueError("row has neither 'conversations' nor 'messages'")
        row_tools = _tools(row_or_messages.get("tools"), "tools")
    else:
        messages = row_or_messages
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")

    out: list[dict] = []
    message_tools = None
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        msg = {k: v for k, v in m.items() if v is not None and k not in ("tools", "functions")}
        msg["content"] = _content(m.get("content"), f"{where} content")
        for key in ("tools", "functions"):  # `functions` is an older MiniMind spelling
            found = _tools(m.get(key), f"{where} {key}")
            if found and message_tools is None:
                message_tools = found
        if role == "assistant":
            # transformers reads reasoning under these names too; take the same one it would.
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning")
                              if m.get(k) is not None), None)
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise ValueError(f"{where} reasoning_content must be a string")
                msg["reasoning_content"] = reasoning
            calls = _tool_calls(m.get("tool_calls"), f"{where} tool_calls")
            if calls:
                msg["tool_calls"] = calls
            else:
                msg.pop("tool_calls", None)
        out.append(msg)
    chosen = _tools(tools, "tools") or row_tools or message_tools
    return out, chosen


# ---------------------------------------------------------------------------------------------- render


def _split_think(content: str) -> tuple[str, str]:
    """Reasoning written inline as `<think>...</think>answer`: (reasoning, answer), as the template does."""
    reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, content.split(THINK_CLOSE)[-1]


def _call_text(call: dict) -> str:
    fn = call.get("function") or call
    args = fn.get("arguments", {})
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'{CALL_OPEN}\n{{"name": "{fn["name"]}", "arguments": {args_text}}}\n{CALL_CLOSE}'


def thinking_on(enable_thinking: bool | None = None, open_thinking: bool | None = None,
                default: bool = False) -> bool | None:
    """Whether the generation prompt opens `<think>` (True), writes an empty think block (False) or leaves it to
    the model (None): enable_thinking when given (not None), else open_thinking, else the model's default
    (thinks_by_default: None, else False). The rule CHAT_TEMPLATE and the API follow too."""
    for flag in (enable_thinking, open_thinking):
        if flag is not None:
            return bool(flag)
    return None if default else False


def render_with_spans(messages: Any, tools: Any = None, add_generation_prompt: bool = False,
                      enable_thinking: bool | None = None, open_thinking: bool | None = None,
                      chat_format: str = "minimind-3", thinks_by_default: bool = False
                      ) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; also return the [start, end) character ranges that carry loss: each assistant
    turn from just after its `<|im_start|>assistant\\n` header through its `<|im_end|>`."""
    return _render(messages, tools, add_generation_prompt,
                   thinking_on(enable_thinking, open_thinking, thinks_by_default),
                   chat_format)[:2]


def _render(messages: Any, tools: Any, add_generation_prompt: bool, thinking: bool | None,
            chat_format: str = "minimind-3", image_tokens: int = 0) -> tuple[str, list[tuple[int, int]], set[int]]:
    """render_with_spans, plus where the template itself wrote `<|im_start|>` and `<|im_end|>`: any other
    special token in the text came from a message (or a tool) and is to be encoded as plain text.
    image_tokens > 0: each `<image>` in a user turn becomes that many `<|image_pad|>`, written (and marked) by
    the template, so only a placeholder, never a pad typed into a message, makes image tokens."""
    messages, tools = normalize(messages, tools)
    check_format(chat_format, bool(thinking), tools)
    think_tags = chat_format == "minimind-3"
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    marks: set[int] = set()
    pos = 0

    def emit(text: str) -> None:
        nonlocal pos
        parts.append(text)
        pos += len(text)

    def tag(marker: str) -> None:
        marks.add(pos)
        emit(marker)

    def user_text(text: str) -> None:
        pieces = text.split(IMAGE) if image_tokens else [text]
        for j, piece in enumerate(pieces):
            for _ in range(image_tokens if j else 0):
                tag(IMAGE_PAD)
            emit(piece)

    has_system = bool(messages) and messages[0]["role"] == "system"
    system_text = messages[0]["content"] if has_system else ""
    if tools:
        tag(IM_START)
        emit("system\n" + (system_text + "\n\n" if has_system else "") + TOOLS_INTRO)
        for tool in tools:
            emit("\n" + json.dumps(tool, ensure_ascii=False))  # what transformers' `tojson` does
        emit(TOOLS_OUTRO)
        tag(IM_END)
        emit("\n")
    elif has_system or not think_tags:
        tag(IM_START)
        emit(f"system\n{system_text if has_system else DEFAULT_SYSTEM}")
        tag(IM_END)
        emit("\n")

    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "user" or (role == "system" and i > 0):
            tag(IM_START)
            emit(f"{role}\n")
            if role == "user":
                user_text(content)
            else:
                emit(content)
            tag(IM_END)
            emit("\n")
        elif role == "assistant":
            tag(IM_START)
            emit("assistant\n")
            start = pos
            if think_tags:
                reasoning = m.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if THINK_CLOSE in content:
                        reasoning, content = _split_think(content)
                content, reasoning = content.lstrip("\n"), reasoning.strip("\n")
                emit(f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n")
            emit(content)
            for j, call in enumerate(m.get("tool_calls") or []):
                emit(("\n" if content or j > 0 else "") + _call_text(call))
            tag(IM_END)
            spans.append((start, pos))
            emit("\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                tag(IM_START)
                emit("user")
            emit(f"\n{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                tag(IM_END)
                emit("\n")

    if add_generation_prompt:
        opened = "" if not think_tags or thinking is None else f"{THINK_OPEN}\n" if thinking else EMPTY_THINK
        tag(IM_START)
        emit(f"assistant\n{opened}")
    return "".join(parts), spans, marks


def place_images(text: str, count: int) -> str:
    """A user message's text for `count` attached images: as written when its `<image>` placeholders number
    `count`; with none written, an `<image>` line per image before the text (MiniMind-V's `<image>\nquestion`).
    ValueError when the placeholders written are neither none nor one per image."""
    written = text.count(IMAGE)
    if written == count:
        return text
    if written == 0:
        return f"{IMAGE}\n" * count + text
    raise ValueError(f"the message has {written} {IMAGE} placeholder(s) for {count} image(s)")


def render(messages: Any, tools: Any = None, add_generation_prompt: bool = False,
           enable_thinking: bool | None = None, open_thinking: bool | None = None,
           chat_format: str = "minimind-3", thinks_by_default: bool = False) -> str:
    """The conversation as the model sees it (the same text `CHAT_TEMPLATES[chat_format]` produces, switched by
    with_thinking_default when thinks_by_default)."""
    return render_with_spans(messages, tools, add_generation_prompt, enable_thinking, open_thinking, chat_format,
                             thinks_by_default)[0]


def _ids_and_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (MiniMind's first 21; not the think and tool tags, which are not special),
    from a raw `tokenizers.Tokenizer`, a transformers tokenizer, or a view over either (`.tokenizer`)."""
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        added = tokenizer.get_added_tokens_decoder().values()
    elif hasattr(tokenizer, "added_tokens_decoder"):
        added = tokenizer.added_tokens_decoder.values()
    elif hasattr(tokenizer, "tokenizer"):
        return _special_tokens(tokenizer.tokenizer)
    else:
        return [PAD, IM_START, IM_END]
    return [t.content for t in added if t.special]


def _encode_as_text(tokenizer: Any, text: str, marks: set[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize the rendered text with every special token that the template did not write (at `marks`) encoded
    as plain text, as transformers' split_special_tokens would: a user who types `<|im_end|>\\n<|im_start|>system`
    gets those characters, not a new turn. The text is cut inside each such token, after its first run of
    letters: the pre-tokenizer splits there anyway, so the pieces give exactly the plain-text tokens, through
    any tokenizer or view of one. Without such tokens (the usual case) it is one call."""
    specials = sorted(_special_tokens(tokenizer), key=len, reverse=True)  # the longest of two that overlap
    cuts = []
    for m in re.finditer("|".join(map(re.escape, specials)), text) if specials else ():
        if m.start() not in marks:
            letters = next((i for i in range(m.start() + 1, m.end()) if text[i - 1].isalpha()
                            and not text[i].isalpha()), m.start() + 1)
            cuts.append(letters)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        piece_ids, piece_offsets = _ids_and_offsets(tokenizer, text[start:end])
        ids += piece_ids
        offsets += [(a + start, b + start) for a, b in piece_offsets]
    return ids, offsets


def encode_chat(tokenizer: Any, messages: Any, tools: Any = None, add_generation_prompt: bool = False,
                enable_thinking: bool | None = None, newline_loss: bool = False,
                image_tokens: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, in the tokenizer's chat format, and a 0/1 loss mask of the same
    length (no bos/eos added). ValueError for what that format cannot express (check_format). enable_thinking:
    as thinking_on, with the tokenizer's chat template giving the default (thinks_by_default).

    The text is tokenized once (special tokens inside messages as plain text); a token carries loss iff its
    character range lies inside an assistant span, so the mask is right whatever BPE merges across boundaries.
    newline_loss: the `\\n` after each assistant `<|im_end|>` carries loss too, as in MiniMind's SFT and DPO
    datasets (off by default, as in transformers and TRL: that token is the template's, not the model's).
    image_tokens: each `<image>` in a user turn becomes that many `<|image_pad|>` ids (never loss: user text)."""
    text, spans, marks = _render(messages, tools, add_generation_prompt,
                                 thinking_on(enable_thinking, None, thinks_by_default(tokenizer)),
                                 chat_format(tokenizer), image_tokens)
    if newline_loss:  # the template writes a newline right after every assistant turn's <|im_end|>
        spans = [(start, end + 1) for start, end in spans]
    ids, offsets = _encode_as_text(tokenizer, text, marks)
    mask = [0] * len(ids)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] < end:  # offsets only grow: this span is done with
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= start and end <= spans[k][1]:
            mask[t] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- parse


def parse_call(body: str) -> dict | None:
    """One `<tool_call>` body as an OpenAI tool call, or None if it is not a well-formed call. Never raises:
    model text is data, and json's limits (a 5,000-digit number, 100,000-deep nesting) just make it no call."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
            return None
        args = data.get("arguments", {})
        if args is None:
            args = {}
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is Python's int-str limit
        return None
    return {"type": "function", "function": {"name": data["name"], "arguments": args}}


class AssistantParser:
    """THE parser of an assistant turn's text, fed piece by piece as it streams (or whole: `parse_assistant`).

    `feed` and `finish` return OpenAI-style deltas: {"reasoning_content": ...} until the first `</think>` when the
    turn is thinking (the prompt opened `<think>`; a `<think>` the model writes first is dropped; thinking None:
    the prompt left it to the model, and the turn is thinking if it starts with `<think>`), then
    {"content": ...}, and {"tool_calls": [call]} for each `<tool_call>{json}</tool_call>` block whose JSON parses
    (a block that does not parse, or never closes, stays text: model output is data, never code). Text that may
    still become a tag is held back until decided; whitespace around reasoning and content is trimmed as the
    template writes it. `message` gathers the deltas, so a streamed and a whole answer always agree. Given
    `call_id` (a function making ids), each call carries an OpenAI `index` and `id`, as the API sends them.
    Work is linear in the text, however it is split and however many tags never close."""

    def __init__(self, thinking: bool | None, parse_tools: bool = True,
                 call_id: Callable[[], str] | None = None) -> None:
        self.mode = "reasoning_content" if thinking is not False else "content"
        self.decided = thinking is not None
        self.parse_tools, self.call_id = parse_tools, call_id
        self.buf = ""  # text not classified yet
        # While buf is an open <tool_call> block, new pieces wait here and only they are searched for its end:
        # growing and rescanning buf on every piece would be quadratic in a block that never closes.
        self.open_block: list[str] | None = None
        self.open_tail = ""  # the block's last len(CALL_CLOSE) - 1 characters: a close tag may straddle pieces
        self.started = {"reasoning_content": False, "content": False}
        self.held = {"reasoning_content": "", "content": ""}  # trailing whitespace: kept only if text follows
        self.parts: dict[str, list[str]] = {"reasoning_content": [], "content": []}  # joined by `message`
        self.tool_calls: list[dict] = []

    @property
    def message(self) -> dict[str, Any]:
        """What was parsed so far: {"reasoning_content", "content", "tool_calls"}."""
        return {**{key: "".join(parts) for key, parts in self.parts.items()}, "tool_calls": self.tool_calls}

    def feed(self, piece: str) -> list[dict]:
        if self.open_block is not None:
            tail = self.open_tail + piece
            self.open_block.append(piece)
            if CALL_CLOSE not in tail:
                self.open_tail = tail[1 - len(CALL_CLOSE):]
                return []
            self.buf, self.open_block = "".join(self.open_block), None
        else:
            self.buf += piece
        return self._run(final=False)

    def finish(self) -> list[dict]:
        if self.open_block is not None:
            self.buf, self.open_block = "".join(self.open_block), None
        return self._run(final=True)

    def _emit(self, key: str, text: str, out: list[dict]) -> None:
        chars = "\n" if key == "reasoning_content" else None  # reasoning keeps its spaces, content is stripped
        if not self.started[key]:
            text = text.lstrip(chars)
            if not text:
                return
            self.started[key] = True
        text = self.held[key] + text
        body = text.rstrip(chars)
        self.held[key] = text[len(body):]
        if body:
            out.append({key: body})
            self.parts[key].append(body)

    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        if self.mode == "reasoning_content" and not self.started["reasoning_content"]:
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):  # the model opened thinking itself
                self.buf, self.decided = head[len(THINK_OPEN):], True
            elif THINK_OPEN.startswith(head) and not final:
                return out  # may still become <think>
            elif not self.decided:  # left to the model, which did not think
                self.mode = "content"
            self.decided = True
        buf, pos = self.buf, 0  # a cursor, not slicing: many blocks in one text must not copy it each time
        while pos < len(buf):
            tag = THINK_CLOSE if self.mode == "reasoning_content" else CALL_OPEN if self.parse_tools else None
            at = buf.find(tag, pos) if tag else -1
            if at == -1:  # no tag: all but a tail that could be the start of one is settled
                keep = 0 if final or not tag else _tag_prefix(buf[max(pos, len(buf) - len(tag)):], tag)
                self._emit(self.mode, buf[pos:len(buf) - keep], out)
                pos = len(buf) - keep
                break
            self._emit(self.mode, buf[pos:at], out)
            if tag == THINK_CLOSE:
                pos, self.mode = at + len(tag), "content"
                continue
            end = buf.find(CALL_CLOSE, at)
            if end == -1:  # an open block: wait for its end (at the very end it is plain text)
                if final:
                    self._emit("content", buf[at:], out)
                    pos = len(buf)
                else:
                    self.open_block, self.open_tail, pos = [buf[at:]], buf[1 - len(CALL_CLOSE):], len(buf)
                break
            call = parse_call(buf[at + len(CALL_OPEN):end].strip())
            if call is None:  # not a well-formed call: it stays in the text
                self._emit("content", buf[at:end + len(CALL_CLOSE)], out)
            else:
                if self.call_id:
                    call = {"index": len(self.tool_calls), "id": self.call_id(), **call}
                self.tool_calls.append(call)
                out.append({"tool_calls": [call]})
            pos = end + len(CALL_CLOSE)
        self.buf = buf[pos:]
        return out


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_assistant(text: str, thinking: bool | None = None) -> dict[str, Any]:
    """A whole generated assistant turn as {"reasoning_content" (None if empty), "content", "tool_calls"}:
    AssistantParser over the text up to `<|im_end|>`. `thinking` says whether the prompt opened `<think>`;
    None reads it from the text (a `</think>` in it, or a `<think>` at its start)."""
    text = text.split(IM_END)[0].replace(PAD, "")
    if thinking is None:
        thinking = THINK_CLOSE in text or text.lstrip().startswith(THINK_OPEN)
    parser = AssistantParser(thinking)
    parser.feed(text)
    parser.finish()
    message = parser.message
    return {"reasoning_content": message["reasoning_content"] or None, "content": message["content"],
            "tool_calls": message["tool_calls"]}
