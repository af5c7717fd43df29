"""`minimind data ...`: built-in data, checks, conversions, cleaning, downloads of MiniMind's datasets, DPO pairs
of a model's own mistakes, and black-box distillation data. `minimind data builtin --out data/`."""

from __future__ import annotations

import argparse

from minimind import MiniMindError
from minimind.commands.flags import DTYPE_CHOICES
from minimind.data.tasks import FAMILIES


def cmd_builtin(args: argparse.Namespace) -> None:
    if args.vision:
        cmd_builtin_vision(args)
        return
    from minimind.data.builtin import write_builtin

    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    paths = write_builtin(args.out, seed=args.seed, pretrain_chars=args.pretrain_chars or None,
                          sft_tasks=args.sft_tasks, heldout_tasks=args.heldout_tasks, families=families)
    for path in paths.values():
        with open(path, "rb") as f:
            rows = sum(1 for _ in f)
        print(f"wrote {path}: {rows:,} rows, {path.stat().st_size / 1e3:,.0f} kB")


def cmd_builtin_vision(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from minimind.data.images import write_vision_builtin

    kinds = [k.strip() for k in args.vision_kinds.split(",") if k.strip()] if args.vision_kinds else None
    paths = write_vision_builtin(args.out, seed=args.seed, size=args.image_size, sft_rows=args.vision_sft,
                                 caption_rows=args.vision_captions, heldout_rows=args.vision_heldout, kinds=kinds)
    for path in paths.values():
        rows = pq.ParquetFile(path).metadata.num_rows
        print(f"wrote {path}: {rows:,} rows, {path.stat().st_size / 1e3:,.0f} kB")


def cmd_check(args: argparse.Namespace) -> None:
    import sys

    from minimind.data.formats import check_file, format_report

    tokenizer = None
    if args.tokenizer:
        from minimind.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.vision or args.file.lower().endswith(".parquet"):  # the only Parquet rows `check` reads
        from minimind.data.vision import IMAGE_TOKENS, check_vision

        if args.seq_len and tokenizer is None:
            raise MiniMindError("--seq-len needs --tokenizer (lengths are counted in its tokens)")

        report = check_vision(args.file, tokenizer, args.seq_len, IMAGE_TOKENS, args.max_problems)
    else:
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

    from minimind.checkpoint import load_model
    from minimind.data.formats import decode_line, iter_rows, read_lines
    from minimind.eval.preference import mistake_pairs
    from minimind.files import atomic_path
    from minimind.tokenizer import load_tokenizer

    raw = dict(read_lines(args.pairs))
    # Rows in either DPO layout, validated (a bad line fails with file:line); a row's `task` is kept.
    pairs = [{**row, "task": decode_line(raw[n]).get("task")} for n, row in iter_rows(args.pairs, "dpo")]
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    own = mistake_pairs(model, tokenizer, pairs, batch_size=args.batch_size)
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in own), encoding="utf-8")
    print(f"wrote {len(own):,} pairs of the model's own wrong answers to {args.out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `data` and its actions."""
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
    p.add_argument("--vision", action="store_true", help="write the built-in image sets instead: "
                   "vision_pretrain (captions), vision_sft and vision_heldout (questions), as MiniMind-V's Parquet")
    p.add_argument("--image-size", type=int, default=256, help="--vision: image side in pixels (MiniMind-V: 256)")
    p.add_argument("--vision-sft", type=int, default=4000, help="--vision: question rows in vision_sft.parquet")
    p.add_argument("--vision-captions", type=int, default=2000, help="--vision: rows in vision_pretrain.parquet")
    p.add_argument("--vision-heldout", type=int, default=700, help="--vision: rows in vision_heldout.parquet")
    p.add_argument("--vision-kinds", default="", help="--vision: question kinds (shape, colour, count, position, "
                   "size, read, chart), comma-separated, taken in turn; default: all")
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
    add_download_parser(data)
    add_distill_parser(data)
    add_clean_parser(data)


def add_check_convert_parsers(data: argparse._SubParsersAction) -> None:
    from minimind.data.formats import KINDS

    p = data.add_parser("check", help="validate a data file; print every bad line as file:line: problem",
                        description="Validate a data file. Exits 1 if any line is bad.")
    p.add_argument("file", help="a .jsonl data file (or .txt pretraining text; with --vision also .parquet)")
    p.add_argument("--kind", choices=KINDS, default=None, help="data kind (default: detected from the first row)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory: also report tokens per row")
    p.add_argument("--max-problems", type=int, default=50, help="print at most this many bad lines (all are counted)")
    p.add_argument("--vision", action="store_true", help="image rows: JSONL with `images` (a .parquet file is always "
                   "read as MiniMind-V's image rows); every image decoded, one per <image> placeholder")
    p.add_argument("--seq-len", type=int, default=None, help="--vision with --tokenizer: an image row longer than "
                   "this (its <image>s as 64 tokens each) is bad")
    p.set_defaults(func=cmd_check)

    p = data.add_parser("convert", help="convert Alpaca, ShareGPT or OpenAI-messages data to MiniMind JSONL")
    p.add_argument("src", help="source file (.jsonl, or a .json array)")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--from", dest="fmt", default="auto", choices=["auto", "alpaca", "sharegpt", "openai"],
                   help="source format (default: detected from the first row)")
    p.set_defaults(func=cmd_convert)


def cmd_download(args: argparse.Namespace) -> None:
    import sys

    from minimind.data.download import download, format_list

    if args.list or not args.names:
        print(format_list())
        return
    if args.sha256 and len(args.names) > 1:
        raise MiniMindError("--sha256 checks one file; give one name with it")
    for name in args.names:
        path = download(name, args.out, source=args.source, endpoint=args.endpoint, revision=args.revision,
                        progress=sys.stderr.isatty() and not args.quiet, sha256=args.sha256)
        print(f"{path}: {path.stat().st_size:,} bytes, checked")


def add_download_parser(data: argparse._SubParsersAction) -> None:
    from minimind.data.download import HF_REPO, MS_REPO, SOURCES

    p = data.add_parser("download", help="download MiniMind's published datasets (--list shows them)",
                        description="Download MiniMind's dataset files from the Hugging Face Hub "
                        f"({HF_REPO}; set HF_ENDPOINT for a mirror) or ModelScope ({MS_REPO}). "
                        "Interrupted downloads resume. Each file's size is checked against the server's; its "
                        "sha256 only where one is known: the Hub's LFS hash (--source hf) or --sha256 (MiniMind's "
                        "registry lists none, and ModelScope sends none).")
    p.add_argument("names", nargs="*", help="dataset names (e.g. sft_t2t_mini dpo) or file names")
    p.add_argument("--list", action="store_true", help="list the published files and exit")
    p.add_argument("--out", default="data", help="output directory")
    p.add_argument("--source", default="hf", choices=SOURCES, help="where to download from")
    p.add_argument("--endpoint", default=None, help="server URL (default: $HF_ENDPOINT or huggingface.co for hf; "
                   "$MODELSCOPE_ENDPOINT or www.modelscope.cn for modelscope)")
    p.add_argument("--revision", default=None, help="branch or commit (default: main on hf, master on modelscope)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the file (one name only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)


def cmd_distill(args: argparse.Namespace) -> None:
    import sys

    from minimind.inference import sampling_params
    from minimind.train.distill import distill_file

    # The teacher's generation_config.json gives the sampling defaults; the flags override it.
    params = sampling_params(args.teacher, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    counts = distill_file(args.teacher, args.prompts, args.out, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k, seed=args.seed, enable_thinking=args.think,
                          keep_truncated=args.keep_truncated, limit=args.limit, device=args.device, dtype=args.dtype,
                          skip_bad=args.skip_bad, progress=sys.stderr.isatty())
    dropped = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items()
                        if k not in ("prompts", "written") and v)
    print(f"wrote {counts['written']:,} of {counts['prompts']:,} teacher answers to {args.out}"
          + (f" (dropped: {dropped})" if dropped else ""))


def add_distill_parser(data: argparse._SubParsersAction) -> None:
    """`minimind data distill`: black-box distillation data (the teacher's answers as an SFT file)."""
    p = data.add_parser("distill", help="generate a teacher model's answers to prompts as an SFT file",
                        description="Black-box distillation: the teacher answers each prompt (RL format: a "
                        "conversation ending with a user turn); the answers are written as SFT rows to train "
                        "a student with `minimind train sft`. It samples as the teacher's generation_config.json "
                        "says unless the flags say otherwise; --temperature 0 gives the teacher's most likely "
                        "(greedy) answers.")
    p.add_argument("--teacher", required=True, help="teacher model directory (with its tokenizer)")
    p.add_argument("--prompts", required=True, help="prompts .jsonl (conversations ending with a user turn)")
    p.add_argument("--out", required=True, help="output SFT .jsonl (written atomically)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer; longer ones are dropped")
    teacher = " (default: the teacher's generation_config.json)"
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy" + teacher)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, 1 = off" + teacher)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens, 0 = off" + teacher)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--think", action="store_true", help="let the teacher think first; keeps its reasoning_content")
    p.add_argument("--keep-truncated", action="store_true", help="keep answers cut off by --max-new-tokens")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad prompt lines instead of failing")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="teacher weights dtype")
    p.set_defaults(func=cmd_distill)


def cmd_clean(args: argparse.Namespace) -> None:
    import sys

    from minimind.data.clean import clean

    report = clean(args.inputs, args.out, kind=args.kind, config=args.config, eval_files=args.eval,
                   tokenizer=args.tokenizer, workers=args.workers or None, strict=args.strict,
                   progress=sys.stderr.isatty() and not args.quiet)
    removed = ", ".join(f"{rule} {n:,}" for rule, n in report.removed.items()) or "nothing"
    print(f"{report.rows_in:,} rows in, {report.rows_out:,} kept in {args.out}/clean.jsonl; removed: {removed}; "
          f"{report.mb_per_s:,.2f} MB/s, peak memory {report.peak_rss_mb:,.0f} MB. Details: {args.out}/report.md")


def add_clean_parser(data: argparse._SubParsersAction) -> None:
    from minimind.data.quality import DEFAULTS

    p = data.add_parser("clean", help="remove duplicates, low-quality rows and evaluation overlap; scrub PII",
                        description="Clean pretrain or SFT data (JSONL or Parquet): PII scrub, C4 and Gopher "
                        "quality rules, language by script, SFT checks, n-gram decontamination against --eval "
                        f"files, exact and MinHash near-duplicate removal. Rules and thresholds: {DEFAULTS} "
                        "(pass a TOML with the keys to change as --config). Writes clean.jsonl, removed.jsonl "
                        "(each removed row with its rule), report.md, lengths.png and stats.json. Run the same "
                        "command again after an interruption to resume.")
    p.add_argument("inputs", nargs="+", help=".jsonl or .parquet files, cleaned as one corpus in this order")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--kind", choices=["pretrain", "sft"], default=None, help="row kind (default: detected)")
    p.add_argument("--config", default=None, help="TOML file of rule settings over the defaults")
    p.add_argument("--eval", nargs="+", default=[], metavar="FILE",
                   help="evaluation files (JSONL, CSV, Parquet, text) whose 13-grams training rows must not share")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory: SFT conversations over sft.max_tokens "
                   "are removed")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line (default: skip and "
                   "list it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_clean)
