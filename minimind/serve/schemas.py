"""The OpenAI API's shapes for minimind.serve.api: request schemas and their validation, errors in OpenAI's
shape, sampling settings from a request, the streaming parse of an assistant turn, and response pieces (SSE)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from minimind.chat import AssistantParser, thinking_on
from minimind.generation import GENERATION_DEFAULTS, Completion, SamplingParams

# ---- errors in OpenAI's shape ----------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for a request body that is not valid JSON or does not fit its schema (the first problem)."""
    err = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON in the request body: {err.get('ctx', {}).get('error', err['msg'])}")
    param = ".".join(loc) or None
    message = f"{param}: {err['msg']}" if param else err["msg"]
    if err.get("type") == "missing":
        message = f"{param} is required"
    return APIError(400, message, param=param, code="invalid_value")


# ---- request schemas (unknown fields are allowed, as OpenAI clients send extras; known ones are typed) ----

# A request without max_tokens, served with no --default-max-tokens from a model whose generation_config.json
# sets no max_new_tokens, gets what every directory we write sets: not the rest of a 32k context, which would
# hold every co-batched row's KV cache at its longest.
FALLBACK_MAX_TOKENS = GENERATION_DEFAULTS["max_new_tokens"]
MAX_STOP = 4  # stop strings per request, as OpenAI allows: each is checked against every new token
MAX_STOP_CHARS = 256


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extensions (vLLM's names); the sampler clamps it to the vocabulary
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # it divides the scores: keep it off 0
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as vLLM (torch's seeds take 64 bits)
    n: int = Field(1, ge=1, le=128)
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens tokens whatever the model says
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class ChatRequest(SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None  # MiniMind's clients send these at the top level
    open_thinking: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False


DEFAULT_MAX_BODY_BYTES = 4 << 20  # a full 32k-token context of CJK text is about 0.4 MB
MAX_JSON_DEPTH = 64  # a tool's JSON schema nests a few levels; nobody's nests 64


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; one over `limit` bytes answers 413 before more of it is read."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes (the server's --max-body-bytes)",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(data: Any) -> int:
    """How deeply arrays and objects nest in data (iterative: any depth is measured safely)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        node, depth = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


async def parse_body(request: Request, schema: type[BaseModel]) -> Any:
    """The request's JSON body validated against schema; a malformed or invalid body answers 400, one larger
    than the app's max_body_bytes 413."""
    raw = await read_body(request, request.app.state.max_body_bytes)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # bad JSON or UTF-8, or an integer of more than 4,300 digits
        raise APIError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return schema.model_validate(data)
    except Exception as e:  # pydantic.ValidationError
        errors = getattr(e, "errors", lambda: [])()
        raise RequestValidationError(errors) from None


def chat_options(req: ChatRequest, thinks_by_default: bool = False) -> tuple[bool | None, list[dict] | None]:
    """(thinking: on, off or None for the model to decide, the tools to offer or None) from a chat request's
    fields and MiniMind's aliases.

    Thinking follows chat.thinking_on: `enable_thinking` decides when the request gives it (in
    chat_template_kwargs, else at the top level), else `open_thinking` (MiniMind's name, in either place), else
    the model's default."""
    kwargs = req.chat_template_kwargs or {}

    def flag(name: str) -> bool | None:
        value = kwargs.get(name)
        if value is not None and not isinstance(value, bool):
            raise APIError(400, f"chat_template_kwargs.{name} must be true or false, got {value!r}",
                           param=f"chat_template_kwargs.{name}")
        return value if value is not None else getattr(req, name)

    thinking = thinking_on(flag("enable_thinking"), flag("open_thinking"), thinks_by_default)
    tools = req.tools or None
    for i, tool in enumerate(tools or []):
        if not isinstance(_function_name(tool), str):
            raise APIError(400, f'tools.{i} must be {{"type": "function", "function": {{"name": ...}}}}',
                           param=f"tools.{i}")
    if tools is None or req.tool_choice == "none":
        return thinking, None
    if isinstance(req.tool_choice, dict):  # a named function: offer only that one
        wanted = _function_name(req.tool_choice)
        if not isinstance(wanted, str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                           '"function": {"name": ...}}', param="tool_choice")
        tools = [t for t in tools if _function_name(t) == wanted] or tools
    return thinking, tools


def _function_name(tool: dict) -> Any:
    """The name of an OpenAI {"type": "function", "function": {"name": ...}} or a bare {"name": ...}; None
    when it has neither shape."""
    fn = tool.get("function") or tool
    return fn.get("name") if isinstance(fn, dict) else None


def prompt_too_long(chars: int, context: int, param: str) -> APIError:
    """The 400 for a prompt text that no tokenization could fit in the context (told by its length alone)."""
    return APIError(400, f"the prompt has {chars} characters, more than this model's context of {context} tokens "
                    f"can hold", param=param, code="context_length_exceeded")


def completion_prompts(req: CompletionRequest, tokenizer, vocab_size: int, max_chars: int,
                       context: int) -> Iterator[tuple[list[int], str]]:
    """(token ids, text) of each prompt of a completions request (a string, strings, or token ids), each
    checked as it is reached; a string longer than max_chars is refused before it is tokenized."""
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    for p in prompts:
        if isinstance(p, str) and len(p) > max_chars:
            raise prompt_too_long(len(p), context, "prompt")
        ids = list(p) if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if any(not 0 <= t < vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        yield ids, p if isinstance(p, str) else tokenizer.decode(ids)


def repetition_penalty(req: SamplingRequest, default: float = 1.0) -> float:
    """OpenAI's additive frequency/presence penalties have no exact equivalent in our sampler; map them to the
    CTRL repetition penalty: 1 + (frequency_penalty + presence_penalty) / 2, kept in [0.5, 3]. An explicit
    `repetition_penalty` wins; a request with neither gets `default`."""
    if req.repetition_penalty is not None:
        return req.repetition_penalty
    if req.frequency_penalty is None and req.presence_penalty is None:
        return default
    extra = (req.frequency_penalty or 0.0) + (req.presence_penalty or 0.0)
    return min(3.0, max(0.5, 1.0 + extra / 2))


def sampling_params(req: SamplingRequest, prompt_len: int, max_tokens: int | None, context: int,
                    defaults: dict, default_max_tokens: int | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice (n). Fields the request omits come from `defaults` (the model's
    generation_config.json, as generation.sampling_defaults reads it), else OpenAI's defaults (temperature 1,
    no top-k/top-p/min-p, no penalty). max_tokens None: default_max_tokens (the server's cap), else the model's
    max_new_tokens, else FALLBACK_MAX_TOKENS; never more than the context leaves."""
    if prompt_len >= context:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens "
                       f"(prompt plus completion)", param="messages", code="context_length_exceeded")
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = default_max_tokens or defaults.get("max_new_tokens") or FALLBACK_MAX_TOKENS
    max_new = min(max_tokens, room)

    def pick(value: Any, key: str, fallback: float) -> Any:
        return defaults.get(key, fallback) if value is None else value

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop sequences are allowed, got {len(stop)}", param="stop",
                       code="invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop: each stop sequence must be at most {MAX_STOP_CHARS} characters", param="stop",
                       code="invalid_value")
    try:
        return [SamplingParams(max_new_tokens=max_new, temperature=pick(req.temperature, "temperature", 1.0),
                               top_k=pick(req.top_k, "top_k", 0), top_p=pick(req.top_p, "top_p", 1.0),
                               min_p=pick(req.min_p, "min_p", 0.0),
                               repetition_penalty=repetition_penalty(req, defaults.get("repetition_penalty", 1.0)),
                               stop=tuple(s for s in stop if s), seed=None if req.seed is None else req.seed + i)
                for i in range(req.n)]
    except ValueError as e:
        raise APIError(400, str(e)) from None


# ---- response pieces ------------------------------------------------------------------------------------


def chat_message(parser: AssistantParser) -> dict:
    """The whole assistant message of a non-streaming answer, from what the parser's deltas gathered."""
    message = {"role": "assistant", "content": parser.message["content"]}
    if parser.started["reasoning_content"]:
        message["reasoning_content"] = parser.message["reasoning_content"]
    if parser.message["tool_calls"]:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in parser.message["tool_calls"]]
        message["content"] = message["content"] or None
    return message


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def usage(results: list[Completion], prompt_tokens: int) -> dict:
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(data: Any) -> str:
    """One server-sent event carrying data as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
