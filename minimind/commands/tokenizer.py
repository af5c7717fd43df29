"""`minimind tokenizer train`: a byte-level BPE tokenizer from text files, with its characters-per-token on
samples. `minimind tokenizer train --data data/pretrain.jsonl --vocab-size 6400 --out tok/`."""

from __future__ import annotations

import argparse
from pathlib import Path

from minimind import MiniMindError

SAMPLES = {
    "English": "The quick brown fox jumps over the lazy dog, and the small model learns to speak a little.",
    "Chinese": "小模型也能学会说话：从零开始训练一个语言模型，理解每一行代码。",
}


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minimind.tokenizer import chars_per_token, train_tokenizer

    for f in args.data:
        if not Path(f).is_file():
            raise MiniMindError(f"{f}: file not found")
    tok = train_tokenizer(args.data, vocab_size=args.vocab_size, out_dir=args.out, progress=not args.quiet)
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")
    for lang, text in SAMPLES.items():
        print(f"  {lang}: {chars_per_token(tok, text):.2f} characters per token")


def add_parser(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = tok.add_parser("train", help="train on text files (.txt lines, .jsonl with text or conversations)")
    p.add_argument("--data", nargs="+", required=True, help="training files")
    p.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output directory (transformers tokenizer layout)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_tokenizer_train)
