"""An OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health, with
streaming, thinking, tool calls and continuous batching. `minimind serve --model DIR [--port 8998]`.

`create_app(model, tokenizer)` builds the app; the Scheduler thread does all decoding.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind.chat import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, _parse_call, encode_chat
from minimind.generation import Completion, SamplingParams
from minimind.serve.scheduler import Event, QueueFull, Scheduler

log = logging.getLogger("minimind.serve")
API_KEY_ENV = "MINIMIND_API_KEY"


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


class Dispatcher:
    """Hands events from the scheduler thread to the requests' asyncio queues. Events of one decoding step
    travel together: one wake-up of the event loop per step, not one per token per stream."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:  # a drain is already scheduled and will take this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>` (compared in constant time). Plain ASGI, so
    streamed responses pass through untouched."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                 type="authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- request schemas (unknown fields are allowed, as OpenAI clients send extras; known ones are typed) ----


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extensions (vLLM's names)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=128)
    ignore_eos: bool = False  # extension (vLLM's): generate max_tokens tokens whatever the model says
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None  # MiniMind's clients send these at the top level
    open_thinking: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False


def repetition_penalty(req: _Sampling) -> float:
    """OpenAI's additive frequency/presence penalties have no exact equivalent in our sampler; map them to the
    CTRL repetition penalty: 1 + (frequency_penalty + presence_penalty) / 2, kept in [0.5, 3]. An explicit
    `repetition_penalty` wins."""
    if req.repetition_penalty is not None:
        return req.repetition_penalty
    extra = (req.frequency_penalty or 0.0) + (req.presence_penalty or 0.0)
    return min(3.0, max(0.5, 1.0 + extra / 2))


# ---- streaming parse of an assistant turn -------------------------------------------------------------


class StreamParser:
    """Turns the text of one choice, piece by piece, into OpenAI deltas: reasoning_content (until `</think>`
    when the prompt opened thinking), content, and tool_calls (each `<tool_call>{json}</tool_call>` block whose
    JSON parses; others stay text). For well-formed turns the deltas add up to exactly what `parse_assistant`
    makes of the whole text (tests check it). Text that may still become a tag is held back until decided, and
    the non-streaming answer is built from the same deltas, so the two always agree."""

    def __init__(self, thinking: bool, parse_tools: bool = True) -> None:
        self.mode = "reasoning_content" if thinking else "content"
        self.parse_tools = parse_tools
        self.buf = ""  # text not classified yet
        self.started = {"reasoning_content": False, "content": False}
        self.held = {"reasoning_content": "", "content": ""}  # trailing whitespace: kept only if text follows
        self.message: dict[str, Any] = {"reasoning_content": "", "content": "", "tool_calls": []}

    def feed(self, piece: str) -> list[dict]:
        self.buf += piece
        return self._run(final=False)

    def finish(self) -> list[dict]:
        return self._run(final=True)

    def _emit(self, key: str, text: str, out: list[dict]) -> None:
        chars = "\n" if key == "reasoning_content" else None  # parse_assistant: strip("\n") / strip()
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
            self.message[key] += body

    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while self.buf:
            tag = THINK_CLOSE if self.mode == "reasoning_content" else CALL_OPEN if self.parse_tools else None
            at = self.buf.find(tag) if tag else -1
            if at == -1:  # no tag: all but a tail that could be the start of one is settled
                keep = 0 if final or not tag else _tag_prefix(self.buf, tag)
                self._emit(self.mode, self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                break
            self._emit(self.mode, self.buf[:at], out)
            if tag == THINK_CLOSE:
                self.buf, self.mode = self.buf[at + len(tag):], "content"
                continue
            end = self.buf.find(CALL_CLOSE, at)
            if end == -1:  # an open block: wait for its end (at the very end it is plain text)
                if final:
                    self._emit("content", self.buf[at:], out)
                    self.buf = ""
                else:
                    self.buf = self.buf[at:]
                break
            call = _parse_call(self.buf[at + len(CALL_OPEN):end].strip())
            if call is None:  # not a well-formed call: it stays in the text
                self._emit("content", self.buf[at:end + len(CALL_CLOSE)], out)
            else:
                call = {"index": len(self.message["tool_calls"]), "id": new_id("call_"), **call}
                self.message["tool_calls"].append(call)
                out.append({"tool_calls": [call]})
            self.buf = self.buf[end + len(CALL_CLOSE):]
        return out


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ---- the app ------------------------------------------------------------------------------------------


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(model, tokenizer, name: str = "minimind", api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, default_max_tokens: int | None = None) -> FastAPI:
    """The API app. api_key (or $MINIMIND_API_KEY) turns on bearer-token auth for /v1/*. The scheduler thread
    starts with the app and stops with it. default_max_tokens caps requests that set no max_tokens (None: the
    rest of the context)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    context = model.config.max_position_embeddings
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    created = int(time.time())
    params_count = model.num_parameters()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher.loop = asyncio.get_running_loop()
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="minimind", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            message = f"malformed JSON in the request body: {err.get('ctx', {}).get('error', err['msg'])}"
            return APIError(400, message).response()
        param = ".".join(loc) or None
        message = f"{param}: {err['msg']}" if param else err["msg"]
        if err.get("type") == "missing":
            message = f"{param} is required"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "minimind",
                                            "parameters": params_count, "context_length": context}]}

    def sampling(req: _Sampling, prompt_len: int, max_tokens: int | None) -> list[SamplingParams]:
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens "
                           f"(prompt plus completion)", param="messages", code="context_length_exceeded")
        room = context - prompt_len
        limit = min(room, default_max_tokens or room)
        max_new = limit if max_tokens is None else min(max_tokens, room)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
            return [SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                   top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                                   min_p=req.min_p or 0.0, repetition_penalty=repetition_penalty(req),
                                   stop=tuple(s for s in stop if s),
                                   seed=None if req.seed is None else req.seed + i)
                    for i in range(req.n)]
        except ValueError as e:
            raise APIError(400, str(e)) from None

    dispatcher = Dispatcher()

    async def run_jobs(request: Request, jobs: list[tuple[list[int], list[SamplingParams]]],
                       ignore_eos: bool = False) -> AsyncIterator[tuple[int, Event]]:
        """Submit jobs and yield (choice offset + index, event) until every choice is done. Cancels the jobs
        when the consumer stops early (a client that went away)."""
        queue: asyncio.Queue = asyncio.Queue()
        submitted, offset = [], 0
        try:
            for prompt, params in jobs:
                base = offset

                def emit(ev: Event, base: int = base) -> None:
                    dispatcher.put(queue, (base, ev))

                try:
                    submitted.append(scheduler.submit(prompt, params, emit, ignore_eos))
                except QueueFull as e:
                    raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
                except ValueError as e:
                    raise APIError(400, str(e), param="n") from None
                offset += len(params)
            remaining = offset
            while remaining:
                item = await _get(queue, timeout=1.0)
                if item is None:
                    if await request.is_disconnected():
                        return
                    continue
                base, ev = item
                if ev.kind == "error":
                    raise APIError(500, ev.text, type="server_error")
                if ev.kind == "done":
                    remaining -= 1
                yield base + ev.index, ev
                if queue.empty():
                    yield -1, None  # caught up: a stream writes what it has gathered in one send
        finally:
            for job in submitted:
                if not job.done:
                    scheduler.cancel(job)

    def usage(results: list[Completion], prompt_tokens: int) -> dict:
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def body(request: Request, schema: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except Exception as e:  # pydantic.ValidationError
            errors = getattr(e, "errors", lambda: [])()
            raise RequestValidationError(errors) from None

    # ---- chat ----

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = await body(request, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages must contain at least one message", param="messages",
                           code="empty_messages")
        kwargs = req.chat_template_kwargs or {}
        thinking = bool(kwargs.get("enable_thinking", kwargs.get("open_thinking", False))
                        or req.enable_thinking or req.open_thinking)
        tools = req.tools or None
        use_tools = tools is not None and req.tool_choice != "none"
        if use_tools and isinstance(req.tool_choice, dict):  # a named function: offer only that one
            wanted = (req.tool_choice.get("function") or {}).get("name")
            tools = [t for t in tools if (t.get("function") or t).get("name") == wanted] or tools
        try:
            ids, _ = encode_chat(tokenizer, req.messages, tools=tools if use_tools else None,
                                 add_generation_prompt=True, enable_thinking=thinking)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, len(ids), max_tokens)
        rid, now = new_id("chatcmpl-"), int(time.time())
        parsers = [StreamParser(thinking, parse_tools=use_tools) for _ in params]
        events = run_jobs(request, [(ids, params)], req.ignore_eos)

        def finish_reason(i: int, r: Completion) -> str:
            return "tool_calls" if parsers[i].message["tool_calls"] else r.finish_reason

        if not req.stream:
            results: dict[int, Completion] = {}
            async for i, ev in events:
                if ev is None:
                    continue
                if ev.kind == "piece":
                    parsers[i].feed(ev.text)
                elif ev.kind == "done":
                    parsers[i].finish()
                    results[i] = ev.result
            _check_complete(results, len(params))
            choices = []
            for i, p in enumerate(parsers):
                message = {"role": "assistant", "content": p.message["content"]}
                if p.started["reasoning_content"]:
                    message["reasoning_content"] = p.message["reasoning_content"]
                if p.message["tool_calls"]:
                    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                             for c in p.message["tool_calls"]]
                    message["content"] = message["content"] or None
                choices.append({"index": i, "message": message, "logprobs": None,
                                "finish_reason": finish_reason(i, results[i])})
            return {"id": rid, "object": "chat.completion", "created": now, "model": name, "choices": choices,
                    "usage": usage([results[i] for i in range(len(params))], len(ids))}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(i: int, delta: dict, reason: str | None = None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            if include_usage:
                data["usage"] = None
            return _sse(data)

        first = await _first_event(events)  # errors before the stream starts get a proper status code

        async def stream() -> AsyncIterator[str]:
            results: list[Completion | None] = [None] * len(params)
            out = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(params))]
            try:
                async for i, ev in _chain(first, events):
                    if ev is None:
                        yield "".join(out)
                        out = []
                    elif ev.kind == "piece":
                        out += [chunk(i, delta) for delta in parsers[i].feed(ev.text)]
                    elif ev.kind == "done":
                        results[i] = ev.result
                        out += [chunk(i, delta) for delta in parsers[i].finish()]
                        out.append(chunk(i, {}, finish_reason(i, ev.result)))
                if out:
                    yield "".join(out)
                if include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                                "choices": [], "usage": usage(results, len(ids))})
            except APIError as e:
                yield _sse(e.body())
            yield "data: [DONE]\n\n"

        return EventStream(stream(), events)

    # ---- plain completions ----

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await body(request, CompletionRequest)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        jobs, texts = [], []
        for p in prompts:
            ids = list(p) if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(not 0 <= t < model.config.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {model.config.vocab_size})", param="prompt")
            jobs.append((ids, sampling(req, len(ids), req.max_tokens if req.max_tokens is not None else 16)))
            texts.append(p if isinstance(p, str) else tokenizer.decode(ids))
        n_prompt = sum(len(ids) for ids, _ in jobs)
        rid, now = new_id("cmpl-"), int(time.time())
        events = run_jobs(request, jobs, req.ignore_eos)
        per = req.n

        def prefix(i: int) -> str:
            return texts[i // per] if req.echo else ""

        if not req.stream:
            results: dict[int, Completion] = {}
            async for i, ev in events:
                if ev is not None and ev.kind == "done":
                    results[i] = ev.result
            _check_complete(results, len(jobs) * per)
            choices = [{"index": i, "text": prefix(i) + results[i].text, "logprobs": None,
                        "finish_reason": results[i].finish_reason} for i in range(len(results))]
            return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": choices,
                    "usage": usage(list(results.values()), n_prompt)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        first = await _first_event(events)

        async def stream() -> AsyncIterator[str]:
            results = []

            def chunk(i: int, text: str, reason: str | None = None) -> str:
                return _sse({"id": rid, "object": "text_completion", "created": now, "model": name,
                             "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]})
            out = [chunk(i, prefix(i)) for i in range(len(jobs) * per)] if req.echo else []
            try:
                async for i, ev in _chain(first, events):
                    if ev is None:
                        yield "".join(out)
                        out = []
                    elif ev.kind == "piece":
                        out.append(chunk(i, ev.text))
                    elif ev.kind == "done":
                        results.append(ev.result)
                        out.append(chunk(i, "", ev.result.finish_reason))
                if out:
                    yield "".join(out)
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": now, "model": name,
                                "choices": [], "usage": usage(results, n_prompt)})
            except APIError as e:
                yield _sse(e.body())
            yield "data: [DONE]\n\n"

        return EventStream(stream(), events)

    return app


_END = object()


def _check_complete(results: dict, n: int) -> None:
    if len(results) < n:  # run_jobs stopped early: the client is gone, nobody reads this
        raise APIError(499, "client closed the request", code="client_closed")


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects: `jobs` (run_jobs' generator) is closed
    at once, which cancels its jobs, so their rows leave the batch at the next step (whatever the ASGI version).
    It is closed by name: closing `content` alone leaves it to Python's async-generator finalizer, a loop turn
    or more later."""

    def __init__(self, content: AsyncIterator[str], jobs: AsyncIterator) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.jobs = jobs

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            try:
                await self.stream_response(send)
            except OSError:
                pass

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.jobs.aclose()
            await self.body_iterator.aclose()


async def _get(queue: asyncio.Queue, timeout: float) -> Any:
    """queue.get(), or None after `timeout` seconds. Not asyncio.wait_for: before Python 3.12 it swallows a
    cancellation that arrives as the get completes, and then a departed client's decode runs to its end."""
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait([getter], timeout=timeout)
    finally:
        getter.cancel()  # still waiting: the item stays in the queue
    return getter.result() if getter.done() and not getter.cancelled() else None


async def _first_event(events: AsyncIterator) -> Any:
    """Await the first event, so a full queue or bad request fails with its status before streaming starts."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return _END


async def _chain(first: Any, events: AsyncIterator) -> AsyncIterator:
    if first is _END:
        return
    yield first
    async for ev in events:
        yield ev


def serve(model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 8998, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, log_level: str = "info") -> None:
    """Run the API server in the foreground (Ctrl-C stops it)."""
    import uvicorn

    app = create_app(model, tokenizer, name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
