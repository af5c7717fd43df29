"""`minimind eval --model DIR --task ppl|mc|gsm8k|probes [--data PATH] [--lora DIR] [--quantize int8]`: one
evaluation, printed as a table, written as JSON and noted in the run's report.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from minimind import MiniMindError
from minimind.commands.flags import add_model_flags, check_chat, load_model_from

TASKS = ("ppl", "mc", "gsm8k", "probes")


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned table; numbers right-aligned, floats to 4 places."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c) for c in r]
             for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_ppl(model, tokenizer, args: argparse.Namespace) -> tuple[dict, str, str]:
    from minimind.data.formats import iter_rows
    from minimind.eval.perplexity import score_texts

    if not args.data:
        raise MiniMindError("--task ppl needs --data (a .txt or a JSONL file of {\"text\": ...})")
    texts = []
    for _, row in iter_rows(args.data, "pretrain"):
        texts.append(row["text"])
        if args.limit and len(texts) >= args.limit:
            break
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    stride = args.stride or max(seq_len // 2, 1)
    if not 1 <= stride <= seq_len:
        raise MiniMindError(f"--stride must be 1 to the window length ({seq_len}), got {stride}")
    score = score_texts(model, tokenizer, texts, seq_len=seq_len, batch_size=args.batch_size, progress=args.progress,
                        stride=stride)
    metrics = {"texts": len(texts), "tokens": score.tokens, "bytes": score.bytes, "loss": score.loss,
               "perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte, "seq_len": seq_len,
               "stride": stride}
    table = format_table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    return {"metrics": metrics}, table, f"perplexity {score.perplexity:.3f}, {score.bits_per_byte:.4f} bits/byte"


def run_mc(model, tokenizer, args: argparse.Namespace) -> tuple[dict, str, str]:
    from minimind.eval.multiple_choice import evaluate_mc, read_mc

    if not args.data:
        raise MiniMindError("--task mc needs --data (MMLU/C-Eval/CMMLU/ARC .csv, .jsonl or .parquet files, "
                            "or a directory)")
    items = read_mc(args.data)
    pool = read_mc(args.shots) if args.shots else None
    result = evaluate_mc(model, tokenizer, items, few_shot=args.few_shot, mode=args.mode, limit=args.limit,
                         batch_size=args.batch_size, progress=args.progress, shot_pool=pool, bos=args.bos)
    subjects = result.subject_accuracy()
    rows = [[s, v["n"], v["shots"], v["accuracy"], v["acc_norm"], v["acc_bytes"]] for s, v in subjects.items()]
    rows.append(["overall", result.total, min(result.shots.values()), result.accuracy, result.acc_norm,
                 result.acc_bytes])
    short = result.short_of_shots()
    for s, n in short.items():
        print(f"warning: {s}: {n} of the {args.few_shot} few-shot examples asked for "
              f"({'its --shots file has fewer' if pool is not None else 'the subject has too few other questions'})",
              file=sys.stderr)
    metrics = {"items": result.total, "accuracy": result.accuracy, "acc_norm": result.acc_norm,
               "acc_bytes": result.acc_bytes, "macro_accuracy": result.macro_accuracy, "mode": result.mode,
               "few_shot": args.few_shot, "subjects_short_of_shots": len(short), "bos": args.bos}
    out = {"metrics": metrics, "subjects": subjects, "samples": result.samples}
    shots = f"{args.few_shot}-shot" + (f", {len(short)} subjects with fewer" if short else "") + \
        ("" if args.bos else ", no BOS")
    return out, format_table(["subject", "n", "shots", "accuracy", "acc_norm", "acc_bytes"], rows), \
        f"accuracy {result.accuracy:.4f} (acc_norm {result.acc_norm:.4f}, acc_bytes {result.acc_bytes:.4f}, " \
        f"{result.mode}, {shots})"


def run_gsm8k(model, tokenizer, args: argparse.Namespace) -> tuple[dict, str, str]:
    from minimind.eval.exact_match import evaluate_exact, read_qa

    if not args.data:
        raise MiniMindError("--task gsm8k needs --data (a JSONL file of {\"question\", \"answer\"})")
    rows = read_qa(args.data)[:args.limit or None]
    result = evaluate_exact(model, tokenizer, rows, enable_thinking=bool(args.think), few_shot=args.few_shot,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=args.progress)
    metrics = {"questions": result.total, "correct": result.correct, "accuracy": result.accuracy,
               "no_answer": result.no_answer, "think": bool(args.think), "few_shot": args.few_shot}
    table = format_table(["metric", "value"], [[k, v] for k, v in metrics.items()])
    return {"metrics": metrics, "samples": result.samples}, table, \
        f"exact match {result.accuracy:.4f} ({result.correct}/{result.total}, thinking {'on' if args.think else 'off'})"


def read_task_rows(path: str | Path) -> list[dict]:
    from minimind.data.formats import decode_line, read_lines

    rows = []
    for line, raw in read_lines(path):
        try:
            row = decode_line(raw)
        except ValueError as e:
            raise MiniMindError(f"{path}:{line}: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list) or "answer" not in row:
            raise MiniMindError(f"{path}:{line}: expected a task row with 'conversations' and 'answer'")
        if not any(isinstance(m, dict) and m.get("role") == "user" for m in row["conversations"]):
            raise MiniMindError(f"{path}:{line}: the conversation has no user turn")
        rows.append({**row, "task": row.get("task", "task")})
    return rows


def run_probes(model, tokenizer, args: argparse.Namespace) -> tuple[dict, str, str]:
    from minimind.data.tasks import make_tasks
    from minimind.eval.probes import probe_accuracy

    if args.data:
        rows = read_task_rows(args.data)[:args.limit or None]
    else:  # a fresh held-out set: problems the built-in training data never contains
        rows = make_tasks(args.limit or 200, seed=args.seed, split="heldout")
    try:
        result = probe_accuracy(model, tokenizer, rows, enable_thinking=args.think,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=args.progress)
    except ValueError as e:  # a prompt + max_new_tokens beyond the model's context
        raise MiniMindError(f"probes: {e}") from None
    families = result.family_accuracy()
    table_rows = [[f, result.by_family[f][1], families[f]] for f in families]
    table_rows.append(["overall", result.total, result.accuracy])
    metrics = {"tasks": result.total, "correct": result.correct, "accuracy": result.accuracy}
    out = {"metrics": metrics, "families": families, "samples": result.samples}
    return out, format_table(["family", "n", "accuracy"], table_rows), \
        f"probe accuracy {result.accuracy:.4f} ({result.correct}/{result.total})"


RUNNERS = {"ppl": run_ppl, "mc": run_mc, "gsm8k": run_gsm8k, "probes": run_probes}


def run_directory(model_dir: str | Path) -> Path | None:
    """The run directory a model directory sits in (runs/<name>/model), or None."""
    parent = Path(model_dir).resolve().parent
    markers = ("report.md", "config.toml", "metrics.jsonl")
    return parent if any((parent / m).is_file() for m in markers) else None


def cmd_eval(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise MiniMindError("--limit must be at least 1")
    if args.few_shot < 0:
        raise MiniMindError("--few-shot must be >= 0")
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    model, tokenizer = load_model_from(args)
    check_chat(args, tokenizer)
    start = time.perf_counter()
    out, table, summary = RUNNERS[args.task](model, tokenizer, args)
    seconds = time.perf_counter() - start
    record = {"task": args.task, "model": str(args.model), "lora": args.lora, "quantize": args.quantize,
              "data": args.data, "limit": args.limit,
              "seconds": round(seconds, 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **out}
    print(table)
    print(f"{args.task}: {summary} in {seconds:.1f} s")
    run = run_directory(args.model)
    path = Path(args.out) if args.out else (run / f"eval_{args.task}.json" if run else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    if run is not None:
        data = Path(args.data).name if args.data else "generated held-out tasks"
        with (run / "report.md").open("a", encoding="utf-8") as fh:
            fh.write(f"- eval {args.task} on {data} ({record['time']}): {summary}\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, multiple choice, GSM8K-style, probes",
                       description="ppl: perplexity and bits per byte of a .txt / JSONL {\"text\"} file. mc: "
                       "MMLU / C-Eval / CMMLU / ARC as .csv, .jsonl or the hub's .parquet (a file, a directory or a "
                       "glob; one subject per file or folder), scored by option log-likelihood or by the answer "
                       "letter; reports lm-eval's acc, acc_norm (per character) and acc_bytes. gsm8k: exact match of "
                       "generated answers to JSONL {\"question\", \"answer\"} rows. probes: the built-in held-out "
                       "tasks (generated afresh when --data is absent). Prints a table, writes JSON (--out, or "
                       "eval_TASK.json in the run directory) and adds a line to the run's report.md.")
    add_model_flags(p)
    p.add_argument("--task", required=True, choices=TASKS, help="which evaluation")
    p.add_argument("--data", default=None, help="data file, directory or (mc) glob pattern (optional for probes)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N items (quick runs)")
    p.add_argument("--out", default=None, help="results JSON (default: eval_TASK.json in the run directory)")
    p.add_argument("--few-shot", type=int, default=0, help="mc/gsm8k: examples before each question")
    p.add_argument("--shots", default=None, help="mc: take few-shot examples from this file/dir (e.g. C-Eval dev) "
                   "instead of other questions of the same subject")
    p.add_argument("--mode", default="loglik", choices=["loglik", "letter"],
                   help="mc: score each option's text (loglik) or the letter after the listed options (letter)")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="gsm8k/probes: let the model think first (default: off for gsm8k; probes think on the "
                   "task families trained with worked steps)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k/probes: generation length limit")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                   help="mc: start each context with <|im_start|> as in pretraining (default); --no-bos gives "
                   "lm-eval's default prompt for this tokenizer")
    p.add_argument("--seq-len", type=int, default=512, help="ppl: window length (capped at the model's context)")
    p.add_argument("--stride", type=int, default=None,
                   help="ppl: tokens each later window of a long text scores, the rest of the window being context "
                   "(default: half the window; --stride equal to --seq-len is lm-eval's loglikelihood_rolling)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="probes: seed of the generated held-out tasks")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_eval)
