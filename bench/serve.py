"""Serving throughput: aggregate generated tokens/s with 1, 4 and 16 concurrent streaming clients against one
continuous-batching server, and against one-request-at-a-time serving (the same server code with --max-batch 1)
in the same run, rounds interleaved; time to first token median and p95. `python bench/serve.py [--model DIR]`
With --compiled: also a batched server with --compile (the compiled fixed-shape decode step), against the eager one;
with --int8, batched servers with --quantize int8, eager and compiled, against the eager one at --dtype.
With --images: chat requests each carrying an image (a data URL), 1 and 8 concurrent clients batched against one
at a time, on a vision model (default: the random preset around a random SigLIP2-base-sized tower, 256x256 p32).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

try:  # the openai SDK of this pin ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from minimind.commands.serve import free_port

ROOT = Path(__file__).resolve().parents[1]


def random_model_dir(out: Path, preset: str) -> Path:
    """A randomly initialised preset with a tokenizer trained on the built-in English text (full vocabulary)."""
    from minimind.checkpoint import save_model
    from minimind.config import ModelConfig
    from minimind.data.builtin import english_documents
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import train_tokenizer

    cfg = ModelConfig.preset(preset)
    text, size = [], 0
    for doc in english_documents():
        text.append(doc)
        size += len(doc)
        if size > 3_000_000:
            break
    (out / "text.txt").write_text("\n".join(text), encoding="utf-8")
    tok = train_tokenizer([out / "text.txt"], vocab_size=cfg.vocab_size, out_dir=out / "tok", progress=False)
    torch.manual_seed(0)
    save_model(MiniMindForCausalLM(cfg), out / preset, tok)
    return out / preset


def vision_model_dir(llm_dir: Path, out: Path, tower: str) -> Path:
    """`llm_dir` with a random vision tower: "base" has MiniMind-V's SigLIP2-base-p32-256 sizes (86M, 64
    patches of 768), "tiny" the from-scratch demo tower."""
    from minimind.checkpoint import load_model, save_model
    from minimind.tokenizer import load_tokenizer
    from minimind.vision.config import tiny_encoder
    from minimind.vision.model import VisionLanguageModel

    encoder = tiny_encoder(image_size=256, patch_size=32, hidden_size=768, layers=12, heads=12) \
        if tower == "base" else tiny_encoder()
    save_model(VisionLanguageModel.from_llm(load_model(llm_dir), encoder).eval(), out, load_tokenizer(llm_dir))
    return out


def image_urls(n: int, side: int = 256) -> list[str]:
    """n different random-pixel JPEGs (photo-like sizes, ~30 kB) as data URLs."""
    import numpy as np
    from PIL import Image

    rng, urls = np.random.default_rng(0), []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def start(model: Path, max_batch: int, dtype: str, threads: int, compile: bool = False, quantize: str = "none"
          ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "minimind", "serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", "256",
           "--threads", str(threads), "--compile" if compile else "--no-compile", "--quantize", quantize]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800  # a compiled server compiles its decode steps before it listens
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def one_request(http: httpx.Client, url: str, prompt: list[int] | str, new_tokens: int) -> tuple[float, int]:
    """Stream one completion (token ids), or one chat answer about an image (a data URL); returns (time to
    first token, completion tokens). The stream is read as raw bytes and only its last event (the usage) is
    parsed: the load generator shares the CPU with the server, so it does as little per token as it can."""
    body = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if isinstance(prompt, str):
        route, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": prompt}}, {"type": "text", "text": "Describe the picture."}]}]
    else:
        route, body["prompt"] = "/v1/completions", prompt
    start, ttft, tail = time.perf_counter(), None, b""
    with http.stream("POST", url + route, json=body, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():  # the server sends the headers with the first token's event
            if ttft is None:
                ttft = time.perf_counter() - start
            tail = (tail + chunk)[-4096:]
    usage = tail[tail.rindex(b'data: {'):].split(b"\n", 1)[0]  # the last event before [DONE]
    return ttft or 0.0, json.loads(usage[6:])["usage"]["completion_tokens"]


def load(url: str, clients: list[httpx.Client], count: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """The first `count` of `clients` work through all prompts in a closed loop; aggregate tokens/s over the
    wall time. The clients live for the whole run, each with its kept-alive connection, so a round times the
    server, not the making of clients (an SSL context each) or of connections."""
    todo: queue.Queue = queue.Queue()
    for p in prompts:
        todo.put(p)
    ttfts, tokens, lock = [], [0], threading.Lock()
    go = threading.Barrier(count + 1)

    def client(http: httpx.Client) -> None:
        go.wait()
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            t, n = one_request(http, url, p, new_tokens)
            with lock:
                ttfts.append(t)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(h,)) for h in clients[:count]]
    for t in threads:
        t.start()
    go.wait()  # every client thread is up: the clock starts as they all begin
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tok_s": tokens[0] / wall, "ttft": ttfts, "tokens": tokens[0]}


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: a random minimind2-small)")
    ap.add_argument("--preset", default="minimind2-small", help="preset of the random model")
    ap.add_argument("--requests", type=int, default=16, help="requests per measurement")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request (eos ignored)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (figures are medians)")
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="served dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per server (0: default)")
    ap.add_argument("--images", action="store_true", help="image chat requests (--model: a vision model directory)")
    ap.add_argument("--tower", default="base", choices=["base", "tiny"], help="the random tower for --images")
    ap.add_argument("--compiled", action="store_true", help="also a batched server with --compile")
    ap.add_argument("--int8", action="store_true", help="also batched servers with --quantize int8, eager and "
                    "compiled (int8 weights and activations; the other servers keep --dtype)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model_dir(Path(tmp), args.preset)
        if args.images and not args.model:
            model = vision_model_dir(model, Path(tmp) / f"{args.preset}-v-{args.tower}", args.tower)
        g = torch.Generator().manual_seed(0)
        prompts = image_urls(args.requests) if args.images else \
            [torch.randint(40, 6000, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
        servers = {"batched": start(model, 16, args.dtype, args.threads),
                   "one-at-a-time": start(model, 1, args.dtype, args.threads)}
        if args.compiled:
            servers["batched compiled"] = start(model, 16, args.dtype, args.threads, compile=True)
        if args.int8:
            servers["batched int8"] = start(model, 16, args.dtype, args.threads, quantize="int8")
            servers["int8 compiled"] = start(model, 16, args.dtype, args.threads, compile=True, quantize="int8")
        counts = (1, 8) if args.images else (1, 4, 16)
        clients = [httpx.Client() for _ in range(counts[-1])]
        try:
            configs = [("one-at-a-time", counts[-1])] + [(name, c) for name in servers if name != "one-at-a-time"
                                                          for c in counts]
            for _, url in servers.values():  # warm up all, and open every client's connection to each
                load(url, clients, counts[-1], prompts[:counts[-1]], 4)
            runs: dict = {c: [] for c in configs}
            for r in range(args.rounds):
                for name, count in configs:
                    res = load(servers[name][1], clients, count, prompts, args.new_tokens)
                    runs[(name, count)].append(res)
                    print(f"round {r + 1}: {name:14s} {count:2d} clients: {res['tok_s']:7.1f} tok/s", flush=True)
        finally:
            for http in clients:
                http.close()
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

    what = "an image + a question" if args.images else f"{args.prompt_len} prompt"
    print(f"\n{model.name}, {args.dtype}, {args.requests} requests x ({what} + {args.new_tokens} new "
          f"tokens), median of {args.rounds} interleaved rounds")
    print("| server | clients | aggregate tok/s | vs one-at-a-time | TTFT median (s) | TTFT p95 (s) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(x["tok_s"] for x in runs[configs[0]])
    for (name, clients), res in runs.items():
        tok_s = statistics.median(x["tok_s"] for x in res)
        ttft = [t for x in res for t in x["ttft"]]
        print(f"| {name} | {clients} | {tok_s:.1f} | {tok_s / base:.2f}x | {statistics.median(ttft):.3f} | "
              f"{p95(ttft):.3f} |")
    for name in [n for n in servers if n not in ("batched", "one-at-a-time")]:
        for c in counts:
            ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(runs[(name, c)], runs[("batched", c)])]
            print(f"{name} / batched, {c} clients: {statistics.median(ratios):.2f}x (per round: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
