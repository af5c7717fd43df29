"""`minimind serve` (the OpenAI-compatible API) and `minimind webui` (the Streamlit chat page, with an API in
this process or a running one). `minimind serve --model DIR [--port 8998]`, `minimind webui --model DIR`."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minimind import MiniMindError
from minimind.commands.flags import add_model_flags, load_model_from

WEBUI = Path(__file__).resolve().parents[1] / "serve" / "webui.py"  # a file: `streamlit run` takes a path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_limits(args: argparse.Namespace) -> None:
    """--max-batch and --max-queue must be at least 1 (a queue of 0 would refuse every request with 429)."""
    for flag in ("max_batch", "max_queue"):
        if getattr(args, flag) < 1:
            raise MiniMindError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")


def load_served_model(args: argparse.Namespace):
    """Model and tokenizer for --model (with --lora applied), on --device in --dtype. Loaded on a thread that
    ends here, so the scheduler's thread holds the process's only OpenMP pool: OpenMP keeps one pool of workers
    for each thread that has run parallel work, and with more workers than cores libgomp stops spinning between
    parallel regions, which made a decode step on the scheduler's thread 2.4x slower (measured on 2 cores)."""
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    with ThreadPoolExecutor(1, thread_name_prefix="minimind-load") as pool:  # its thread ends with the block
        return pool.submit(load_model_from, args).result()  # applies --lora (merged into the weights)


def start_api_thread(args: argparse.Namespace, host: str, port: int):
    """Run the API server in a background thread of this process; returns the uvicorn.Server once it listens."""
    import uvicorn

    from minimind.serve.api import create_app

    check_limits(args)
    model, tokenizer = load_served_model(args)
    app = create_app(model, tokenizer, name=args.name or Path(args.model).resolve().name, **app_options(args, model))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="minimind-api", daemon=True).start()
    deadline = time.time() + (1800 if getattr(args, "compile", False) else 60)  # compiles come first
    while not server.started:
        if time.time() > deadline or (server.should_exit and not server.started):
            raise MiniMindError(f"the API server did not start on {host}:{port}")
        time.sleep(0.05)
    return server


def app_options(args: argparse.Namespace, model) -> dict:
    """create_app's options from the flags, checked against the model."""
    from minimind.generation import sampling_defaults
    from minimind.serve.images import DEFAULT_MAX_IMAGE_BYTES, ImageLimits

    context = model.config.max_position_embeddings
    if args.max_model_len is not None and not 0 < args.max_model_len <= context:
        raise MiniMindError(f"--max-model-len {args.max_model_len}: must be in [1, {context}] (the model's context)")
    for flag in ("default_max_tokens", "max_body_bytes", "max_image_bytes"):
        if (value := getattr(args, flag)) is not None and value < 1:
            raise MiniMindError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    return {"api_key": args.api_key, "max_batch": args.max_batch, "max_queue": args.max_queue,
            "sampling_defaults": sampling_defaults(args.model), "max_model_len": args.max_model_len,
            "default_max_tokens": args.default_max_tokens, "max_body_bytes": args.max_body_bytes,
            "docs": args.docs, "image_limits": ImageLimits(allow_remote=args.allow_remote_images,
                                                           max_bytes=args.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES)}


def cmd_serve(args: argparse.Namespace) -> None:
    from minimind.serve.api import serve

    check_limits(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or os.environ.get("MINIMIND_API_KEY")):
        print(f"minimind: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    model, tokenizer = load_served_model(args)
    options = app_options(args, model)
    name = args.name or Path(args.model).resolve().name
    print(f"minimind: serving {name} ({model.num_parameters() / 1e6:.1f}M parameters) at "
          f"http://{args.host}:{args.port}/v1 (max batch {args.max_batch})", file=sys.stderr)
    serve(model, tokenizer, name, host=args.host, port=args.port, **options)


def cmd_webui(args: argparse.Namespace) -> None:
    if not args.api and not args.model:
        raise MiniMindError("give --model DIR (starts an API server in this process) or --api URL")
    api = args.api
    if args.model:
        port = free_port()
        start_api_thread(args, "127.0.0.1", port)
        api = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "streamlit", "run", str(WEBUI), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--api", api]
    env = dict(os.environ)
    if args.api_key:
        env["MINIMIND_API_KEY"] = args.api_key  # the page reads it from the environment, not argv (ps shows argv)
    print(f"minimind: chat page at http://{args.host}:{args.port} (API {api})", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)

    def stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a plain `kill` must take the page down with us
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def _model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    add_model_flags(p, required)
    p.add_argument("--name", default=None, help="model id shown by /v1/models (default: the directory's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route; /health without it answers only "
                        "{\"status\": \"ok\"} (default: $MINIMIND_API_KEY, else no auth, and only requests "
                        "whose Host is the bound address are served)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get HTTP 429")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context served, prompt plus completion, in tokens (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="completion tokens for a request that sets no max_tokens (default: the model's "
                        "max_new_tokens, else 512)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="larger request bodies get HTTP 413 (default: 4 MiB)")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="a vision model: fetch http(s) image_url parts (off: only data: URLs; the server would "
                        "fetch any address a client names)")
    p.add_argument("--max-image-bytes", type=int, default=None,
                   help="a vision model: larger images (decoded or downloaded) get HTTP 400 (default: 8 MiB)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `webui`."""
    p = sub.add_parser("serve", help="OpenAI-compatible API server with continuous batching",
                       description="Serves /v1/chat/completions, /v1/completions, /v1/models and /health.")
    _model_flags(p, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8998, help="port to listen on")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("webui", help="Streamlit chat page (starts an API server for --model, or uses --api)")
    _model_flags(p, required=False)
    p.add_argument("--api", default=None, help="use a running API server, e.g. http://127.0.0.1:8998/v1")
    p.add_argument("--host", default="127.0.0.1", help="address the page binds")
    p.add_argument("--port", type=int, default=8501, help="port of the page")
    p.set_defaults(func=cmd_webui)
