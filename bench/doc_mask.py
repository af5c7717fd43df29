"""Document masking in packed pretraining: the demo's pretraining (`tiny`, built-in data) with and without
`doc_mask`, on the same data, seeds and steps (the two runs of a seed one after the other), scored on the
validation documents both alone (masked) and packed; then the speed of the two as a ratio, their training steps
interleaved one by one in one process. `python bench/doc_mask.py [--steps 300] [--seeds 3] [--work DIR]`"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from minimind.checkpoint import load_model
from minimind.data.builtin import write_builtin
from minimind.device import pick_dtype
from minimind.recipes.demo import FULL
from minimind.tokenizer import load_tokenizer, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.loop import Dist, evaluate, make_optimizers, train, train_step
from minimind.train.pretrain import PretrainStage


def demo_data(work: Path) -> tuple[dict[str, Path], Path]:
    """The demo's built-in files and its 6,400-token tokenizer (made once per work directory)."""
    files = {name: work / "data" / f"{name}.jsonl" for name in ("pretrain", "pretrain_val", "sft")}
    if not all(f.is_file() for f in files.values()):
        files = write_builtin(work / "data", seed=0, **FULL["data"])
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer([files["pretrain"], files["sft"]], vocab_size=FULL["vocab"], out_dir=tok_dir, progress=False)
    return files, tok_dir


def settings(files: dict[str, Path], tok_dir: Path, out: Path, seed: int, args: argparse.Namespace,
             doc_mask: bool) -> TrainConfig:
    # The demo's pretraining settings (minimind/recipes/demo.py), with a fixed number of steps instead of a budget.
    # Validation is scored afterwards, both ways (val_losses), so the run itself skips it.
    return TrainConfig(stage="pretrain", out=str(out), data=str(files["pretrain"]), preset="tiny",
                       tokenizer=str(tok_dir), steps=args.steps, lr=2e-3, warmup_steps=args.warmup,
                       seq_len=FULL["seq_len"], batch_size=args.batch_size, workers=1, progress=False, log_every=10,
                       keep_last=1, seed=seed, doc_mask=doc_mask, eval_batches=args.val_batches)


def val_losses(model_dir: Path, cfg: TrainConfig, val_data: Path) -> dict[str, float]:
    """Validation loss (fp32) over the first val_batches batches of validation rows, with each document alone
    and with the rows packed."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    out = {}
    for name, mask in (("alone", True), ("packed", False)):
        stage = PretrainStage(dataclasses.replace(cfg, doc_mask=mask), tokenizer)
        data = stage.dataset(str(val_data))
        with torch.no_grad():
            out[name] = evaluate(model, stage, data, cfg.eval_batches, 0, cfg, torch.device("cpu"), nullcontext(),
                                 Dist())[0]
    return out


def speed_ratio(model_dir: Path, cfg: TrainConfig, steps: int) -> float:
    """Median step time with doc_mask over without, the two stepping in turn on the same batches (in the dtype
    training picks), after two warm-up steps each."""
    dtype = pick_dtype(cfg.dtype, torch.device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    data = PretrainStage(cfg, tokenizer).dataset(cfg.data)
    times: dict[bool, list[float]] = {False: [], True: []}
    sides = {}
    for mask in (False, True):
        model = load_model(model_dir).train()
        opt = make_optimizers(model, cfg, torch.device("cpu"))
        sides[mask] = (model, opt, PretrainStage(dataclasses.replace(cfg, doc_mask=mask), tokenizer))
    for step in range(steps + 2):
        rows = [data[(step * cfg.batch_size + i) % len(data)] for i in range(cfg.batch_size)]
        for mask in (False, True) if step % 2 else (True, False):
            model, opt, stage = sides[mask]
            batch = stage.collate(rows)
            t0 = time.perf_counter()
            train_step(model, model, stage, [batch], opt, 1.0, torch.device("cpu"),
                       torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext(), None, Dist())
            if step >= 2:
                times[mask].append(time.perf_counter() - t0)
    return statistics.median(times[True]) / statistics.median(times[False])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds (each trains once without and once with doc_mask)")
    ap.add_argument("--batch-size", type=int, default=FULL["batch"], help="rows of 256 tokens per step")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps (the demo's: 20)")
    ap.add_argument("--val-batches", type=int, default=15, help="validation batches scored (15 x 16: all 240 rows)")
    ap.add_argument("--speed-steps", type=int, default=20, help="interleaved steps of each side for the speed ratio")
    ap.add_argument("--work", default="", help="directory for data, tokenizer and runs (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="doc_mask-"))
    files, tok_dir = demo_data(work)
    results: dict[bool, list[dict]] = {False: [], True: []}
    for seed in range(args.seeds):
        for mask in (False, True) if seed % 2 == 0 else (True, False):
            run = work / "runs" / f"seed{seed}-{'mask' if mask else 'plain'}"
            cfg = settings(files, tok_dir, run, seed, args, mask)
            t0 = time.perf_counter()
            train(cfg, PretrainStage)
            seconds = time.perf_counter() - t0
            tps = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if "tokens_per_s" in r]
            row = {"seed": seed, "doc_mask": mask, **val_losses(run / "model", cfg, files["pretrain_val"]),
                   "seconds": round(seconds, 1), "tokens_per_s": statistics.median(tps)}
            results[mask].append(row)
            print(json.dumps(row), flush=True)
    ratio = speed_ratio(work / "runs" / "seed0-plain" / "model", settings(files, tok_dir, work, 0, args, False),
                        args.speed_steps)

    print(f"\n{args.seeds} seeds x {args.steps} steps of {args.batch_size} x {FULL['seq_len']} tokens (warm-up "
          f"{args.warmup}), tiny preset, demo data ({work}); validation: {args.val_batches * args.batch_size} rows\n")
    print("| doc_mask | val loss, documents alone: median (range) | val loss, packed rows: median (range) | "
          "training tokens/s (median of runs) |")
    print("|---|---|---|---|")
    for mask in (False, True):
        rows = results[mask]
        cells = []
        for key in ("alone", "packed"):
            values = [r[key] for r in rows]
            cells.append(f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        print(f"| {'on' if mask else 'off'} | {cells[0]} | {cells[1]} | "
              f"{statistics.median(r['tokens_per_s'] for r in rows):,.0f} |")
    wins = sum(m["alone"] < p["alone"] for m, p in zip(results[True], results[False]))
    print(f"\nseeds where doc_mask has the lower val loss (documents alone): {wins}/{args.seeds}")
    print(f"step time with doc_mask / without (interleaved, {args.speed_steps} steps each): {ratio:.3f}")


if __name__ == "__main__":
    main()
