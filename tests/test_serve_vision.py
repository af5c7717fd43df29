"""Images through the one server and the CLI: OpenAI `image_url` parts via the real `openai` client against the
real server, mixed text and image requests in one batched prefill, the 400s (remote URL, oversize, undecodable,
text-only model), and `minimind generate/chat --image`, all against local `generate` on the same images."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from conftest import small_model
from test_serve import error_of, start_server

try:  # the openai SDK of this pin ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from minimind import cli
from minimind.chat import AssistantParser, encode_chat
from minimind.checkpoint import load_model, save_model
from minimind.data.vision import image_inputs
from minimind.generation import SamplingParams, generate
from minimind.serve.api import create_app
from minimind.serve.images import ImageLimits, split_images
from minimind.serve.scheduler import Scheduler
from minimind.vision.config import tiny_encoder
from minimind.vision.model import VisionLanguageModel

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


def png(seed: int, side: int = 64) -> bytes:
    """A PNG of random pixels (every seed a different picture)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def vision_model(tokenizer) -> VisionLanguageModel:
    """A random small VLM. Its decoder's matrices are drawn wide (std 0.3), so its greedy answers follow its
    input, images included (at the usual 0.02 a random decoder repeats one token whatever it sees)."""
    llm = small_model("qwen3", seed=1, vocab_size=len(tokenizer))
    with torch.no_grad():
        for p in llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return VisionLanguageModel.from_llm(llm, tiny_encoder(hidden_size=32, layers=1, heads=2)).eval()


@pytest.fixture(scope="module")
def vision_dir(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("vision_model")
    save_model(vision_model(tokenizer), d, tokenizer)
    return d


@pytest.fixture(scope="module")
def local(vision_dir):
    from minimind.tokenizer import load_tokenizer

    return load_model(vision_dir), load_tokenizer(vision_dir)


def local_answer(local, messages: list[dict], images: list[bytes]):
    """Local greedy generation: (the chat content the server would send, the Completion)."""
    model, tok = local
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True, image_tokens=model.image_tokens)
    result = generate(model, tok, [ids], GREEDY, images=image_inputs(model, [images]))[0]
    parser = AssistantParser(False, parse_tools=False)
    parser.feed(result.text)
    parser.finish()
    return parser.message["content"], result


# ---- no server process ----------------------------------------------------------------------------------


def test_image_parts_become_placeholders_in_order():
    text, a, b = {"type": "text", "text": "Which is red?"}, image_part(b"a"), image_part(b"b")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [a, text]},
            {"role": "assistant", "content": "The first."}, {"role": "user", "content": [text, a, b, text]}]
    out, found = split_images(msgs, vision=True)
    joined = ["".join(p["text"] for p in m["content"]) for m in out if isinstance(m["content"], list)]
    assert joined == ["<image>\nWhich is red?", "Which is red?\n<image>\n<image>\nWhich is red?"]
    assert [w for w, _ in found] == ["messages.1.content.0", "messages.3.content.1", "messages.3.content.2"]
    assert out[0] == msgs[0] and out[2] == msgs[2]


def test_mixed_text_and_image_requests_prefill_together_as_if_alone(local):
    """The scheduler admits a one-image, a text-only and a two-image request in one prefill (their images in job
    order): each gets the greedy tokens it gets alone from `generate`."""
    model = local[0]
    pads = [12] * model.image_tokens
    prompts = [[40, 41] + pads + [42], [43] * 9, pads + [44] + pads + [45, 46]]
    images = [[png(1)], [], [png(2), png(3)]]
    alone = [generate(model, None, [p], GREEDY, images=image_inputs(model, [im]))[0].token_ids
             for p, im in zip(prompts, images)]
    sched = Scheduler(model, None, max_batch=8)
    done = threading.Semaphore(0)
    jobs = [sched.submit(p, [GREEDY], lambda ev: ev.kind == "done" and done.release(),
                         images=image_inputs(model, [im])["pixel_values"] if im else None)
            for p, im in zip(prompts, images)]
    sched.start()
    try:
        assert all(done.acquire(timeout=60) for _ in jobs)
    finally:
        sched.stop()
    assert [j.results[0].token_ids for j in jobs] == alone
    assert sched.peak_batch == 3 and len(set(map(tuple, alone))) == 3
    assert all(j.images is None for j in jobs)  # freed once in the KV cache


def test_bad_images_get_a_400_naming_the_part(local, tokenizer):
    from fastapi.testclient import TestClient

    limits = ImageLimits(max_bytes=20_000, max_pixels=100 * 100)
    app = create_app(*local, image_limits=limits)
    ask = {"type": "text", "text": "What is it?"}

    def post(*parts, role="user"):
        return c.post("/v1/chat/completions", json={"messages": [{"role": role, "content": [ask, *parts]}],
                                                    "max_tokens": 2})

    with TestClient(app) as c:
        assert post(image_part(png(1))).status_code == 200
        e = error_of(post({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}), 400)
        assert (e["param"], e["code"]) == ("messages.0.content.1", "remote_image_refused")
        assert "--allow-remote-images" in e["message"]
        e = error_of(post(image_part(png(1)), image_part(png(2, side=90))), 400)  # 90x90 noise: ~24 kB
        assert (e["param"], e["code"]) == ("messages.0.content.2", "image_too_large")
        assert "20,000 (--max-image-bytes)" in e["message"]
        e = error_of(post(image_part(b"\x89PNG but not one")), 400)
        assert e["param"] == "messages.0.content.1" and "not an image" in e["message"]
        big = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (101, 100)).save(big, "PNG")  # a few hundred bytes, too many pixels
        e = error_of(post(image_part(big.getvalue())), 400)
        assert "101x100 is over 10,000 pixels" in e["message"]
        for url in ("file:///etc/passwd", "/etc/passwd", "data:image/png;base64,@@@"):
            e = error_of(post({"type": "image_url", "image_url": {"url": url}}), 400)
            assert e["param"] == "messages.0.content.1"
        e = error_of(post(image_part(png(1)), role="assistant"), 400)
        assert "user messages only" in e["message"]
        e = error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "<image> hi"}]}),
                     400)
        assert e["param"] == "messages.0.content" and "image_url" in e["message"]
        e = error_of(c.post("/v1/completions", json={"prompt": [5, 12, 6], "max_tokens": 2}), 400)
        assert "image token (id 12)" in e["message"]
        assert c.get("/v1/models").json()["data"][0]["vision"] is True

    text_only = create_app(small_model("qwen3", vocab_size=len(tokenizer)), tokenizer)
    with TestClient(text_only) as c:
        e = error_of(post(image_part(png(1))), 400)
        assert (e["param"], e["code"]) == ("messages.0.content.1", "unsupported_by_model")
        assert "no vision tower" in e["message"]
        assert c.get("/v1/models").json()["data"][0]["vision"] is False


def test_remote_images_when_allowed_are_fetched_with_the_same_cap(local):
    """--allow-remote-images: an http URL gives the same answer as the same bytes in a data URL; a missing one
    or one over the cap is a 400."""
    from fastapi.testclient import TestClient

    files = {"/a.png": png(1), "/big.png": png(2, side=90)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    app = create_app(*local, image_limits=ImageLimits(allow_remote=True, max_bytes=20_000, timeout=5))

    def ask(url):
        part = {"type": "image_url", "image_url": {"url": url}}
        return c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}],
                                                    "max_tokens": 8, "temperature": 0})

    try:
        with TestClient(app) as c:
            fetched, inline = ask(base + "/a.png"), ask(data_url(files["/a.png"]))
            assert fetched.status_code == 200, fetched.text
            assert fetched.json()["choices"] == inline.json()["choices"]
            e = error_of(ask(base + "/missing.png"), 400)
            assert e["code"] == "image_fetch_failed" and "404" in e["message"]
            assert error_of(ask(base + "/big.png"), 400)["code"] == "image_too_large"
    finally:
        web.shutdown()


def test_cli_generate_and_chat_with_images_equal_local_generate(vision_dir, local, tmp_path, monkeypatch, capsys):
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "b.png").write_bytes(png(2))
    flags = ["--model", str(vision_dir), "--max-new-tokens", str(GREEDY.max_new_tokens), "--temperature", "0",
             "--dtype", "float32"]
    q = "What is in it?"
    for images in (["a.png"], ["b.png", "a.png"]):
        paths = [str(tmp_path / i) for i in images]
        assert cli.main(["generate", *flags, "--prompt", q, *[x for p in paths for x in ("--image", p)]]) == 0
        want = local_answer(local, [{"role": "user", "content": "<image>\n" * len(paths) + q}],
                            [(tmp_path / i).read_bytes() for i in images])[1]
        assert capsys.readouterr().out == want.text + "\n"
    # chat: --image for the first message, /image for a later one; history keeps both images
    lines = iter([q, "/image", f"/image {tmp_path / 'missing.png'}", f"/image {tmp_path / 'b.png'}", "And now?"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli.main(["chat", *flags, "--image", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    first_msgs = [{"role": "user", "content": "<image>\n" + q}]
    first, first_result = local_answer(local, first_msgs, [png(1)])
    second, _ = local_answer(local, first_msgs + [{"role": "assistant", "content": first},
                                                  {"role": "user", "content": "<image>\nAnd now?"}], [png(1), png(2)])
    assert "(image attached: 1 for the next message)" in out and "/image PATH attaches" in out
    assert "[error: usage: /image PATH]" in out and "missing.png: no such file]" in out
    assert first_result.text.strip() and first in out and second in out and out.count("tokens/s]") == 2


@pytest.mark.parametrize("args, message", [
    (["--image", "{img}"], "a language model without a vision tower"),
    (["--image", "{tmp}/missing.png"], "missing.png: no such file"),
    (["--image", "{img}", "--raw"], "--image needs the chat template"),
])
def test_cli_image_errors_are_one_clear_line(args, message, vision_dir, tokenizer, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png(1))
    model_dir = vision_dir
    if "vision tower" in message:
        model_dir = tmp_path / "text"
        save_model(small_model("qwen3", vocab_size=len(tokenizer)), model_dir, tokenizer)
    args = [a.format(img=tmp_path / "a.png", tmp=tmp_path) for a in args]
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "hi", *args]) == 2
    assert message in capsys.readouterr().err


# ---- the real server, driven by the openai client --------------------------------------------------------


@pytest.fixture(scope="module")
def server(vision_dir):
    proc, url = start_server(vision_dir, "--max-batch", "8", "--max-image-bytes", "30000")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_image_requests_through_the_openai_client(client, server, local):
    """The server's greedy answer to an image request is local `generate`'s on the same image; other images
    give other answers; a streamed answer is the same; images in two turns each land in their own turn; and
    concurrent text and image requests decoded together each get their answer alone."""
    q = {"type": "text", "text": "What is in the picture?"}

    def ask(content, **kw):
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=GREEDY.max_new_tokens, **kw)

    answers = {}
    for seed in (1, 2):
        r = ask([image_part(png(seed)), q])
        want, result = local_answer(local, [{"role": "user", "content": "<image>\nWhat is in the picture?"}],
                                    [png(seed)])
        assert r.choices[0].message.content == want and r.usage.completion_tokens == len(result.token_ids)
        assert r.usage.prompt_tokens > local[0].image_tokens
        answers[seed] = result.token_ids
    assert answers[1] != answers[2]  # the image is what the answer follows
    streamed = "".join(c.choices[0].delta.content or "" for c in ask([image_part(png(1)), q], stream=True)
                       if c.choices)
    assert streamed == ask([image_part(png(1)), q]).choices[0].message.content

    two_turns = [{"role": "user", "content": [image_part(png(1)), q]}, {"role": "assistant", "content": "A cat."},
                 {"role": "user", "content": [q, image_part(png(2))]}]
    r = client.chat.completions.create(model="m", messages=two_turns, temperature=0,
                                       max_tokens=GREEDY.max_new_tokens)
    local_msgs = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                  {"role": "assistant", "content": "A cat."},
                  {"role": "user", "content": "What is in the picture?\n<image>"}]
    assert r.choices[0].message.content == local_answer(local, local_msgs, [png(1), png(2)])[0]

    requests = [[image_part(png(s)), q] if s % 2 else f"Tell me about {s}" for s in range(4)]
    alone = [ask(c).choices[0].message.content for c in requests]
    together: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i):
        barrier.wait()
        together[i] = ask(requests[i]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    assert httpx.get(server + "/health").json()["peak_batch"] >= 2  # decoded together

    import openai

    with pytest.raises(openai.BadRequestError, match="over this server's limit of 30,000"):  # the flag reached it
        ask([image_part(png(1, side=128)), q])
    with pytest.raises(openai.BadRequestError, match="remote image URLs are refused"):
        ask([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, q])
