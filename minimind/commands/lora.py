"""`minimind lora merge`: fold a LoRA adapter into its base model and write a full model directory.
`minimind lora merge --model runs/sft/model --lora runs/lora/adapter --out merged/`."""

from __future__ import annotations

import argparse

from minimind.commands.flags import DTYPE_CHOICES


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from minimind.lora import merge_to_directory

    out = merge_to_directory(args.model, args.lora, args.out, None if args.dtype == "auto" else args.dtype)
    print(f"merged {args.lora} into {args.model} -> {out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `lora merge`."""
    lora = sub.add_parser("lora", help="LoRA adapters: merge one into its base model").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = lora.add_parser("merge", help="fold an adapter into its base and write a full model directory",
                        description="Writes a model directory (transformers layout, tokenizer included) whose "
                                    "logits equal the base model with the adapter applied.")
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--lora", required=True, help="adapter directory (adapter_config.json, "
                                                 "adapter_model.safetensors), e.g. runs/lora/adapter")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype of the output (auto: the base model's)")
    p.set_defaults(func=cmd_lora_merge)
