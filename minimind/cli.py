"""The `minimind` command: one entry point for the whole life cycle. `minimind --help`, then
`minimind <command> --help` for each command's flags."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minimind import MiniMindError, __version__
from minimind.data.commands import add_data_parser
from minimind.eval.commands import add_eval_parser
from minimind.export.commands import add_export_parser
from minimind.importer import add_import_parser
from minimind.lora import add_lora_parser
from minimind.serve.commands import add_serve_parser


def load_for_inference(args: argparse.Namespace):
    """Model and tokenizer from --model, on --device, in --dtype."""
    from minimind.checkpoint import load_model
    from minimind.device import pick_device, pick_dtype
    from minimind.quant import quantize
    from minimind.tokenizer import load_tokenizer

    device = pick_device(args.device)
    model = load_model(args.model, device=device, dtype=pick_dtype(args.dtype, device))
    if getattr(args, "lora", None):
        from minimind.lora import load_adapter

        model = load_adapter(model, args.lora, merge=True)  # folded in: decoding costs nothing extra
    model = quantize(model, getattr(args, "quantize", None))
    tokenizer = load_tokenizer(args.model)
    if len(tokenizer) > model.config.vocab_size:
        raise MiniMindError(f"{args.model}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                            f"is {model.config.vocab_size}")
    return model, tokenizer


def sampling_from(args: argparse.Namespace):
    from minimind.generation import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              stop=tuple(args.stop or ()), seed=args.seed)
    except ValueError as e:
        raise MiniMindError(str(e)) from None


# ---- commands --------------------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minimind.tokenizer import chars_per_token, train_tokenizer

    for f in args.data:
        if not Path(f).is_file():
            raise MiniMindError(f"{f}: file not found")
    tok = train_tokenizer(args.data, vocab_size=args.vocab_size, out_dir=args.out, progress=not args.quiet)
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")
    for lang, text in SAMPLES.items():
        print(f"  {lang}: {chars_per_token(tok, text):.2f} characters per token")


def cmd_generate(args: argparse.Namespace) -> None:
    from minimind.chat import encode_chat
    from minimind.generation import Completion, stream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_for_inference(args)
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

    model, tokenizer = load_for_inference(args)
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


def cmd_init(args: argparse.Namespace) -> None:
    import torch

    from minimind.checkpoint import save_model
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    cfg = ModelConfig.preset(args.preset, vocab_size=len(tokenizer))
    torch.manual_seed(args.seed)
    model = MiniMindForCausalLM(cfg)
    save_model(model, args.out, tokenizer)
    print(f"saved a randomly initialised {args.preset} model ({cfg.num_parameters():,} parameters) to {args.out}")


STAGES = {
    "pretrain": "minimind.train.pretrain:PretrainStage", "sft": "minimind.train.sft:SFTStage",
    "lora": "minimind.train.lora:LoRAStage", "dpo": "minimind.train.dpo:DPOStage",
    "distill": "minimind.train.distill:DistillStage", "reward": "minimind.train.reward:RewardStage",
    "grpo": "minimind.train.grpo:GRPOStage", "ppo": "minimind.train.ppo:PPOStage",
    "agent": "minimind.train.agent:AgentStage",
}


def cmd_train(args: argparse.Namespace) -> None:
    import importlib

    from minimind.train.config import load_config
    from minimind.train.loop import train

    overrides = list(args.overrides) + (["--resume", "true"] if args.resume else [])
    cfg = load_config(args.config, overrides, stage=args.stage)
    module, name = STAGES[args.stage].split(":")
    train(cfg, getattr(importlib.import_module(module), name))


def cmd_demo(args: argparse.Namespace) -> None:
    from minimind.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, all_stages=args.all)


SAMPLES = {
    "English": "The quick brown fox jumps over the lazy dog, and the small model learns to speak a little.",
    "Chinese": "小模型也能学会说话：从零开始训练一个语言模型，理解每一行代码。",
}


# ---- argument parsing ------------------------------------------------------------------------------


def add_model_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that pick and load a model for inference (chat, generate, serve, webui)."""
    p.add_argument("--model", required=required, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--lora", default=None, help="a LoRA adapter directory (PEFT layout) to apply to the model")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on GPUs and CPUs with native bf16, else float32)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 with bf16 activations, the fastest batch-1 decoding on a CPU")


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--think", action="store_true", help="let the model think first (enable_thinking) and show it")
    p.add_argument("--max-new-tokens", type=int, default=512, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.85, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind", description="Train, chat with and ship a tiny LLM.")
    parser.add_argument("--version", action="version", version=f"minimind {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline on the built-in data")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument("--all", action="store_true",
                   help="then LoRA, DPO, distillation and RL from the SFT model, each with its measured effect")
    p.set_defaults(func=cmd_demo)

    add_data_parser(sub)
    add_import_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    add_serve_parser(sub)
    add_lora_parser(sub)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = tok.add_parser("train", help="train on text files (.txt lines, .jsonl with text or conversations)")
    p.add_argument("--data", nargs="+", required=True, help="training files")
    p.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output directory (transformers tokenizer layout)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("train", help="train a stage (pretrain, sft, lora, dpo, distill, reward, grpo, ppo, agent)",
                       description=(
        "Settings come from --config FILE.toml, then any --key value override (every TrainConfig field: "
        "data, val_data, init_from, preset, tokenizer, seq_len, batch_size, global_batch_tokens, steps, epochs, "
        "lr, warmup_steps, device, dtype, compile, save_every, eval_every, ...). Under torchrun it runs DDP."))
    p.add_argument("stage", choices=list(STAGES), help="which stage to run")
    p.add_argument("--config", default=None, help="TOML settings file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.set_defaults(func=cmd_train, overrides=[])

    p = sub.add_parser("init", help="write a randomly initialised model directory from a preset")
    p.add_argument("--preset", default="tiny", help="minimind-3, minimind-3-moe, minimind2-small, minimind2, tiny")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory to bundle")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.func is not cmd_train:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    try:
        args.func(args)
    except MiniMindError as e:
        print(f"minimind: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
