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


def cmd_check(args: argparse.Namespace) -> None:
    import sys

    from minimind.data.formats import check_file, format_report

    tokenizer = None
    if args.tokenizer:
        from minimind.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    report = check_file(args.file, kind=args.kind, tokenizer=tokenizer, max_problems=args.max_problems,
                        progress=sys.stderr.isatty())
    print(format_report(report))
    if report.n_bad:
        raise SystemExit(1)  # after the report, so scripts and CI see both the lines and a failure


def cmd_convert(args: argparse.Namespace) -> None:
    import sys

    from minimind.data.convert import convert_file

    written, bad = convert_file(args.src, args.out, fmt=args.fmt)
    for b in bad:
        print(b, file=sys.stderr)
    print(f"wrote {written:,} rows to {args.out}" + (f" ({len(bad):,} bad lines skipped)" if bad else ""))


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="built-in data, checks and conversions").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = data.add_parser("builtin", help="write the built-in corpora as MiniMind-format JSONL")
    p.add_argument("--out", default="data", help="output directory")
    p.set_defaults(func=cmd_builtin)
    add_check_convert_parsers(data)


def add_check_convert_parsers(data: argparse._SubParsersAction) -> None:
    from minimind.data.formats import KINDS

    p = data.add_parser("check", help="validate a data file; print every bad line as file:line: problem",
                        description="Validate a data file. Exits 1 if any line is bad.")
    p.add_argument("file", help="a .jsonl data file (or .txt pretraining text)")
    p.add_argument("--kind", choices=KINDS, default=None, help="data kind (default: detected from the first row)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory: also report tokens per row")
    p.add_argument("--max-problems", type=int, default=50, help="print at most this many bad lines (all are counted)")
    p.set_defaults(func=cmd_check)

    p = data.add_parser("convert", help="convert Alpaca, ShareGPT or OpenAI-messages data to MiniMind JSONL")
    p.add_argument("src", help="source file (.jsonl, or a .json array)")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--from", dest="fmt", default="auto", choices=["auto", "alpaca", "sharegpt", "openai"],
                   help="source format (default: detected from the first row)")
    p.set_defaults(func=cmd_convert)
