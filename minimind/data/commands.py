"""`minimind data ...`: the data subcommands (builtin, check, convert), wired into the main CLI by cli.py.
`minimind data builtin --out data/`."""

from __future__ import annotations

import argparse


def cmd_builtin(args: argparse.Namespace) -> None:
    from pathlib import Path

    from minimind.data.builtin import write_pretrain_jsonl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = write_pretrain_jsonl(out / "pretrain.jsonl")
    print(f"wrote {rows:,} pretraining documents to {out / 'pretrain.jsonl'}")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="built-in data, checks and conversions").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = data.add_parser("builtin", help="write the built-in corpora as MiniMind-format JSONL")
    p.add_argument("--out", default="data", help="output directory")
    p.set_defaults(func=cmd_builtin)
