"""AdamW against Muon in pretraining: the demo's built-in data, `tiny` and `minimind2-small`, several seeds; a seed
gives both optimizers the same initial weights and the same batches. Validation loss on the same held-out rows at
evenly spaced points, against tokens seen. Prints a Markdown table and draws one plot (median over seeds, min-max band).
`python bench/optim.py [--tiny-steps 300] [--small-steps 120] [--seeds 3] [--jobs 1] [--plot FILE] [--work DIR]`"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from minimind.train.config import TrainConfig, load_config
from minimind.train.loop import train
from minimind.train.pretrain import PretrainStage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_mask import demo_data  # noqa: E402 - bench/doc_mask.py: the demo's data and tokenizer

ROOT = Path(__file__).resolve().parent.parent
# Each preset with the AdamW settings it is trained with: tiny as the demo pretrains it (minimind/recipes/demo.py,
# lr 2e-3, the loop's defaults otherwise), minimind2-small as configs/ does (lr 5e-4, weight decay 0.01, beta2
# 0.999). Muon takes the same lr: its update is scaled to AdamW's RMS (adjust_lr_fn="match_rms_adamw").
PRESETS = {"tiny": (None, dict(lr=2e-3)),
           "minimind2-small": (ROOT / "configs" / "minimind2-small_pretrain.toml", {})}
OPTIMIZERS = ("adamw", "muon")


def settings(preset: str, optimizer: str, steps: int, seed: int, files: dict[str, Path], tok_dir: Path, out: Path,
             args: argparse.Namespace) -> TrainConfig:
    # The preset's optimisation settings, at the bench's batch, length and step count; a full validation every
    # steps / evals steps on the first val_batches x batch_size rows of the held-out file.
    path, extra = PRESETS[preset]
    return load_config(path, **extra, preset=preset, out=str(out), data=str(files["pretrain"]),
                       val_data=str(files["pretrain_val"]), tokenizer=str(tok_dir), optimizer=optimizer, steps=steps,
                       seq_len=args.seq_len, batch_size=args.batch_size, global_batch_tokens=0,
                       warmup_steps=min(args.warmup, steps // 6), eval_every=max(1, steps // args.evals),
                       eval_batches=args.val_batches, workers=1, progress=False, log_every=10, save_every=0,
                       keep_last=1, seed=seed, init_from="")


def run(cfg: TrainConfig) -> dict:
    """Train, and return the validation curve, the first step's training loss (the same initial weights and batch
    give the same figure under either optimizer) and the median seconds per training step."""
    t0 = time.perf_counter()
    train(cfg, PretrainStage)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = cfg.batch_size * cfg.seq_len
    out = {"lr": cfg.lr, "seconds": round(seconds, 1), "steps": [r["step"] for r in records if "val_loss" in r],
           "val_loss": [r["val_loss"] for r in records if "val_loss" in r],
           "first_loss": next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r),
           "s_per_step": tokens / statistics.median(r["tokens_per_s"] for r in records if r.get("tokens_per_s"))}
    shutil.rmtree(cfg.run_dir)  # a minimind2-small run leaves ~0.4 GB of weights and optimizer state
    return out


def reach(steps: list[int], curve: np.ndarray, target: float) -> float | None:
    """The step at which a (decreasing) curve first gets to target, linear between validation points."""
    for i, value in enumerate(curve):
        if value <= target:
            if i == 0:
                return float(steps[0])
            x0, x1, y0, y1 = steps[i - 1], steps[i], curve[i - 1], curve[i]
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def report(results: dict, args: argparse.Namespace) -> None:
    tokens = args.batch_size * args.seq_len
    seeds = ", ".join(f"{preset} {len(by_opt['adamw'])}" for preset, by_opt in results["runs"].items())
    same = all(a["first_loss"] == b["first_loss"] for by_opt in results["runs"].values()
               for a, b in zip(by_opt["adamw"], by_opt["muon"]))
    print(f"\nseeds: {seeds}; {args.batch_size} x {args.seq_len} tokens a step; warm-up {args.warmup} steps "
          f"(at most a sixth of a run); "
          f"validation on {args.val_batches * args.batch_size} held-out rows; load average at start/end "
          f"{results['load'][0]:.1f}/{results.get('load_end', [float('nan')])[0]:.1f} on {os.cpu_count()} cores, "
          f"{args.jobs} run(s) at a time; first step's training loss the same under both optimizers for each seed "
          f"(same weights, same batch): {'yes' if same else 'NO'}\n")
    print("| preset | optimizer | lr | steps (tokens) | final val loss: median (range) | seeds won | "
          "tokens for Muon to reach AdamW's final median | s/step (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, by_opt in results["runs"].items():
        if not by_opt["adamw"]:
            continue
        curves = {o: np.median([r["val_loss"] for r in by_opt[o]], axis=0) for o in OPTIMIZERS}
        steps = by_opt["adamw"][0]["steps"]
        finals = {o: [r["val_loss"][-1] for r in by_opt[o]] for o in OPTIMIZERS}
        at = reach(steps, curves["muon"], float(curves["adamw"][-1]))
        for o in OPTIMIZERS:
            other = "adamw" if o == "muon" else "muon"
            won = sum(a < b for a, b in zip(finals[o], finals[other]))
            reached = "" if o == "adamw" else (
                "not reached" if at is None else f"{at * tokens / 1e6:.2f}M ({at / steps[-1]:.0%})")
            print(f"| {preset} | {o} | {by_opt[o][0]['lr']:.0e} | {steps[-1]} ({steps[-1] * tokens / 1e6:.2f}M) | "
                  f"{statistics.median(finals[o]):.3f} ({min(finals[o]):.3f}-{max(finals[o]):.3f}) | "
                  f"{won}/{len(finals[o])} | {reached} | "
                  f"{statistics.median(r['s_per_step'] for r in by_opt[o]):.2f} |")


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = args.batch_size * args.seq_len
    presets = [p for p, by_opt in results["runs"].items() if by_opt["adamw"]]
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.6), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for o, color in zip(OPTIMIZERS, ("tab:blue", "tab:red")):
            runs = results["runs"][preset][o]
            x = np.array(runs[0]["steps"]) * tokens / 1e6
            y = np.array([r["val_loss"] for r in runs])
            ax.plot(x, np.median(y, axis=0), color=color, marker=".", label=f"{o} (median of {len(runs)})")
            ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=color, alpha=0.2, linewidth=0)
        ax.set(title=f"{preset} pretraining", xlabel="tokens seen (millions)", ylabel="validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"\nplot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny-steps", type=int, default=300, help="optimizer steps per tiny run (0: skip tiny)")
    ap.add_argument("--small-steps", type=int, default=120,
                    help="optimizer steps per minimind2-small run (0: skip minimind2-small)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds (each trains once with each optimizer)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (the demo's: 256)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps, at most a sixth of a run (the demo's: 20)")
    ap.add_argument("--evals", type=int, default=10, help="validation points per run")
    ap.add_argument("--val-batches", type=int, default=12, help="validation batches (x batch size held-out rows)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    ap.add_argument("--plot", default=str(ROOT / "bench" / "results" / "optim.png"), help="where the plot goes")
    ap.add_argument("--work", default="", help="directory for data, tokenizer and runs (default: a temp dir)")
    ap.add_argument("--from", dest="saved", default="", help="report and plot a saved results.json, no training")
    args = ap.parse_args()
    if args.saved:
        results = json.loads(Path(args.saved).read_text())
        vars(args).update(results["args"])
    else:
        results = measure(args)
    for by_opt in results["runs"].values():  # seeds both optimizers finished (a cut-short run may lack some)
        seeds = {r["seed"] for r in by_opt["adamw"]} & {r["seed"] for r in by_opt["muon"]}
        for o in OPTIMIZERS:
            by_opt[o] = sorted((r for r in by_opt[o] if r["seed"] in seeds), key=lambda r: r["seed"])
    report(results, args)
    plot(results, args, Path(args.plot))


def measure(args: argparse.Namespace) -> dict:
    """Every (preset, seed, optimizer) run, `jobs` at a time: a seed's two runs start side by side (so they
    share the machine's load alike), tiny's seeds first. The results so far go to WORK/results.json after each."""
    work = Path(args.work or tempfile.mkdtemp(prefix="optim-"))
    files, tok_dir = demo_data(work)
    steps = {"tiny": args.tiny_steps, "minimind2-small": args.small_steps}
    kept = ("tiny_steps", "small_steps", "seeds", "batch_size", "seq_len", "warmup", "evals", "val_batches", "jobs")
    results: dict = {"args": {k: vars(args)[k] for k in kept}, "load": os.getloadavg(),
                     "runs": {p: {o: [] for o in OPTIMIZERS} for p in steps if steps[p]}}
    jobs = [(preset, seed, optimizer) for preset in results["runs"] for seed in range(args.seeds)
            for optimizer in OPTIMIZERS]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run, settings(preset, optimizer, steps[preset], seed, files, tok_dir,
                                             work / "runs" / f"{preset}-seed{seed}-{optimizer}", args)):
                   (preset, seed, optimizer) for preset, seed, optimizer in jobs}
        for future in as_completed(futures):
            preset, seed, optimizer = futures[future]
            row = {"seed": seed, **future.result()}
            results["runs"][preset][optimizer].append(row)
            print(json.dumps({"preset": preset, "optimizer": optimizer, **row}), flush=True)
            results["load_end"] = os.getloadavg()
            (work / "results.json").write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
