"""`minimind train STAGE` (one training stage: settings from a TOML file, then --key value overrides) and
`minimind init` (a random model directory). `minimind train sft --config configs/x.toml --init-from DIR`."""

from __future__ import annotations

import argparse
import dataclasses

from minimind.train.config import TrainConfig


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
    "agent": "minimind.train.agent:AgentStage", "vision-pretrain": "minimind.train.vision:VisionPretrainStage",
    "vision-sft": "minimind.train.vision:VisionSFTStage", "vision-tower": "minimind.train.vision:VisionTowerStage",
}


def cmd_train(args: argparse.Namespace) -> None:
    import importlib

    from minimind.train.config import load_config
    from minimind.train.loop import train

    overrides = list(args.overrides) + (["--resume", "true"] if args.resume else [])
    cfg = load_config(args.config, overrides, stage=args.stage)
    module, name = STAGES[args.stage].split(":")
    train(cfg, getattr(importlib.import_module(module), name))


def settings_help() -> str:
    """Every TrainConfig field as the dashed flag that sets it, with its default."""
    skip = ("stage", "resume")  # the positional argument and the flag argparse declares
    return ", ".join(f"--{f.name.replace('_', '-')} ({getattr(TrainConfig(), f.name)!r})"
                     for f in dataclasses.fields(TrainConfig) if f.name not in skip)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `init`."""
    p = sub.add_parser("train", help="train a stage (pretrain, sft, lora, dpo, distill, reward, grpo, ppo, agent, "
                       "vision-tower, vision-pretrain, vision-sft)",
                       description=(
        "Settings come from --config FILE.toml, then --key value overrides of any setting: dashed (--init-from "
        "DIR) or, as older scripts write them, underscored (--init_from DIR). On/off settings take --progress / "
        "--no-progress (or --progress false). Under torchrun it runs DDP. Settings (default): " + settings_help()))
    p.add_argument("stage", choices=list(STAGES), help="which stage to run")
    p.add_argument("--config", default=None, help="TOML settings file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.set_defaults(func=cmd_train, overrides=[])  # `overrides`: main() hands this command the unparsed --key value

    p = sub.add_parser("init", help="write a randomly initialised model directory from a preset")
    p.add_argument("--preset", default="tiny", help="minimind-3, minimind-3-moe, minimind2-small, minimind2, tiny")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory to bundle")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)
