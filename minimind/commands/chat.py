"""`minimind chat` (a terminal chat with history, thinking shown dimmed, and the built-in tools) and `minimind
generate` (one answer to one prompt, printed to stdout). `minimind chat --model runs/sft/model --tools`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minimind import MiniMindError
from minimind.commands.flags import add_model_flags, add_sampling_flags, load_model_from, sampling_from


def cmd_generate(args: argparse.Namespace) -> None:
    from minimind.chat import encode_chat
    from minimind.generation import Completion, stream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model_from(args)
    if args.raw:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True, enable_thinking=args.think)
    if not ids:
        raise MiniMindError("the prompt is empty")
    result = Completion()
    try:
        for piece in stream(model, tokenizer, ids, sampling_from(args), result):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:  # e.g. the prompt does not fit the context
        raise MiniMindError(str(e)) from None
    sys.stdout.write("\n")


MAX_TOOL_ROUNDS = 5  # tool calls answered per user message before the chat gives the turn back


def cmd_chat(args: argparse.Namespace) -> None:
    from minimind.chat import encode_chat, parse_assistant
    from minimind.generation import Completion, stream
    from minimind.tools import run_tool, tool_schemas

    model, tokenizer = load_model_from(args)
    params = sampling_from(args)
    try:
        tools = tool_schemas(args.tools.split(",") if args.tools != "all" else None) if args.tools else None
    except ValueError as e:
        raise MiniMindError(f"--tools: {e}") from None
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    n_params = sum(p.numel() for p in model.parameters())
    weights = model.model.embed_tokens.weight
    print(f"{Path(args.model).name}: {n_params / 1e6:.1f}M parameters on {weights.device} "
          f"({str(weights.dtype).removeprefix('torch.')})"
          + (f", tools: {', '.join(t['function']['name'] for t in tools)}" if tools else "") + ". "
          "Ctrl-D or /exit quits, /clear forgets the conversation, Ctrl-C stops an answer.")
    system = [{"role": "system", "content": args.system}] if args.system else []

    def reply(turn: list[dict]) -> dict | None:
        """Stream one assistant message for `turn`; returns it parsed, or None if it could not run."""
        ids, _ = encode_chat(tokenizer, system + turn, tools=tools, add_generation_prompt=True,
                             enable_thinking=args.think)
        # Forget the oldest turns rather than overflow the context.
        while len(ids) + params.max_new_tokens > model.config.max_position_embeddings and len(turn) > 1:
            turn[:] = turn[2:]
            ids, _ = encode_chat(tokenizer, system + turn, tools=tools, add_generation_prompt=True,
                                 enable_thinking=args.think)
        result, text, thinking = Completion(), "", args.think
        if thinking:
            sys.stdout.write(dim)
        start = time.perf_counter()
        try:
            for piece in stream(model, tokenizer, ids, params, result):
                text += piece
                if thinking and "</think>" in piece:
                    before, after = piece.split("</think>", 1)
                    sys.stdout.write(before + reset + after.lstrip("\n"))
                    thinking = False
                else:
                    sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(reset + " [stopped]")
        except ValueError as e:  # a message too long for the context: say so and keep the session
            sys.stdout.write(f"{reset}[error: {e}]\n")
            return None
        seconds = time.perf_counter() - start
        n = len(result.token_ids)
        sys.stdout.write(f"{reset}\n{dim}[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]{reset}\n")
        return parse_assistant(("<think>\n" if args.think else "") + text)

    history: list[dict] = []
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/clear":
            history.clear()
            print("(conversation cleared)")
            continue
        turn = history + [{"role": "user", "content": line}]
        for _ in range(MAX_TOOL_ROUNDS + 1):
            message = reply(turn)
            if message is None:
                break
            turn.append({"role": "assistant", "content": message["content"],
                         **{k: message[k] for k in ("reasoning_content", "tool_calls") if message[k]}})
            if not tools or not message["tool_calls"]:
                break
            # The tools are our own parsers (minimind.tools): the model's text is data, never code.
            for call in message["tool_calls"]:
                fn = call["function"]
                output = run_tool(fn["name"], fn["arguments"])
                print(f"{dim}[tool] {fn['name']}({fn['arguments']}) -> {output}{reset}")
                turn.append({"role": "tool", "content": output})
        else:
            print(f"{dim}[stopped after {MAX_TOOL_ROUNDS} rounds of tool calls]{reset}")
        if not args.no_history and message is not None:
            history = turn


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--think", action="store_true", help="let the model think first (enable_thinking) and show it")
    add_sampling_flags(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `chat` and `generate`."""
    p = sub.add_parser("chat", help="chat in the terminal")
    add_inference_flags(p)
    p.add_argument("--no-history", action="store_true", help="answer each message on its own")
    p.add_argument("--tools", nargs="?", const="all", default=None,
                   help="offer the built-in tools (calculator, unit_convert; default all, or a comma list) and run "
                        "the model's tool calls in a sandbox")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one answer to one prompt, printed to stdout")
    add_inference_flags(p)
    p.add_argument("--prompt", required=True, help="the prompt text, or - to read stdin")
    p.add_argument("--raw", action="store_true", help="plain text continuation, no chat template")
    p.set_defaults(func=cmd_generate)
