"""`minimind demo`: the whole pipeline on the built-in data (tokenizer, pretraining, SFT, evaluation; with
--all also LoRA, DPO, distillation and RL). `minimind demo --quick`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> None:
    from minimind.recipes.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, all_stages=args.all, seed=args.seed, time_budget=args.time_budget,
             optimizer=args.optimizer)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in data")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument("--all", action="store_true",
                   help="then LoRA, DPO, distillation and RL from the SFT model, each with its measured effect")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and of the training")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default=None,
                   help="the optimizer of pretraining and SFT (default: muon, which the recipe is tuned for)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="fit pretraining and SFT to this many seconds on this machine instead of their fixed step "
                        "counts (the default, which trains the same everywhere)")
    p.set_defaults(func=cmd_demo)
