"""`minimind data ...`: the data subcommands (builtin, check, convert, mistakes), wired into the main CLI by cli.py.
`minimind data builtin --out data/`."""

from __future__ import annotations

import argparse

from minimind.data.tasks import FAMILIES


def cmd_builtin(args: argparse.Namespace) -> None:
    from minimind.data.builtin import write_builtin

    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    paths = write_builtin(args.out, seed=args.seed, pretrain_chars=args.pretrain_chars or None,
                          sft_tasks=args.sft_tasks, heldout_tasks=args.heldout_tasks, families=families)
    for path in paths.values():
        with open(path, "rb") as f:
            rows = sum(1 for _ in f)
        print(f"wrote {path}: {rows:,} rows, {path.stat().st_size / 1e3:,.0f} kB")


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


def cmd_mistakes(args: argparse.Namespace) -> None:
    import json

    from minimind.checkpoint import atomic_path, load_model
    from minimind.data.formats import decode_line, iter_rows, read_lines
    from minimind.data.preferences import mistake_pairs
    from minimind.tokenizer import load_tokenizer

    raw = dict(read_lines(args.pairs))
    # Rows in either DPO layout, validated (a bad line fails with file:line); a row's `task` is kept.
    pairs = [{**row, "task": decode_line(raw[n]).get("task")} for n, row in iter_rows(args.pairs, "dpo")]
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    own = mistake_pairs(model, tokenizer, pairs, batch_size=args.batch_size)
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in own), encoding="utf-8")
    print(f"wrote {len(own):,} pairs of the model's own wrong answers to {args.out}")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="built-in data, checks and conversions").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = data.add_parser("builtin", help="write the built-in corpora as MiniMind-format JSONL")
    p.add_argument("--out", default="data", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, shuffling and generated tasks")
    p.add_argument("--pretrain-chars", type=int, default=2_000_000,
                   help="characters of pretraining text, half English, half Chinese (0: all, about 8M)")
    p.add_argument("--sft-tasks", type=int, default=2000, help="generated tasks in sft.jsonl")
    p.add_argument("--heldout-tasks", type=int, default=200, help="held-out task prompts in tasks_heldout.jsonl")
    p.add_argument("--families", default="", help="task families, comma-separated, taken in turn (name one twice for "
                   f"twice its share); default: {','.join(FAMILIES)}")
    p.set_defaults(func=cmd_builtin)
    add_check_convert_parsers(data)
    p = data.add_parser("mistakes", help="DPO pairs of a reference reply over the model's own wrong one",
                        description="The model answers the prompt of each DPO pair whose chosen reply ends in a "
                        "number (greedy; tool tasks left out); each wrong answer becomes a pair of the chosen "
                        "reply over the model's own reply, to train with `minimind train dpo`.")
    p.add_argument("--model", required=True, help="model directory (with its tokenizer)")
    p.add_argument("--pairs", required=True, help="DPO .jsonl whose chosen replies are the references")
    p.add_argument("--out", required=True, help="output DPO .jsonl (written atomically)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.set_defaults(func=cmd_mistakes)
    from minimind.data.download import add_download_parser
    from minimind.train.distill import add_distill_parser

    add_download_parser(data)
    add_distill_parser(data)


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
