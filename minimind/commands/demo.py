"""`minimind demo`: the whole pipeline on the built-in data (tokenizer, pretraining, SFT, evaluation; with
--all also LoRA, DPO, distillation and RL; --vision: a vision-language model from its SFT model).
`minimind demo --quick`, `minimind demo --vision`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> None:
    if args.vision:
        from minimind.recipes.vision import run_vision_demo

        run_vision_demo(Path(args.out) / "vision", Path(args.vision_from or Path(args.out) / "sft" / "model"),
                        quick=args.quick, seeds=tuple(range(args.seeds)))
        return
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
    p.add_argument("--vision", action="store_true",
                   help="the vision demo instead: a vision-language model from the demo's SFT model (OUT/sft/model) "
                   "trained on the built-in images, held-out accuracy per question kind -> OUT/vision/report.md")
    p.add_argument("--vision-from", default="", help="--vision: the language model directory to start from")
    p.add_argument("--seeds", type=int, default=1, help="--vision: training runs (seeds 0..N-1) to report over")
    p.set_defaults(func=cmd_demo)
