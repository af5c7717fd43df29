"""An OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health, with
streaming, thinking, tool calls and continuous batching. `minimind serve --model DIR [--port 8998]`.

`create_app(model, tokenizer)` builds the app and puts what the endpoints need in `app.state`; the endpoints
are module-level functions reading it; the Scheduler thread does all decoding. Schemas: minimind.serve.schemas.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind.chat import AssistantParser, chat_format, check_format, encode_chat, render, thinks_by_default
from minimind.generation import Completion, SamplingParams
from minimind.serve.images import ImageLimits, request_images
from minimind.serve.scheduler import Event, QueueFull, Scheduler
from minimind.serve.schemas import (
    DEFAULT_MAX_BODY_BYTES,
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_message,
    chat_options,
    completion_prompts,
    new_id,
    parse_body,
    prompt_too_long,
    sampling_params,
    sse,
    usage,
    validation_error,
)

API_KEY_ENV = "MINIMIND_API_KEY"
router = APIRouter()


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


class Guard:
    """ASGI middleware in front of every route. With an API key: `Authorization: Bearer <key>` (compared in
    constant time) on every route; without it /health answers only {"status": "ok"} (a liveness probe) and the
    rest 401. Without a key: the Host header must name the address the connection came to, else a web page
    could reach a loopback server under its own domain (DNS rebinding). POST bodies must be declared JSON: a
    form or text/plain body is what a cross-site page can send without a CORS preflight. Plain ASGI, so
    streamed responses pass through untouched."""

    def __init__(self, app, key: str | None) -> None:
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.key is not None:
            header = headers.get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                if scope["path"] == "/health":
                    return JSONResponse({"status": "ok"})
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                type="authentication_error", code="invalid_api_key").response()
        elif not _host_is_local(headers.get(b"host", b"").decode("latin-1"), scope.get("server")):
            return APIError(421, "the Host header does not name this server's address; to serve under other "
                            "names, set an API key (--api-key)", code="misdirected_request").response()
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json" and not (kind.startswith(b"application/") and kind.endswith(b"+json")):
                return APIError(415, "the request body must be JSON (Content-Type: application/json)",
                                code="unsupported_media_type").response()
        return None


def _host_is_local(host: str, server: tuple | None) -> bool:
    """Whether a Host header names `server`, the (address, port) the connection came to: that address itself,
    or `localhost` when it is a loopback one. No address (a Unix socket): nothing to check against."""
    if not server:
        return True
    try:
        name = urlsplit("//" + host).hostname
    except ValueError:  # a malformed port or IPv6 literal
        return False
    if name is None:
        return False
    if name == str(server[0]).lower():
        return True
    try:
        address = ipaddress.ip_address(server[0])
    except ValueError:
        return False
    if name == "localhost":
        return address.is_loopback
    try:
        return ipaddress.ip_address(name) == address
    except ValueError:
        return False


# ---- the app ------------------------------------------------------------------------------------------


def create_app(model, tokenizer, name: str = "minimind", api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, default_max_tokens: int | None = None,
               sampling_defaults: dict | None = None, max_model_len: int | None = None,
               max_body_bytes: int | None = None, docs: bool = False,
               image_limits: ImageLimits | None = None) -> FastAPI:
    """The API app. api_key (or $MINIMIND_API_KEY) turns on bearer-token auth for every route (see Guard). The
    scheduler thread starts with the app and stops with it. default_max_tokens caps requests that set no
    max_tokens (None: the model's max_new_tokens, else 512). sampling_defaults
    (generation.sampling_defaults of the model directory) fills the sampling fields a request omits; None or
    {}: OpenAI's defaults. max_model_len: the context served (prompt plus completion; None: the model's).
    max_body_bytes: larger request bodies get 413 (None: DEFAULT_MAX_BODY_BYTES). docs: serve /docs, /redoc
    and /openapi.json. image_limits: how images in chat requests are taken (a vision model's; see ImageLimits)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    context = model.config.max_position_embeddings
    if max_model_len is not None and not 0 < max_model_len <= context:
        raise ValueError(f"max_model_len {max_model_len} must be in [1, {context}] (the model's context)")
    off = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="minimind", lifespan=_lifespan, **off)
    state = app.state
    state.model, state.tokenizer, state.name = model, tokenizer, name
    state.chat_format, state.thinks_by_default = chat_format(tokenizer), thinks_by_default(tokenizer)
    state.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    state.dispatcher = Dispatcher()
    state.context = max_model_len or context
    state.max_body_bytes = max_body_bytes or DEFAULT_MAX_BODY_BYTES
    state.image_limits = image_limits or ImageLimits()
    state.image_token_id = getattr(getattr(model, "vision", None), "image_token_id", None)  # None: text-only
    # A token stands for at most this many characters, so a longer text cannot fit the context and is
    # refused before it is tokenized. (The vocabulary's strings, byte-level, have one character per byte.)
    state.max_prompt_chars = state.context * max(map(len, tokenizer.get_vocab()), default=1)
    state.created, state.parameters = int(time.time()), model.num_parameters()
    state.default_max_tokens, state.sampling_defaults = default_max_tokens, dict(sampling_defaults or {})
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
    app.add_middleware(Guard, key=api_key)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.dispatcher.loop = asyncio.get_running_loop()
    app.state.scheduler.start()
    yield
    app.state.scheduler.stop()


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return validation_error(e.errors()).response()


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return APIError(e.status_code, str(e.detail), type=kind).response()


async def _internal(request: Request, e: Exception) -> JSONResponse:
    """A bug still answers in OpenAI's shape (the traceback goes to the server's log)."""
    return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()


@router.get("/health")
async def health(request: Request) -> dict:
    state = request.app.state
    return {"status": "ok", "model": state.name, **state.scheduler.stats()}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = request.app.state
    return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                        "owned_by": "minimind", "parameters": state.parameters,
                                        "context_length": state.context,
                                        "thinks_by_default": state.thinks_by_default,
                                        "vision": state.image_token_id is not None,
                                        "sampling_defaults": state.sampling_defaults}]}


async def run_jobs(request: Request, jobs: list[tuple[list[int], list[SamplingParams], Any]],
                   ignore_eos: bool = False) -> AsyncIterator[tuple[int, Event]]:
    """Submit jobs (prompt, sampling settings per choice, pixel values or None) and yield (choice offset +
    index, event) until every choice is done. Cancels the jobs when the consumer stops early, and the moment
    the client disconnects (streaming or not), so their rows leave the batch at the next step."""
    scheduler, dispatcher = request.app.state.scheduler, request.app.state.dispatcher
    if len(jobs) > scheduler.max_queue:  # could never be queued at once: no point in "retry later"
        raise APIError(400, f"this request has {len(jobs)} prompts; the server queues at most "
                       f"{scheduler.max_queue} (its --max-queue)", param="prompt", code="too_many_prompts")
    queue: asyncio.Queue = asyncio.Queue()
    submitted, offset = [], 0

    def client_gone(watch: asyncio.Future) -> None:
        if not watch.cancelled():
            for job in submitted:
                scheduler.cancel(job)
            queue.put_nowait(None)  # wakes the loop below

    gone = asyncio.ensure_future(_disconnect(request))
    gone.add_done_callback(client_gone)
    try:
        for prompt, params, pixels in jobs:
            base = offset

            def emit(ev: Event, base: int = base) -> None:
                dispatcher.put(queue, (base, ev))

            try:
                submitted.append(scheduler.submit(prompt, params, emit, ignore_eos, images=pixels))
            except QueueFull as e:
                raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
            except ValueError as e:
                raise APIError(400, str(e), param="n") from None
            offset += len(params)
        remaining = offset
        while remaining:
            item = await _get(queue, timeout=1.0)
            if item is None:
                if gone.done():
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
        gone.cancel()
        for job in submitted:
            if not job.done:
                scheduler.cancel(job)


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects. The body has been read: what the server receives next is that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- chat ----


@router.post("/v1/chat/completions")
async def chat(request: Request):
    state = request.app.state
    req: ChatRequest = await parse_body(request, ChatRequest)
    if not req.messages:
        raise APIError(400, "messages must contain at least one message", param="messages",
                       code="empty_messages")
    thinking, tools = chat_options(req, state.thinks_by_default)
    try:
        check_format(state.chat_format, thinking, tools)
    except ValueError as e:  # a minimind2-era model has no tokens for thinking or tools
        raise APIError(400, str(e), param="tools" if tools else "enable_thinking",
                       code="unsupported_by_model") from None
    ids, pixels = await asyncio.to_thread(_encode_messages, state, req.messages, tools, thinking)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, len(ids), max_tokens, state.context, state.sampling_defaults,
                             state.default_max_tokens)
    rid, now, name = new_id("chatcmpl-"), int(time.time()), state.name
    parsers = [AssistantParser(thinking, parse_tools=tools is not None, call_id=lambda: new_id("call_"))
               for _ in params]
    events = run_jobs(request, [(ids, params, pixels)], req.ignore_eos)

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
        choices = [{"index": i, "message": chat_message(p), "logprobs": None,
                    "finish_reason": finish_reason(i, results[i])} for i, p in enumerate(parsers)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": name, "choices": choices,
                "usage": usage([results[i] for i in range(len(params))], len(ids))}

    include_usage = bool((req.stream_options or {}).get("include_usage"))

    def chunk(i: int, delta: dict, reason: str | None = None) -> str:
        data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            data["usage"] = None
        return sse(data)

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
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                           "choices": [], "usage": usage(results, len(ids))})
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    return EventStream(stream(), events)


def _encode_messages(state, messages: list[dict], tools: list[dict] | None,
                     thinking: bool | None) -> tuple[list[int], Any]:
    """The prompt's token ids and its images' pixel values (None without images), run off the event loop: a
    long prompt takes a while to tokenize, an image to decode. A text too long for the context by its length
    alone is refused before it is tokenized; each image becomes image_tokens pads at its placeholder."""
    messages, pixels = request_images(state.model, messages, state.image_limits)
    try:
        text = render(messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking,
                      chat_format=state.chat_format, thinks_by_default=state.thinks_by_default)
        if len(text) > state.max_prompt_chars:
            raise prompt_too_long(len(text), state.context, "messages")
        ids, _ = encode_chat(state.tokenizer, messages, tools=tools, add_generation_prompt=True,
                             enable_thinking=thinking,
                             image_tokens=0 if state.image_token_id is None else state.model.image_tokens)
    except ValueError as e:  # a malformed message, or a number too long to convert in a tool call's JSON
        raise APIError(400, f"messages: {e}", param="messages") from None
    except RecursionError:  # a tool call's JSON string nested too deeply
        raise APIError(400, "messages: nested too deeply", param="messages") from None
    return ids, pixels


# ---- plain completions ----


@router.post("/v1/completions")
async def completions(request: Request):
    state = request.app.state
    req: CompletionRequest = await parse_body(request, CompletionRequest)
    max_tokens = req.max_tokens if req.max_tokens is not None else (
        state.default_max_tokens or state.sampling_defaults.get("max_new_tokens", 16))
    jobs, texts = [], []
    prompts = await asyncio.to_thread(lambda: list(completion_prompts(
        req, state.tokenizer, state.model.config.vocab_size, state.max_prompt_chars, state.context)))
    for k, (ids, text) in enumerate(prompts):
        if state.image_token_id in ids:  # its features would be missing: images come through chat messages
            raise APIError(400, f"prompt {k} holds the image token (id {state.image_token_id}), which this vision "
                           "model fills with image features; send images as image_url parts to /v1/chat/completions",
                           param="prompt", code="invalid_value")
        jobs.append((ids, sampling_params(req, len(ids), max_tokens, state.context, state.sampling_defaults), None))
        texts.append(text)
    n_prompt = sum(len(ids) for ids, _, _ in jobs)
    rid, now, name = new_id("cmpl-"), int(time.time()), state.name
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
            return sse({"id": rid, "object": "text_completion", "created": now, "model": name,
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
                yield sse({"id": rid, "object": "text_completion", "created": now, "model": name,
                           "choices": [], "usage": usage(results, n_prompt)})
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    return EventStream(stream(), events)


# ---- streaming responses that stop when the client goes -------------------------------------------------


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


def serve(model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 8998, log_level: str = "info",
          **options: Any) -> None:
    """Run the API server in the foreground (Ctrl-C stops it). options: create_app's."""
    import uvicorn

    app = create_app(model, tokenizer, name=name, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
