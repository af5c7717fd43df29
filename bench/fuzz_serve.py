"""Hostile requests against the real server while an innocent stream decodes: every hostile request must get a
4xx in OpenAI's shape (never a 500, never silence), the innocent stream must produce the same text as alone, and
the server's RSS afterwards must be within 20% of before. `python bench/fuzz_serve.py [--model DIR]`; exit 1 if
a check fails. The requests are the ones of the reliability review (seed 2**64, 10 MB bodies, 100k stop strings,
deep nesting, huge integers, bad shapes, wrong content type, a rebinding Host header, ...)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

try:  # the openai SDK of this pin ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import random_model_dir, start  # noqa: E402 - bench/serve.py: the same model and server start

USER = {"role": "user", "content": "Hello"}
DEEP = 100_000
JSON = {"content-type": "application/json"}


def hostile() -> list[tuple[str, dict]]:
    """(name, httpx request arguments) of each hostile request."""
    chat = "/v1/chat/completions"

    def body(**fields) -> dict:
        return {"method": "POST", "url": chat, "json": {"model": "m", "messages": [USER], "max_tokens": 8, **fields}}

    def raw(text: str) -> dict:
        return {"method": "POST", "url": chat, "content": text.encode(), "headers": JSON}

    nested = "[" * DEEP + "]" * DEEP
    calls = json.dumps([{"type": "function", "function": {"name": "f", "arguments": "{}"}}])[:-1] + "," + nested + "]"
    return [
        ("seed 2**64", body(seed=2**64)),
        ("top_k 2**63", body(top_k=2**63)),
        ("repetition_penalty 1e-50", body(repetition_penalty=1e-50)),
        ("temperature nan", raw('{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}')),
        ("10 MB message", body(messages=[{"role": "user", "content": "a" * 10_000_000}])),
        ("100,000 stop strings", body(stop=[f"s{i}" for i in range(100_000)])),
        ("100k-deep messages", raw('{"model": "m", "messages": ' + nested + "}")),
        ("5,001-digit max_tokens", raw('{"model": "m", "messages": [{"role": "user", "content": "Hi"}], '
                                       '"max_tokens": ' + "9" * 5001 + "}")),
        ("deep tool_calls string", body(messages=[USER, {"role": "assistant", "content": "", "tool_calls": calls}])),
        ("dict tool_choice", body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"x": 1})),
        ("tool without function", body(tools=[{"type": "function"}])),
        ("text/plain body", {"method": "POST", "url": chat, "content": json.dumps(body()["json"]).encode(),
                             "headers": {"content-type": "text/plain"}}),
        ("rebinding Host header", {**body(), "headers": {"host": "evil.example:80"}}),
        ("completions, 5,000 prompts", {"method": "POST", "url": "/v1/completions",
                                        "json": {"model": "m", "prompt": ["hi"] * 5000, "max_tokens": 1}}),
        ("GET /openapi.json", {"method": "GET", "url": "/openapi.json"}),
    ]


def stream_text(url: str, out: dict) -> None:
    """The innocent client: one greedy stream, long enough to overlap every hostile request."""
    body = {"model": "m", "messages": [USER], "max_tokens": 160, "temperature": 0, "ignore_eos": True, "stream": True}
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:  # the stream failed: what it said instead of text
                    text.append(f"[error: {event['error'].get('message')}]")
                for choice in event.get("choices", []):
                    text.append(choice["delta"].get("content") or "")
    out["text"] = "".join(text)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="model directory (default: a random tiny model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for each hostile request's answer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model_dir(Path(tmp), "tiny")
        proc, url = start(model, max_batch=16, dtype="float32", threads=args.threads)
        try:
            alone: dict = {}
            stream_text(url, alone)
            before = rss_kib(proc.pid)
            under: dict = {}
            innocent = threading.Thread(target=stream_text, args=(url, under))
            innocent.start()
            rows, ok = [], True
            with httpx.Client(base_url=url, timeout=args.timeout) as http:
                for name, request in hostile():
                    try:
                        r = http.request(**request)
                        status = r.status_code
                        try:
                            kind = r.json().get("error", {}).get("type", "-") if status >= 400 else "ok"
                        except ValueError:
                            kind = "not JSON: " + r.text[:40].replace("\n", " ")
                    except httpx.HTTPError as e:
                        status, kind = 0, f"no answer ({type(e).__name__})"
                    good = (status < 500 and status != 0 and not kind.startswith("not JSON")
                            and (status < 400 or kind != "-"))
                    ok &= good
                    rows.append((name, status, kind, good))
            innocent.join(600)
            after = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    same = under.get("text") == alone["text"] and bool(alone["text"])
    grew = after / before
    print("| hostile request | status | error type | handled |\n|---|---|---|---|")
    for name, status, kind, good in rows:
        print(f"| {name} | {status} | {kind} | {'yes' if good else 'NO'} |")
    print(f"\ninnocent stream under attack equals alone: {same} ({len(alone['text'])} characters)")
    print(f"server RSS: {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after ({grew:.2f}x)")
    return 0 if ok and same and grew <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
