"""The API server: continuous batching against single-request decoding, the streaming parser, and the real
server in a subprocess driven by the official `openai` client. `pytest tests/test_serve.py`."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, small_model

try:  # the openai SDK of this pin ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from minimind.chat import AssistantParser, encode_chat, parse_assistant, render
from minimind.commands.serve import free_port
from minimind.generation import Sampler, SamplingParams, generate, sampling_defaults
from minimind.serve.api import _get, create_app
from minimind.serve.scheduler import Scheduler
from minimind.serve.schemas import new_id
from minimind.tools import CALCULATOR_TOOL

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
KEY = {"Authorization": f"Bearer {API_KEY}"}
TOOL = CALCULATOR_TOOL  # the real tool, so the web page can run the whole tool loop
ASK = {"role": "user", "content": "What is 2 + 3?"}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"name": "calculator", "arguments": {"expression": "2 + 3"}}]}
HELLO_ANSWER = "Hi there! The king is dead; long live the king."
# (conversation, tools, enable_thinking): what the served model is taught by heart, so every feature has a
# known right answer: a plain reply, thinking, a tool call and the answer after the tool's result.
LESSONS = [
    ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": HELLO_ANSWER}], None, False),
    ([{"role": "user", "content": "Why?"}, {"role": "assistant", "reasoning_content": "To be, or not to be.",
                                             "content": "That is the question."}], None, True),
    ([ASK, CALL], [TOOL], False),
    ([ASK, CALL, {"role": "tool", "content": "5"}, {"role": "assistant", "content": "The answer is 5."}],
     [TOOL], False),
]


def build_chat_model(root: Path) -> Path:
    """A small random model trained by heart on LESSONS (about 10 s), with a tokenizer whose merges cover the
    chat and tool prompts (so sequences stay short). Built once per session, into `root`."""
    from minimind.checkpoint import save_model
    from minimind.tokenizer import train_tokenizer

    out = root / "model"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join(render(c, tools=t) for c, t, _ in LESSONS)
    (root / "corpus.txt").write_text("\n".join([text] * 20 + CORPUS * 20), encoding="utf-8")
    tok = train_tokenizer([root / "corpus.txt"], vocab_size=600, out_dir=root / "tok", progress=False)
    rows = [encode_chat(tok, c, tools=t) for c, t, _ in LESSONS]

    def batch(part):
        width = max(len(ids) for ids, _ in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        labels = torch.full((len(part), width), -100)
        for r, (i, m) in enumerate(part):
            ids[r, :len(i)] = torch.tensor(i)
            labels[r, :len(i)] = torch.where(torch.tensor(m) == 1, torch.tensor(i), -100)
        return ids, labels

    batches = [batch([r for r in rows if len(r[0]) > 100]), batch([r for r in rows if len(r[0]) <= 100])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster than two
    try:
        model = small_model("qwen3", seed=0, vocab_size=600, max_position_embeddings=1024).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            for ids, labels in batches:
                model(ids, labels=labels).loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_model(model.eval(), out, tok)
    return out


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    return build_chat_model(tmp_path_factory.getbasetemp() / "serve_chat_model")


def start_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(model_dir), "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


@pytest.fixture(scope="module")
def server(chat_model_dir):
    proc, url = start_server(chat_model_dir, "--api-key", API_KEY, "--max-batch", "16")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(chat_model_dir):
    """The same model in this process, for reference answers."""
    from minimind.checkpoint import load_model
    from minimind.tokenizer import load_tokenizer

    return load_model(chat_model_dir), load_tokenizer(chat_model_dir)


def greedy(local, messages, tools=None, think=False, max_new_tokens=60, stop=()):
    model, tok = local
    ids, _ = encode_chat(tok, messages, tools=tools, add_generation_prompt=True, enable_thinking=think)
    return ids, generate(model, tok, [ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0,
                                                           stop=stop))[0]


# ---- no server needed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [False, True])
def test_stream_parser_deltas_add_up_to_parse_assistant(thinking):
    texts = ["Hello there, friend.\n", "x <tool_call>\n{\"name\": \"calc\", \"arguments\": {\"x\": \"1\"}}\n"
             "</tool_call> and <tool_call>{\"name\": \"f\"}</tool_call>", "a < b <tool_call> not json </tool_call>",
             "<tool_call>{\"name\": \"calc\"", "plain <tool_ca"]
    if thinking:
        texts = [f"step one\nstep <b>two</b>\n</think>\n\n{t}" for t in texts] + ["still thinking <thi"]
    rng = random.Random(0)
    for text in texts:
        for _ in range(5):
            cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1)))
            parser = AssistantParser(thinking, call_id=lambda: new_id("call_"))
            got = {"reasoning_content": "", "content": "", "tool_calls": []}
            for a, b in zip([0] + cuts, cuts + [len(text)]):
                deltas = parser.feed(text[a:b])
                for d in deltas:
                    for k, v in d.items():
                        got[k] += v
            for d in parser.finish():
                for k, v in d.items():
                    got[k] += v
            want = parse_assistant(("<think>\n" if thinking else "") + text)
            assert got["tool_calls"] == parser.message["tool_calls"]
            assert got["content"] == want["content"]
            assert got["reasoning_content"] == (want["reasoning_content"] or "")
            assert [c["function"] for c in got["tool_calls"]] == [c["function"] for c in want["tool_calls"]]
            assert [c["index"] for c in got["tool_calls"]] == list(range(len(want["tool_calls"])))


@pytest.mark.parametrize("mode", ["eager", "slots", pytest.param("compiled", marks=pytest.mark.slow)])
def test_continuous_batching_decodes_each_row_as_if_alone(mode, monkeypatch):
    """Requests join a running batch at different steps and leave at different lengths; greedy rows must
    equal single-request decoding token for token, and seeded sampled rows must not depend on the company.
    "slots": the compiled path's fixed batch slots and cache lengths, its step run eagerly (compiles are slow)."""
    if mode == "slots":
        from minimind import generation
        from minimind.serve import scheduler

        monkeypatch.setattr(scheduler, "fixed_step", lambda model, cache, tokens, compile: generation.fixed_step(
            model, cache, tokens, False))
    torch.manual_seed(0)
    model = small_model("qwen3", seed=3)
    model.config.eos_token_id = -1  # never stop early: every row runs to its own length
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (3, 17, 9, 1, 30, 5, 12, 2)]
    params = [SamplingParams(max_new_tokens=6 + 3 * i, temperature=0 if i % 3 else 1.0, top_k=0 if i % 3 else 40,
                             seed=i) for i in range(len(prompts))]
    alone = [generate(model, None, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]

    sched = Scheduler(model, None, max_batch=5, max_queue=16, compile=mode != "eager")  # fewer slots than requests
    done = threading.Event()
    finished = []

    def emit(ev):
        if ev.kind == "done":
            finished.append(ev)
            if len(finished) == len(prompts):
                done.set()

    # All arrive at once: five start together, the other three join one by one as rows of different lengths
    # finish and free their slots, i.e. at different steps of a running batch.
    jobs = [sched.submit(p, [sp], emit) for p, sp in zip(prompts, params)]
    sched.start()
    try:
        assert done.wait(60 if mode != "compiled" else 900)
    finally:
        sched.stop()
    assert [j.results[0].token_ids for j in jobs] == alone
    assert all(len(j.results[0].token_ids) == sp.max_new_tokens for j, sp in zip(jobs, params))
    assert sched.peak_batch == 5


def test_a_compiling_scheduler_compiles_every_slot_count_before_it_serves(monkeypatch):
    """start() returns once the decode step has run for each batch-slot count (powers of two up to max_batch's)
    at the first cache length, on the scheduler's thread: no request waits for those compiles."""
    from minimind import generation
    from minimind.serve import scheduler

    shapes, threads = [], set()

    def step(model, cache, tokens, compile):
        shapes.append((cache.k.shape[1], cache.k.shape[3], compile))
        threads.add(threading.current_thread().name)
        return generation.fixed_step(model, cache, tokens, False)  # eager: compiles are slow

    monkeypatch.setattr(scheduler, "fixed_step", step)
    model = small_model("qwen3")
    sched = Scheduler(model, None, max_batch=5, compile=True)
    sched.start()
    try:
        length = min(128, model.config.max_position_embeddings)
        assert shapes == [(slots, length, True) for slots in (1, 2, 4, 8)]
        assert threads == {"minimind-scheduler"}
    finally:
        sched.stop()
    eager = Scheduler(model, None, max_batch=5, compile=False)
    eager.start()
    eager.stop()
    assert len(shapes) == 4  # an eager scheduler runs no warm-up step


@pytest.fixture
def idle_app(tokenizer, monkeypatch):
    """An app whose scheduler never runs (so its queue stays as a test fills it): max_batch 1, max_queue 1."""
    monkeypatch.setattr(Scheduler, "start", lambda self: None)
    return create_app(small_model("llama"), tokenizer, max_batch=1, max_queue=1)


def test_full_queue_answers_429_in_openai_shape(idle_app):
    from fastapi.testclient import TestClient

    with TestClient(idle_app) as c:
        idle_app.state.scheduler.submit([5], [SamplingParams()], emit=lambda ev: None)  # the queue is full
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
        assert r.status_code == 429
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "retry" in err["message"]
        assert err["code"] == "queue_full"


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429(idle_app):
    """It could never be queued at once, so "retry later" would be a lie."""
    from fastapi.testclient import TestClient

    with TestClient(idle_app) as c:
        r = c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("prompt", "too_many_prompts") and "--max-queue" in err["message"]


def test_cancelled_queued_jobs_neither_count_nor_block_the_head():
    model = small_model("qwen3", seed=3)
    model.config.eos_token_id = -1
    sched = Scheduler(model, None, max_batch=2, max_queue=1)
    job = sched.submit([5, 6], [SamplingParams(max_new_tokens=2)], emit=lambda ev: None)
    sched.cancel(job)
    done = threading.Event()
    # The cancelled job left its place: the next one is queued, not refused with 429.
    long = sched.submit([5, 6], [SamplingParams(max_new_tokens=400, temperature=0)], emit=lambda ev: None)
    sched.start()
    try:
        for _ in range(6000):  # until it is decoding: one of the two slots is taken
            if long.results[0].token_ids:
                break
            time.sleep(0.01)
        # A cancelled head that needs both slots must not hold back a job that fits the free one.
        head = sched.submit([5, 6], [SamplingParams(max_new_tokens=2)] * 2, emit=lambda ev: None)
        sched.cancel(head)
        short = sched.submit([7, 8], [SamplingParams(max_new_tokens=3, temperature=0)],
                             emit=lambda ev: done.set() if ev.kind == "done" else None)
        assert done.wait(60)
        assert len(short.results[0].token_ids) == 3
        assert not long.done  # the short job ran alongside, not after the 400-token one
    finally:
        sched.stop()


@pytest.mark.parametrize("flag", ["--max-queue", "--max-batch"])
def test_serve_rejects_zero_limits(flag, tmp_path, capsys):
    from minimind import cli

    assert cli.main(["serve", "--model", str(tmp_path), flag, "0"]) == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_sampling_fields_are_bounded(tokenizer):
    """Out-of-range sampling fields are a 400 naming the field (they used to fail every running request);
    a top_k beyond the vocabulary means "off"; at most 4 stop strings of sane length (OpenAI's limit)."""
    from fastapi.testclient import TestClient

    app = create_app(small_model("llama"), tokenizer, max_batch=4)
    bad = [("seed", 2**64), ("seed", -2**63 - 1), ("repetition_penalty", 1e-50), ("repetition_penalty", 100),
           ("temperature", 2.5), ("top_p", 0), ("min_p", 1.5), ("top_k", -1), ("frequency_penalty", 3),
           ("n", 129), ("stop", ["a", "b", "c", "d", "e"]), ("stop", "x" * 257)]
    with TestClient(app) as c:
        for field, value in bad:
            r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, field: value})
            assert r.status_code == 400, (field, value, r.text)
            assert r.json()["error"]["param"] == field, (field, value)
        ok = [("seed", 2**63 - 1), ("seed", -2**63), ("top_k", 2**63), ("repetition_penalty", 0.01),
              ("stop", ["a", "b", "c", "d"]), ("stop", "x" * 256)]
        for field, value in ok:
            r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "n": 2, field: value})
            assert r.status_code == 200, (field, value, r.text)
            assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 2


POISON = 310  # a prompt token the fault-injection tests pick out; the other prompts are drawn below it


def _fault_isolation(model, prompts, params):
    """Run prompts[0] (already decoding when the others come), then prompts[1] (the faulty one) and prompts[2]
    (innocent), admitted in one step, on one scheduler; return (jobs, events of each job, peak batch)."""
    sched = Scheduler(model, None, max_batch=8, max_queue=8)
    events: list[list] = [[] for _ in prompts]
    ends = threading.Semaphore(0)

    def emitter(k):
        def emit(ev):
            events[k].append(ev)
            if ev.kind in ("done", "error"):
                ends.release()
        return emit

    jobs = [sched.submit(prompts[0], [params[0]], emitter(0))]
    sched.start()
    try:
        for _ in range(6000):  # until it is decoding
            if len(jobs[0].results[0].token_ids) >= 2:
                break
            time.sleep(0.01)
        with sched.cond:  # both wait when the scheduler looks next: they are prefilled together
            jobs += [sched.submit(p, [sp], emitter(k + 1)) for k, (p, sp) in enumerate(zip(prompts[1:], params[1:]))]
        for _ in prompts:
            assert ends.acquire(timeout=60)
    finally:
        sched.stop()
    return jobs, events, sched.peak_batch


def _fault_setup():
    model = small_model("qwen3", seed=3)
    model.config.eos_token_id = -1
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, POISON, (n,), generator=gen).tolist() for n in (7, 12, 5)]
    prompts[1][3] = POISON
    params = [SamplingParams(max_new_tokens=30, temperature=0), SamplingParams(max_new_tokens=8, temperature=1.0),
              SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, seed=5)]
    return model, prompts, params


def test_a_prefill_that_raises_fails_its_request_alone(monkeypatch):
    """Out of memory while prefilling one request: that request gets an error, the one prefilled with it is
    retried alone and decodes as if alone, and the running one goes on."""
    model, prompts, params = _fault_setup()
    alone = [generate(model, None, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    real, poisoned = model.forward, []

    def forward(ids, *args, **kwargs):
        if ids.shape[1] > 1 and bool((ids == POISON).any()):
            poisoned.append(ids.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    jobs, events, peak = _fault_isolation(model, prompts, params)
    assert [ev.kind for ev in events[0]] == [ev.kind for ev in events[2]] == ["done"]
    assert [jobs[0].results[0].token_ids, jobs[2].results[0].token_ids] == [alone[0], alone[2]]
    assert [ev.kind for ev in events[1]] == ["error"] and "OutOfMemoryError" in events[1][0].text
    assert poisoned == [2, 1]  # together, then alone
    assert peak == 2  # the innocent request joined while the long one was decoding


@pytest.mark.parametrize("fault", ["nan_scores", "sampler_raises"])
def test_a_row_whose_sampling_fails_fails_its_request_alone(fault, monkeypatch):
    """A row whose scores are NaN/inf (a repetition_penalty that rounds to 0) or whose sampling raises fails its
    request; the others, seeded sampling included, decode exactly as alone."""
    model, prompts, params = _fault_setup()
    alone = [generate(model, None, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    if fault == "nan_scores":
        params[1] = SamplingParams(max_new_tokens=8, temperature=1.0, repetition_penalty=1e-50)
    else:
        params[1] = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=7)
        real = Sampler.sample

        def sample(self, logits):
            if bool((self.top_k == 7).any()):
                raise RuntimeError("injected sampling fault")
            return real(self, logits)

        monkeypatch.setattr(Sampler, "sample", sample)
    jobs, events, peak = _fault_isolation(model, prompts, params)
    assert [ev.kind for ev in events[0]] == [ev.kind for ev in events[2]] == ["done"]
    assert [jobs[0].results[0].token_ids, jobs[2].results[0].token_ids] == [alone[0], alone[2]]
    assert [ev.kind for ev in events[1]] == ["error"]
    assert ("NaN or infinite" if fault == "nan_scores" else "injected sampling fault") in events[1][0].text
    assert peak == 3  # all three decoded together until the faulty row's sampling failed


def test_sampling_params_fill_what_the_request_omits():
    """The model's generation_config.json defaults fill omitted fields; a request's own fields win; with no
    defaults the API keeps OpenAI's (temperature 1, nothing else on) and caps max_tokens at 512."""
    from minimind.serve.schemas import ChatRequest, sampling_params

    defaults = {"temperature": 0.0, "top_p": 0.85, "top_k": 50, "min_p": 0.1, "repetition_penalty": 1.1,
                "max_new_tokens": 9}
    msgs = [{"role": "user", "content": "hi"}]

    def fields(p):
        return p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_new_tokens

    (p,) = sampling_params(ChatRequest(messages=msgs), 10, None, 100, defaults)
    assert fields(p) == (0.0, 0.85, 50, 0.1, 1.1, 9)
    own = ChatRequest(messages=msgs, temperature=0.7, top_p=1, top_k=0, min_p=0, frequency_penalty=1)
    (p,) = sampling_params(own, 10, 20, 100, defaults)
    assert fields(p) == (0.7, 1.0, 0, 0.0, 1.5, 20)
    (p,) = sampling_params(ChatRequest(messages=msgs), 95, None, 100, defaults)
    assert p.max_new_tokens == 5  # the context still caps it
    (p,) = sampling_params(ChatRequest(messages=msgs), 10, None, 100, defaults, default_max_tokens=30)
    assert p.max_new_tokens == 30  # the server's own cap comes before the model's
    (p,) = sampling_params(ChatRequest(messages=msgs), 10, None, 100, {})
    assert fields(p) == (1.0, 1.0, 0, 0.0, 1.0, 90)
    (p,) = sampling_params(ChatRequest(messages=msgs), 10, None, 32768, {})
    assert p.max_new_tokens == 512  # no default anywhere: capped, not the rest of a 32k context


class SpyTokenizer:
    """A tokenizer that notes the length of every text it tokenizes and whether the event loop ran it."""

    def __init__(self, tok) -> None:
        self.tok, self.seen = tok, []

    def __getattr__(self, name: str):
        return getattr(self.tok, name)

    def _note(self, text: str) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.seen.append((len(text), on_loop))

    def __call__(self, text, **kwargs):
        self._note(text)
        return self.tok(text, **kwargs)

    def encode(self, text, **kwargs):
        self._note(text)
        return self.tok.encode(text, **kwargs)


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


def test_big_bodies_and_long_prompts_are_refused_before_tokenizing(tokenizer):
    """A body over the cap gets 413 unread; a prompt too long for the context by its length alone gets 400
    without being tokenized; prompts are tokenized off the event loop (a long one must not stall the rest)."""
    from fastapi.testclient import TestClient

    spy = SpyTokenizer(tokenizer)
    app = create_app(small_model("llama", vocab_size=400), spy, max_body_bytes=100_000)
    limit = app.state.max_prompt_chars
    assert limit >= app.state.context == 512  # no text this long fits, whatever the tokenizer does with it
    with TestClient(app) as c:
        e = error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 100_000}]}),
                     413)
        assert e["code"] == "request_too_large" and "100000 bytes" in e["message"]
        e = error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * limit}]}),
                     400)
        assert e["code"] == "context_length_exceeded" and e["param"] == "messages" and "characters" in e["message"]
        e = error_of(c.post("/v1/completions", json={"prompt": ["king", "x" * (limit + 1)]}), 400)
        assert e["code"] == "context_length_exceeded" and e["param"] == "prompt"
        assert max(n for n, _ in spy.seen) < limit  # the long texts were never tokenized
        spy.seen.clear()
        ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "The king"}],
                                                  "max_tokens": 2})
        assert ok.status_code == 200 and c.post("/v1/completions", json={"prompt": "The king", "max_tokens": 2}
                                                ).status_code == 200
    assert len(spy.seen) >= 2 and not any(on_loop for _, on_loop in spy.seen)


def test_hostile_bodies_get_openai_shaped_4xx(tokenizer):
    from fastapi.testclient import TestClient

    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    deep = "[" * 5000 + "]" * 5000
    bodies = {
        "deep messages": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep but parseable": b'{"messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}",
        "5001 digits": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5001 + b"}",
        "deep tool_calls string": json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": deep}]}),
        "deep arguments": json.dumps({"messages": [{"role": "assistant", "content": "",
                                                    "tool_calls": [{"name": "f", "arguments": deep}]}]}),
        "digits in arguments": json.dumps({"messages": [{"role": "assistant", "content": "",
                                                         "tool_calls": '[{"name": "f", "arguments": {"x": '
                                                                       + "1" * 5001 + "}}]"}]}),
        "dict tool_choice": json.dumps({"messages": hi, "tools": [tool], "tool_choice": {"function": "f"}}),
        "tool_choice list": json.dumps({"messages": hi, "tools": [tool], "tool_choice": {"function": ["f"]}}),
        "tool shape": json.dumps({"messages": hi, "tools": [{"type": "function", "function": "f"}]}),
        "tool without name": json.dumps({"messages": hi, "tools": [{"type": "function", "function": {"x": 1}}]}),
        "message not an object": json.dumps({"messages": ["hi"]}),
        "content an object": json.dumps({"messages": [{"role": "user", "content": {"a": 1}}]}),
    }
    app = create_app(small_model("llama", vocab_size=400), tokenizer)
    with TestClient(app, raise_server_exceptions=False) as c:
        for what, body in bodies.items():
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}, \
                (what, r.status_code, r.text[:200])
        e = error_of(c.post("/v1/completions", content=b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                            headers={"Content-Type": "application/json"}), 400)
        assert "nests deeper than 64" in e["message"]


def test_the_key_guards_every_route_but_liveness_and_the_host_is_checked_without_one(tokenizer):
    from fastapi.testclient import TestClient

    from minimind.serve.api import _host_is_local

    model = small_model("llama", vocab_size=400)
    with TestClient(create_app(model, tokenizer, api_key=API_KEY, docs=True)) as c:
        assert c.get("/health").json() == {"status": "ok"}  # liveness: nothing more without the key
        assert c.get("/health", headers=KEY).json()["max_batch"] == 16
        for path in ("/v1/models", "/docs", "/redoc", "/openapi.json"):
            assert error_of(c.get(path), 401)["code"] == "invalid_api_key"
        assert c.get("/openapi.json", headers=KEY).status_code == 200  # asked for: served, behind the key
        body = json.dumps({"prompt": "The king", "max_tokens": 1})
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):  # what a cross-site form can send
            headers = {**KEY, **({"Content-Type": kind} if kind else {})}
            e = error_of(c.post("/v1/completions", content=body, headers=headers), 415)
            assert e["code"] == "unsupported_media_type"
        ok = {**KEY, "Content-Type": "application/json; charset=utf-8"}
        assert c.post("/v1/completions", content=body, headers=ok).status_code == 200
        assert c.get("/health", headers={**KEY, "Host": "evil.example"}).status_code == 200  # the key is enough
    with TestClient(create_app(model, tokenizer)) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404  # off unless asked for
        assert c.get("/health").json()["status"] == "ok"
        e = error_of(c.get("/v1/models", headers={"Host": "evil.example"}), 421)  # DNS rebinding
        assert e["code"] == "misdirected_request"
        error_of(c.post("/v1/completions", json={"prompt": "The king"}, headers={"Host": "evil.example:80"}), 421)
    loop4, loop6 = ("127.0.0.1", 8998), ("::1", 8998)
    assert _host_is_local("127.0.0.1:8998", loop4) and _host_is_local("LocalHost:8998", loop4)
    assert _host_is_local("[::1]:8998", loop6) and _host_is_local("localhost", loop6)
    assert _host_is_local("10.0.0.5", ("10.0.0.5", 80)) and not _host_is_local("localhost", ("10.0.0.5", 80))
    for host in ("evil.example:8998", "127.0.0.1.evil.example", "", "[::1", "127.0.0.2:8998"):
        assert not _host_is_local(host, loop4), host


# ---- the real server ------------------------------------------------------------------------------------


def test_models_and_health(client, server, chat_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [chat_model_dir.name]
    assert models[0].model_extra["context_length"] == 1024
    assert models[0].model_extra["sampling_defaults"] == sampling_defaults(chat_model_dir)  # save_model's 0.85/0.85
    health = httpx.get(server + "/health", headers=KEY).json()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_generation_config_gives_the_defaults_a_request_omits(chat_model_dir, local, tmp_path):
    """`minimind serve` reads the model's generation_config.json: do_sample false answers greedily to requests
    that name no temperature (and max_new_tokens bounds them), a request's temperature wins, and the model
    card shows the defaults."""
    import shutil

    from openai import OpenAI

    model_dir = tmp_path / "greedy-model"
    shutil.copytree(chat_model_dir, model_dir)
    gen_file = model_dir / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "do_sample": False, "max_new_tokens": 9}))
    proc, url = start_server(model_dir)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        card = client.models.list().data[0].model_extra["sampling_defaults"]
        assert card == sampling_defaults(model_dir) and card["temperature"] == 0 and card["max_new_tokens"] == 9
        msgs = [{"role": "user", "content": "Tell me about the king and the question"}]  # not learnt: a ramble
        want = greedy(local, msgs, max_new_tokens=9)[1]
        answers = [client.chat.completions.create(model="m", messages=msgs, seed=seed) for seed in (1, 2)]
        assert [a.choices[0].message.content for a in answers] == [want.text.strip()] * 2
        assert answers[0].usage.completion_tokens == len(want.token_ids) == 9
        sampled = client.chat.completions.create(model="m", messages=msgs, n=4, temperature=1.5, seed=0)
        assert any(c.message.content != want.text.strip() for c in sampled.choices)
        model, tok = local
        prompt = "To be, or not"
        plain = generate(model, tok, [tok.encode(prompt)], SamplingParams(max_new_tokens=9, temperature=0))[0]
        assert client.completions.create(model="m", prompt=prompt).choices[0].text == plain.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_plain_chat_and_usage(client, local):
    msgs = [{"role": "user", "content": "Hello"}]
    ids, want = greedy(local, msgs)
    r = client.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=60)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == HELLO_ANSWER == parse_assistant(want.text)["content"]
    assert c.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.token_ids))
    assert r.usage.total_tokens == len(ids) + len(want.token_ids)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_streaming_reassembles_to_the_non_streaming_answer(client, local):
    msgs = [{"role": "user", "content": "Tell me about the king and the question"}]  # not learnt: a long ramble
    full = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.created and c.model for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert text == greedy(local, msgs, max_new_tokens=40)[1].text.strip()  # thinking off, no tools: all content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "Hello"}], "stream": True, "temperature": 0, "max_tokens": 5}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["object"] == "chat.completion.chunk"


def test_thinking_in_messages_and_deltas(client, local):
    msgs = [{"role": "user", "content": "Why?"}]
    r = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=60,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    m = r.choices[0].message
    assert (m.model_extra["reasoning_content"], m.content) == ("To be, or not to be.", "That is the question.")
    want = parse_assistant("<think>\n" + greedy(local, msgs, think=True)[1].text)
    assert want["reasoning_content"] == "To be, or not to be."
    chunks = list(client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=60, stream=True,
                                                 extra_body={"open_thinking": True}))  # MiniMind's alias
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == ("To be, or not to be.", "That is the question.")
    # thinking off: the model sees an empty think block, and nothing comes back as reasoning
    off = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=30)
    assert off.usage.prompt_tokens > r.usage.prompt_tokens
    assert off.choices[0].message.model_extra.get("reasoning_content") is None


@pytest.mark.parametrize("extra, on", [
    ({"enable_thinking": False, "open_thinking": True}, False),  # MiniMind's server: on (any true wins)
    ({"chat_template_kwargs": {"enable_thinking": False, "open_thinking": True}}, False),
    ({"chat_template_kwargs": {"open_thinking": True}, "enable_thinking": False}, False),
    ({"chat_template_kwargs": {"enable_thinking": True}, "open_thinking": False}, True),
    ({"chat_template_kwargs": {"enable_thinking": None, "open_thinking": True}}, True),
    ({"open_thinking": True}, True),
])
def test_enable_thinking_decides_over_open_thinking(client, local, extra, on):
    msgs = [{"role": "user", "content": "Why?"}]
    r = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=60, extra_body=extra)
    m = r.choices[0].message
    assert m.model_extra.get("reasoning_content") == ("To be, or not to be." if on else None)
    ids, _ = encode_chat(local[1], msgs, add_generation_prompt=True, enable_thinking=on)
    assert r.usage.prompt_tokens == len(ids)


def test_thinking_flags_must_be_booleans(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Why?"}], max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": "false"}})
    assert e.value.body["param"] == "chat_template_kwargs.enable_thinking"


def test_content_part_lists_are_their_text(client):
    """OpenAI content-part lists: the text parts joined; the same answer as the string. An image part is a 400
    for this text-only model (tests/test_serve_vision.py serves images)."""
    import openai

    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    for content in (parts, "Hello"):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=60)
        assert r.choices[0].message.content == HELLO_ANSWER
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(openai.BadRequestError, match="no vision tower"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [parts[0], image]}])


def test_tool_calls_and_the_tool_loop(client):
    r = client.chat.completions.create(model="m", messages=[ASK], tools=[TOOL], temperature=0, max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": "2 + 3"})
    # streamed: index-based tool_call deltas
    chunks = list(client.chat.completions.create(model="m", messages=[ASK], tools=[TOOL], temperature=0,
                                                 max_tokens=60, stream=True))
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    got = [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas]
    assert got == [(0, "calculator", {"expression": "2 + 3"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the history carries the assistant's call and a `tool` message; the model answers with the result
    history = [ASK, c.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    final = client.chat.completions.create(model="m", messages=history, tools=[TOOL], temperature=0, max_tokens=60)
    assert final.choices[0].message.content == "The answer is 5." and final.choices[0].finish_reason == "stop"
    # tool_choice "none": no tools offered, so no call comes back as a tool call
    none = client.chat.completions.create(model="m", messages=[ASK], tools=[TOOL], tool_choice="none",
                                          temperature=0, max_tokens=60)
    assert not none.choices[0].message.tool_calls


def test_n_stop_and_length(client, local):
    msgs = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="m", messages=msgs, n=3, temperature=1.5, seed=7, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="m", messages=msgs, n=3, temperature=1.5, seed=7, max_tokens=12)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded
    assert r.usage.completion_tokens <= 36
    assert r.usage.prompt_tokens == greedy(local, msgs, max_new_tokens=1)[1].prompt_tokens
    s = client.chat.completions.create(model="m", messages=msgs, temperature=0, stop=["long live"], max_tokens=60)
    assert s.choices[0].message.content == HELLO_ANSWER[:HELLO_ANSWER.index("long live")].strip()
    assert s.choices[0].finish_reason == "stop"
    n = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_completion_tokens=3)
    assert n.choices[0].finish_reason == "length" and n.usage.completion_tokens == 3


def test_completions_endpoint(client, local):
    model, tok = local
    prompt = "To be, or not"
    want = generate(model, tok, [tok.encode(prompt)], SamplingParams(max_new_tokens=10, temperature=0))[0]
    r = client.completions.create(model="m", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert streamed == want.text


def test_errors_in_openai_shape(server, client):
    import openai

    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = server + "/v1/chat/completions"

    def err(r, status):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
        return e

    e = err(httpx.post(url, content=b'{"messages": [', headers=h), 400)
    assert "malformed JSON" in e["message"]
    e = err(httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
                       headers=h), 400)
    assert e["param"] == "temperature"
    e = err(httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "n": 0}, headers=h), 400)
    assert e["param"] == "n"
    e = err(httpx.post(url, json={"messages": []}, headers=h), 400)
    assert "at least one message" in e["message"]
    e = err(httpx.post(url, json={"messages": [{"role": "wizard", "content": "hi"}]}, headers=h), 400)
    assert "wizard" in e["message"]
    long = " ".join(["king"] * 1500)
    e = err(httpx.post(url, json={"messages": [{"role": "user", "content": long}]}, headers=h), 400)
    assert "1024" in e["message"] and e["code"] == "context_length_exceeded"
    e = err(httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]},
                       headers={"Authorization": "Bearer wrong"}), 401)
    assert e["type"] == "authentication_error"
    err(httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}), 401)
    assert httpx.get(server + "/health").status_code == 200  # health needs no key
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_cancelled_request_stops_even_when_its_next_event_is_ready():
    """The race behind a flaky disconnect: the client leaves in the same loop turn as the next event arrives.
    asyncio.wait_for (Python 3.11) returned the event and dropped the cancellation; the decode then ran on."""
    async def main() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        got = []

        async def consume() -> None:
            for _ in range(2):
                got.append(await _get(queue, timeout=0.05))

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)  # waiting on the empty queue
        queue.put_nowait("event")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert got == []

    asyncio.run(main())


def test_disconnect_frees_the_slot_at_once(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    before = httpx.get(server + "/health", headers=KEY).json()["steps"]
    body = {"prompt": "The king", "max_tokens": 900, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=h, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break
    deadline = time.time() + 10
    while (health := httpx.get(server + "/health", headers=KEY).json())["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert health["running"] == 0
    time.sleep(0.3)
    after = httpx.get(server + "/health", headers=KEY).json()["steps"]
    assert after == health["steps"]  # nothing decodes any more
    assert after - before < 300  # it stopped long before its 900 tokens


def test_a_non_streaming_request_stops_when_its_client_goes(server):
    """A plain (non-streaming) request whose client disconnects leaves the batch at once: the server listens
    for the disconnect while it decodes (it used to look only after a second without events)."""
    import socket

    before = httpx.get(server + "/health", headers=KEY).json()["steps"]
    body = json.dumps({"prompt": "The king", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}).encode()
    host, port = server.removeprefix("http://").split(":")
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(request)
        for _ in range(2000):  # until it decodes
            health = httpx.get(server + "/health", headers=KEY).json()
            if health["running"] and health["steps"] > before + 3:
                break
            time.sleep(0.01)
        assert health["running"] == 1
        at_close = health["steps"]
    for _ in range(200):
        if not (health := httpx.get(server + "/health", headers=KEY).json())["running"]:
            break
        time.sleep(0.05)
    assert health["running"] == 0
    time.sleep(0.3)
    after = httpx.get(server + "/health", headers=KEY).json()["steps"]
    assert after == health["steps"]  # nothing decodes any more
    assert after - at_close < 100  # it stopped at once (it used to run on: 500-900 steps here)


def test_big_bodies_are_refused_by_the_real_server(server):
    e = error_of(httpx.post(server + "/v1/chat/completions", content=b"x" * (5 << 20),
                            headers={**KEY, "Content-Type": "application/json"}), 413)
    assert "4194304 bytes" in e["message"]  # the default cap
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_serve_flags_reach_the_app(chat_model_dir):
    """--max-model-len, --default-max-tokens, --max-body-bytes and --docs; without --api-key, a Host that is
    not the bound address gets 421."""
    proc, url = start_server(chat_model_dir, "--max-model-len", "256", "--default-max-tokens", "7",
                             "--max-body-bytes", "5000", "--docs")
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["context_length"] == 256
        msgs = [{"role": "user", "content": "Tell me about the king and the question"}]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "ignore_eos": True}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 7
        r = httpx.post(url + "/v1/completions", json={"prompt": "The king", "ignore_eos": True}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 7
        e = error_of(httpx.post(url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": " ".join(["king"] * 300)}]}), 400)
        assert "256" in e["message"] and e["code"] == "context_length_exceeded"
        error_of(httpx.post(url + "/v1/completions", json={"prompt": "x" * 5000}), 413)
        assert httpx.get(url + "/openapi.json").status_code == 200
        port = url.rsplit(":", 1)[1]
        error_of(httpx.get(url + "/v1/models", headers={"Host": f"evil.example:{port}"}), 421)
        assert httpx.get(url + "/v1/models", headers={"Host": f"localhost:{port}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    out = subprocess.run([sys.executable, "-m", "minimind", "serve", "--model", str(chat_model_dir), "--device",
                          "cpu", "--max-model-len", "2048"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--max-model-len 2048: must be in [1, 1024]" in out.stderr
    assert "Traceback" not in out.stderr


def test_sixteen_concurrent_streams_equal_single_requests(client, server):
    prompts = [{"role": "user", "content": c} for c in
               ["Hello", "Why?", "What is 2 + 3?", "The king", "To be", "question", "Tell me a story",
                "long live", "今天天气很好", "window breaks", "12 * 3", "yonder", "dead", "Hello there",
                "light", "not to be"]]
    lengths = [8 + (i * 5) % 23 for i in range(16)]
    alone = [client.chat.completions.create(model="m", messages=[p], temperature=0, max_tokens=n).choices[0]
             .message.content for p, n in zip(prompts, lengths)]
    outs: list = [None] * 16
    barrier = threading.Barrier(16)

    def run(i):
        barrier.wait()
        time.sleep(0.003 * i)  # slightly staggered: they join a running batch at different steps
        stream = client.chat.completions.create(model="m", messages=[prompts[i]], temperature=0,
                                                max_tokens=lengths[i], stream=True)
        outs[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outs == alone
    assert httpx.get(server + "/health", headers=KEY).json()["peak_batch"] >= 4  # they really were decoded together


POOL_PROBE = """
import os, sys, time, torch
from minimind.cli import build_parser
from minimind.commands.flags import load_model_from
from minimind.commands.serve import load_served_model
torch.set_num_threads(2)
args = build_parser().parse_args(["serve", "--model", sys.argv[1], "--threads", "2", "--quantize", "int8"])
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
if sys.argv[2] == "served":
    load_served_model(args)
    deadline = time.time() + 10  # the ended thread's pool is freed as it exits, a moment after join()
    while threads() > before and time.time() < deadline:
        time.sleep(0.01)
else:
    load_model_from(args)
print(threads() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_loading_for_serving_leaves_no_openmp_pool_on_the_main_thread(chat_model_dir):
    """The scheduler's thread must hold the process's only OpenMP pool (a second one made decode steps 2.4x
    slower), so `serve` loads on a thread that ends. Counted in a fresh process: loading on the main thread
    leaves a pool worker behind (the probe sees pools), load_served_model leaves none."""
    def extra_threads(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", POOL_PROBE, str(chat_model_dir), how], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert extra_threads("main") >= 1
    assert extra_threads("served") == 0
