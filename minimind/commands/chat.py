"""`minimind chat` (a terminal chat with history, thinking shown dimmed, and the built-in tools) and `minimind
generate` (one answer to one prompt, printed to stdout). `minimind chat --model runs/sft/model --tools`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minimind import MiniMindError
from minimind.commands.flags import add_model_flags, add_sampling_flags, check_chat, load_model_from, sampling_from


def user_content(model, text: str, images: int, what: str) -> str:
    """A user message's text for a vision model, with its attached images' `<image>` placeholders (see
    chat.place_images; a text-only model keeps `<image>` as text). MiniMindError naming `what` on a mismatch."""
    from minimind.chat import place_images

    if not getattr(model, "image_tokens", 0):
        return text
    try:
        return place_images(text, images)
    except ValueError as e:
        raise MiniMindError(f"{what}: {e}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    from minimind.chat import encode_chat
    from minimind.data.vision import image_inputs
    from minimind.generation import Completion, stream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.image and args.raw:
        raise MiniMindError("--image needs the chat template: drop --raw")
    model, tokenizer = load_model_from(args)
    images = image_inputs(model, [args.image or []], args.model)
    if not args.raw:
        check_chat(args, tokenizer)
    if args.raw:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": user_content(model, prompt, len(args.image or []), "--prompt")})
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True, enable_thinking=args.think,
                             image_tokens=getattr(model, "image_tokens", 0))
    if not ids:
        raise MiniMindError("the prompt is empty")
    result = Completion()
    try:
        for piece in stream(model, tokenizer, ids, sampling_from(args), result, images=images):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:  # e.g. the prompt does not fit the context
        raise MiniMindError(str(e)) from None
    sys.stdout.write("\n")


MAX_TOOL_ROUNDS = 5  # tool calls answered per user message before the chat gives the turn back


def cmd_chat(args: argparse.Namespace) -> None:
    import torch

    from minimind.chat import AssistantParser, encode_chat, thinking_on, thinks_by_default
    from minimind.data.vision import image_inputs
    from minimind.generation import Completion, stream
    from minimind.tools import ToolLoop, tool_schemas

    model, tokenizer = load_model_from(args)
    image_tokens = getattr(model, "image_tokens", 0)

    def attach(path: str) -> torch.Tensor:
        """One image's pixel values, read now, so a bad file is reported when it is named."""
        return image_inputs(model, [[path]], args.model)["pixel_values"]

    pending = [attach(path) for path in args.image or []]  # the images of the next user message
    params = sampling_from(args)
    try:
        tools = tool_schemas(args.tools.split(",") if args.tools != "all" else None) if args.tools else None
    except ValueError as e:
        raise MiniMindError(f"--tools: {e}") from None
    check_chat(args, tokenizer, tools)
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    n_params = sum(p.numel() for p in model.parameters())
    weights = model.model.embed_tokens.weight
    print(f"{Path(args.model).name}: {n_params / 1e6:.1f}M parameters on {weights.device} "
          f"({str(weights.dtype).removeprefix('torch.')})"
          + (f", tools: {', '.join(t['function']['name'] for t in tools)}" if tools else "") + ". "
          "Ctrl-D or /exit quits, /clear forgets the conversation, Ctrl-C stops an answer"
          + (", /image PATH attaches an image to the next message." if image_tokens else "."))
    system = [{"role": "system", "content": args.system}] if args.system else []

    def reply(turn: list[dict]) -> dict | None:
        """Stream one assistant message for `turn`; returns it parsed, or None if it could not run."""
        ids, _ = encode_chat(tokenizer, system + turn, tools=tools, add_generation_prompt=True,
                             enable_thinking=args.think, image_tokens=image_tokens)
        # Forget the oldest turns rather than overflow the context (their images go with them).
        while len(ids) + params.max_new_tokens > model.config.max_position_embeddings and len(turn) > 1:
            turn[:] = turn[2:]
            ids, _ = encode_chat(tokenizer, system + turn, tools=tools, add_generation_prompt=True,
                                 enable_thinking=args.think, image_tokens=image_tokens)
        pixels = [m["images"] for m in turn if m.get("images") is not None]
        images = {"pixel_values": torch.cat(pixels), "image_counts": [sum(map(len, pixels))]} if pixels else None
        thinking = thinking_on(args.think, None, thinks_by_default(tokenizer))
        result, parser = Completion(), AssistantParser(thinking, parse_tools=bool(tools))
        shown = ""  # which part is on the screen: reasoning (dimmed) or content

        def show(deltas: list[dict]) -> None:
            nonlocal shown
            for delta in deltas:
                for key, text in delta.items():
                    if key == "tool_calls":
                        continue  # the tool loop prints each call with its result
                    if key != shown:
                        sys.stdout.write(dim if key == "reasoning_content" else reset + "\n" * bool(shown))
                        shown = key
                    sys.stdout.write(text)
            sys.stdout.flush()

        start = time.perf_counter()
        try:
            for piece in stream(model, tokenizer, ids, params, result, images=images):
                show(parser.feed(piece))
        except KeyboardInterrupt:
            sys.stdout.write(reset + " [stopped]")
        except ValueError as e:  # a message too long for the context: say so and keep the session
            sys.stdout.write(f"{reset}[error: {e}]\n")
            return None
        show(parser.finish())
        seconds = time.perf_counter() - start
        n = len(result.token_ids)
        sys.stdout.write(f"{reset}\n{dim}[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]{reset}\n")
        message = {"role": "assistant", "content": parser.message["content"]}
        message.update({k: parser.message[k] for k in ("reasoning_content", "tool_calls") if parser.message[k]})
        return message

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
            pending.clear()
            print("(conversation cleared)")
            continue
        try:
            if line.split(maxsplit=1)[0] == "/image":
                path = line.strip()[len("/image"):].strip()
                if not path:
                    raise MiniMindError("usage: /image PATH")
                pending.append(attach(path))
                print(f"(image attached: {len(pending)} for the next message)")
                continue
            content = user_content(model, line, len(pending), "message")
        except MiniMindError as e:  # a missing file, no vision tower, placeholders and images disagree
            print(f"[error: {e}]")
            continue
        user = {"role": "user", "content": content}
        if pending:
            user["images"] = torch.cat(pending)  # the images travel with their message (and leave with it)
            pending = []
        turn = history + [user]
        loop = ToolLoop(MAX_TOOL_ROUNDS)  # the tools are our own parsers: the model's text is data, never code
        while (message := reply(turn)) is not None:
            turn.append(message)
            results = loop.step(message) if tools else None
            if results is None:
                if tools and not loop.finished:
                    print(f"{dim}[stopped after {MAX_TOOL_ROUNDS} rounds of tool calls]{reset}")
                break
            for call, result in zip(message["tool_calls"], results):
                fn = call["function"]
                print(f"{dim}[tool] {fn['name']}({fn['arguments']}) -> {result['content']}{reset}")
            turn += results
        if not args.no_history and message is not None:
            history = turn


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="let the model think first (enable_thinking) and show it; default: as the model's chat "
                        "template says (on for a model taught to think, such as the demo's)")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image for the (first) message, for a vision model (repeatable); its place is an "
                        "<image> in the text, else each image goes on a line before it")
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
