"""Training speed: our training step against a plain transformers step (Qwen3ForCausalLM / LlamaForCausalLM) on
the same weights and data, interleaved step by step in one run, as a ratio; MFU against the matmul rate
measured in the same run; peak memory of each side in its own process. `python bench/train.py [--quick]`"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM

from minimind.checkpoint import load_model, save_model
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.train.config import TrainConfig
from minimind.train.loop import Dist, batch_flops, make_optimizers, peak_flops, train_step
from minimind.train.pretrain import token_loss


class RawStage:
    """Batches are given directly; the loss is the pretraining loss."""

    loss = staticmethod(token_loss)


def contenders(directory: str, dtype: torch.dtype, compile_ours: bool, only: str | None = None):
    """Training-step functions for each side (or only one), built from the same model directory."""
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else nullcontext
    sides = {}
    if only != "transformers":
        ours = load_model(directory).train()
        net = torch.compile(ours) if compile_ours else ours
        opt = make_optimizers(ours, TrainConfig(lr=1e-4, weight_decay=0.1), torch.device("cpu"))

        def ours_step(batch):
            return train_step(net, ours, RawStage, [batch], opt, 1.0, torch.device("cpu"), autocast(), None,
                              Dist())[0]

        sides["ours"] = ours_step
    if only != "ours":
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))

        def hf_step(batch):
            with autocast():
                loss = hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        sides["transformers"] = hf_step
    return sides


def bench(preset: str, batch: int, seq: int, steps: int, dtype: torch.dtype, compile_ours: bool,
          prompt_share: float = 0.0) -> None:
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    data = [torch.randint(3, cfg.vocab_size, (batch, seq)) for _ in range(steps + 1)]
    targets = []
    for ids in data:  # an SFT batch: the first prompt_share of each row is prompt, with no loss
        labels = ids.clone()
        labels[:, :int(seq * prompt_share)] = -100
        targets.append(labels)
    with tempfile.TemporaryDirectory() as d:
        save_model(MiniMindForCausalLM(cfg), d)
        sides = contenders(d, dtype, compile_ours)
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for i, (ids, labels) in enumerate(zip(data, targets)):  # step 0 warms up (and compiles) and is not timed
        for name, step in sides.items():
            start = time.perf_counter()
            loss = step({"input_ids": ids, "labels": labels})
            if i:
                times[name].append(time.perf_counter() - start)
            losses[name].append(loss)
    tokens = batch * seq
    peak = peak_flops(torch.device("cpu"), dtype)
    fpt = batch_flops(cfg, [seq], seq) / seq  # per token of a full row, head everywhere (both sides alike)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    label = str(dtype).removeprefix("torch.") + (" + compile" if compile_ours else "") + \
        (f" SFT {prompt_share:.0%} prompt" if prompt_share else "")
    print(f"  {label:18s} ours {tps['ours']:7.0f} tok/s (MFU {tps['ours'] * fpt / peak:.2f}) | transformers "
          f"{tps['transformers']:7.0f} tok/s (MFU {tps['transformers'] * fpt / peak:.2f}) | ratio "
          f"{tps['ours'] / tps['transformers']:.2f}x | loss after {steps + 1} steps: ours {losses['ours'][-1]:.4f}, "
          f"transformers {losses['transformers'][-1]:.4f} | matmul peak {peak / 1e9:.0f} GFLOP/s")


def peak_memory(preset: str, side: str, batch: int, seq: int, dtype: str) -> float:
    """Max RSS (GiB) of a fresh process that builds one side and runs two steps."""
    out = subprocess.run([sys.executable, __file__, "--child", preset, side, str(batch), str(seq), dtype],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_gib"]


def child(preset: str, side: str, batch: int, seq: int, dtype: str) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        save_model(MiniMindForCausalLM(ModelConfig.preset(preset)), d)
        step = contenders(d, getattr(torch, dtype), False, only=side)[side]
    before = _peak_rss()
    ids = torch.randint(3, 6400, (batch, seq))
    for _ in range(2):
        step({"input_ids": ids, "labels": ids})
    print(json.dumps({"maxrss_gib": _peak_rss() / 2**20, "before_gib": before / 2**20}))


def _peak_rss() -> int:
    """This process's peak resident memory in KiB. On Linux VmHWM, because ru_maxrss survives fork + exec and
    so starts at the parent's size: it reported the bench process itself for both sides."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        preset, side, batch, seq, dtype = sys.argv[2:7]
        child(preset, side, int(batch), int(seq), dtype)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["minimind2-small", "minimind-3"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 comparison")
    parser.add_argument("--sft", type=float, default=0.5, metavar="SHARE",
                        help="also time SFT batches whose first SHARE of each row is prompt, without loss "
                             "(0: skip; MFU counts the output head at every position)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.seq}")
    for preset in args.presets:
        print(f"\n{preset}")
        bench(preset, args.batch, args.seq, args.steps, torch.bfloat16, False)
        if args.compile:
            bench(preset, args.batch, args.seq, args.steps, torch.bfloat16, True)
        if args.sft:
            bench(preset, args.batch, args.seq, args.steps, torch.bfloat16, False, args.sft)
        if not args.no_fp32:
            bench(preset, args.batch, args.seq, args.steps, torch.float32, False)
        mem = {side: peak_memory(preset, side, args.batch, args.seq, "bfloat16") for side in ("ours", "transformers")}
        print(f"  peak memory (bf16, max RSS of a fresh process): ours {mem['ours']:.2f} GiB | "
              f"transformers {mem['transformers']:.2f} GiB")


if __name__ == "__main__":
    main()
