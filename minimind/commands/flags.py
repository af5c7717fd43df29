"""The flags several commands share (which model to load and how, how to sample) and the glue from parsed
flags to minimind.inference. `add_model_flags(p)`, then `model, tok = load_model_from(args)`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from minimind.config import ROPE_SCALING_CHOICES

if TYPE_CHECKING:  # importing generation pulls in torch: too slow for `minimind --help`
    from minimind.generation import SamplingParams

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def add_rope_scaling_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--rope-scaling yarn|none, and MiniMind's spelling --inference_rope_scaling for yarn."""
    p.add_argument("--rope-scaling", choices=list(ROPE_SCALING_CHOICES), default=None,
                   help=f"{what}: yarn = MiniMind's YaRN (factor 16 over 2048 positions, beta 32/1, attention "
                        "factor 1), none = no scaling (default: as config.json says)")
    p.add_argument("--inference-rope-scaling", "--inference_rope_scaling", dest="rope_scaling",
                   action="store_const", const="yarn", help="the same as --rope-scaling yarn (MiniMind's flag)")


def add_model_flags(p: argparse.ArgumentParser, required: bool = True, compile: bool = False) -> None:
    """The flags that pick and load a model for inference (chat, generate, eval, serve, webui); `compile` is
    the command's default for --compile."""
    p.add_argument("--model", required=required, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--lora", default=None, help="a LoRA adapter directory (PEFT layout) to apply to the model")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype (auto: bfloat16 on GPUs and CPUs with native bf16, else float32)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: int8 weights and (on a CPU) int8 activations, the fastest decoding on a CPU")
    add_rope_scaling_flag(p, "override the model's RoPE scaling")
    # Off by default for one-shot commands: a cold compile costs 40-70 s on a small CPU before the first token
    # (a few seconds once Inductor's on-disk cache is warm), which a quick chat never earns back.
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile,
                   help="compile the decode step with torch.compile (fixed shapes, ~1 min the first time per "
                        f"batch size and cache length, cached on disk; default: {'on' if compile else 'off'})")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags. Each defaults to None: the model's generation_config.json decides, a flag overrides it."""
    model = " (default: the model's generation_config.json)"
    p.add_argument("--max-new-tokens", type=int, default=None, help="stop after this many new tokens" + model)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy" + model)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens, 0 = off" + model)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, 1 = off" + model)
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability" + model)
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL-style penalty, 1 = off" + model)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def load_model_from(args: argparse.Namespace) -> tuple[Any, Any]:
    """Model and tokenizer as the model flags say."""
    from minimind.inference import load_for_inference

    return load_for_inference(args.model, lora=args.lora, device=args.device, dtype=args.dtype,
                              quantize=args.quantize, rope_scaling=args.rope_scaling,
                              compile=getattr(args, "compile", False))


def check_chat(args: argparse.Namespace, tokenizer: Any, tools: Any = None) -> None:
    """Before any work: a clear error when --think or tools ask for what the model's chat format has no tokens
    for (a minimind2-era tokenizer has no think or tool tags)."""
    from minimind import MiniMindError
    from minimind.chat import chat_format, check_format

    try:
        check_format(chat_format(tokenizer), bool(getattr(args, "think", False)), tools)
    except ValueError as e:
        raise MiniMindError(f"{args.model}: {e}") from None


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the sampling flags over the model's generation_config.json."""
    from minimind.inference import sampling_params

    return sampling_params(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repetition_penalty=args.repetition_penalty,
                           stop=tuple(args.stop) if args.stop else None, seed=args.seed)
