"""THE training loop, shared by every stage: a stage supplies its data, batches and loss; this file does the
rest (devices, precision, DDP, accumulation, schedule, logging, evaluation, checkpoints, exact resume).
`minimind train pretrain --config configs/tiny_pretrain.toml`, or under `torchrun --nproc_per_node N -m minimind`."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minimind import MiniMindError
from minimind.checkpoint import atomic_path, latest_resume, load_model, load_resume, save_model, save_resume
from minimind.config import ModelConfig
from minimind.device import pick_device, pick_dtype
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig, to_toml

Batch = dict[str, torch.Tensor]


class Stage(Protocol):
    """What a stage file supplies. `loss` returns (sum of per-unit losses, number of units, extra metrics):
    the loop divides by the unit count of the whole global batch (`count`, target tokens by default; a DPO
    stage counts pairs), so the gradient is the same whatever the split over micro-batches and processes.

    Optional hooks, looked up with getattr so simple stages stay simple:
      setup(model, device)         after the model is on its device, before the optimizer is built: freeze
                                   or wrap layers (LoRA), load a reference or teacher model
      count(batch) -> int          the units `loss` averages over (default: labels != -100 after shifting)
      prepare(model, micro)        turn each step's micro-batches into training batches (RL rollouts)
      save(model, out, tokenizer)  write the stage's output directory (default: a full model directory)
    """

    def dataset(self, path: str) -> Any: ...
    def collate(self, rows: list) -> Batch: ...
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]: ...


def target_tokens(batch: Batch) -> int:
    """The default unit count: positions with a next-token label."""
    return int((batch["labels"][:, 1:] != -100).sum())


# ---- machine ------------------------------------------------------------------------------------------


class Dist:
    """Process-group facts; a single process is world 1, rank 0."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            # The step's token counts and the run length travel as small CPU tensors: gloo carries those, nccl
            # the gradients.
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float | torch.Tensor) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def first(self, value: int) -> int:
        """Rank 0's value on every rank: a decision taken from a clock (each process reads its own) must agree
        across ranks, or one would stop stepping while the others wait for it in an all-reduce."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, 0)
        return int(t)

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate MFU is measured against: a short probe of this machine (GPUs included, so the
    figure is honest for whatever card this is)."""
    n = 2048 if device.type != "cpu" else 1024
    # Its own generator: the global RNG stream must not move, or a resumed run would drift (dropout).
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (active, non-embedding-lookup) parameters + attention scores."""
    params = cfg.num_parameters(active=True)
    if not cfg.tie_word_embeddings:
        params -= cfg.vocab_size * cfg.hidden_size  # the input lookup does no multiply
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * params + attention


# ---- schedule and data order -----------------------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    warmup = cfg.warmup_steps or max(1, int(0.02 * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


GROUP_STEPS = 32  # length grouping sorts within windows of this many steps: order stays random across them
_order_cache: dict[tuple, torch.Tensor] = {}


def epoch_order(n_rows: int, epoch: int, seed: int, lengths: np.ndarray | None = None,
                step_rows: int = 0) -> torch.Tensor:
    """One epoch's seeded shuffle of the rows. Given row lengths, rows of similar length are grouped into the
    same step (sorted within windows of GROUP_STEPS steps, then the steps shuffled), so a padded batch wastes
    little on padding, as transformers' group_by_length does."""
    key = (n_rows, epoch, seed, id(lengths), step_rows)
    if key not in _order_cache:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(n_rows, generator=g)
        if lengths is not None and step_rows > 0:
            window = step_rows * GROUP_STEPS
            pieces = []
            for lo in range(0, n_rows, window):
                chunk = order[lo:lo + window]
                chunk = chunk[torch.from_numpy(np.argsort(np.asarray(lengths)[chunk.numpy()], kind="stable"))]
                steps = list(chunk.split(step_rows))
                pieces += [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
            order = torch.cat(pieces)
        _order_cache.clear()  # the loop walks epochs in order: one cached epoch is enough
        _order_cache[key] = order
    return _order_cache[key]


def global_rows(n_rows: int, start: int, count: int, seed: int, lengths: np.ndarray | None = None) -> list[int]:
    """Rows `start .. start+count` of the endless sequence of epochs, each epoch its own seeded shuffle
    (grouped by length when `lengths` is given, with `count` rows per step). The position is counted in rows,
    so a run resumes at the same row with any number of processes."""
    out: list[int] = []
    step_rows = count
    while count > 0:
        epoch, offset = divmod(start, n_rows)
        take = epoch_order(n_rows, epoch, seed, lengths, step_rows)[offset:offset + count].tolist()
        out += take
        start += len(take)
        count -= len(take)
    return out


# ---- one optimizer step ------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel; weight decay on matrices only (not norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


def train_step(net: torch.nn.Module, model: torch.nn.Module, stage: Stage, micro: list[Batch],
               optimizer: torch.optim.Optimizer, grad_clip: float, device: torch.device, autocast,
               scaler: torch.amp.GradScaler | None, d: Dist) -> tuple[float, float, dict[str, float]]:
    """Forward and backward over the micro-batches, clip, step. Returns (mean loss per target token over
    the global batch, gradient norm before clipping, stage extras averaged over micro-batches)."""
    accum = len(micro)
    count = getattr(stage, "count", target_tokens)
    n_tokens = d.sum(sum(count(b) for b in micro))
    loss_sum = 0.0
    extras: dict[str, float] = {}
    for m, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # Only the last micro-batch all-reduces gradients; the others accumulate locally.
        ctx = net.no_sync() if (d.world > 1 and m < accum - 1) else nullcontext()
        with ctx:
            with autocast:
                total_loss, _, extra = stage.loss(net, batch)
            # DDP averages gradients over processes; scale by world so the result is sum / global tokens.
            loss = total_loss * (d.world / max(n_tokens, 1))
            for key, value in extra.items():
                if key == "aux_loss":
                    loss = loss + value / accum
                extras[key] = extras.get(key, 0.0) + float(value) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += float(total_loss.detach())
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return d.sum(loss_sum) / max(n_tokens, 1), grad_norm, extras


# ---- the loop ----------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig):
    if cfg.init_from:
        model = load_model(cfg.init_from)
        model.config.dropout = cfg.dropout
        tokenizer = load_tokenizer(cfg.init_from)
    else:
        if not cfg.tokenizer:
            raise MiniMindError("set init_from (a model directory) or tokenizer (a tokenizer directory)")
        tokenizer = load_tokenizer(cfg.tokenizer)
        model = MiniMindForCausalLM(ModelConfig.preset(cfg.preset, vocab_size=len(tokenizer), dropout=cfg.dropout))
    return model, tokenizer


def train(cfg: TrainConfig, stage_factory) -> Path:
    """Run a stage; returns the model directory it wrote (runs/<name>/model)."""
    d = Dist()
    device = pick_device(cfg.device, d.local_rank)
    d.start(device)
    try:
        return _train(cfg, stage_factory, d, device)
    finally:
        d.stop()


def _train(cfg: TrainConfig, stage_factory, d: Dist, device: torch.device) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.data:
        raise MiniMindError("no training data: set data = \"file.jsonl\" in the config or pass --data FILE")
    run = cfg.run_dir
    say = Printer(d.main)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same initial weights in every process
    model, tokenizer = build_model(cfg)
    model.to(device)
    stage = stage_factory(cfg, tokenizer)
    if hasattr(stage, "setup"):
        stage.setup(model, device)

    # Rank 0 tokenizes; the others wait, then open the same cache.
    if d.main:
        data = stage.dataset(cfg.data)
    d.barrier()
    if not d.main:
        data = stage.dataset(cfg.data)
    val = stage.dataset(cfg.val_data) if cfg.val_data else None
    if len(data) == 0:
        raise MiniMindError(f"{cfg.data}: no training rows after packing (seq_len {cfg.seq_len})")
    stats = data.stats
    say(f"data: {cfg.data}: {len(data):,} rows of up to {cfg.seq_len} tokens ({stats.tokens:,} tokens)"
        + (f"; {stats.truncated:,} rows truncated to seq_len" if stats.truncated else "")
        + (f"; skipped {stats.skipped_bad:,} bad lines" if stats.skipped_bad else ""))

    per_micro = cfg.batch_size * cfg.seq_len * d.world
    accum = max(1, round(cfg.global_batch_tokens / per_micro)) if cfg.global_batch_tokens else 1
    rows_per_step = cfg.batch_size * accum * d.world
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(data) / rows_per_step))
    dtype = pick_dtype(cfg.dtype, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    optimizer = make_optimizer(model, cfg, device)
    lengths = data.lengths() if cfg.group_by_length and hasattr(data, "lengths") else None
    if lengths is not None and lengths.min() == lengths.max():
        lengths = None  # packed pretraining rows are all full: nothing to group

    step, samples = 0, 0
    checkpoints = run / "checkpoints"
    if cfg.resume:
        target = latest_resume(checkpoints)
        if target is None:
            raise MiniMindError(f"{checkpoints}: no checkpoint to resume from")
        trainer, state = load_resume(target, model)
        optimizer.load_state_dict(trainer["optimizer"])
        if scaler is not None and "scaler" in trainer:
            scaler.load_state_dict(trainer["scaler"])
        if state["world_size"] == d.world:  # RNG streams (dropout) continue exactly only on the same layout
            torch.set_rng_state(trainer["rng"]["torch"])
            if device.type == "cuda" and "cuda" in trainer["rng"]:
                torch.cuda.set_rng_state(trainer["rng"]["cuda"], device)
        step, samples = state["step"], state["samples"]
        if cfg.time_budget:
            total = state.get("total", total)  # a time-budgeted run keeps the length it settled on
        say(f"resumed from {target} (step {step}, {samples:,} rows seen, {state['world_size']} process(es) then, "
            f"{d.world} now)")
    elif d.main:
        if (run / "model").exists() or latest_resume(checkpoints) is not None:
            say(f"note: {run} already holds a run; starting afresh (use --resume to continue it)")

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(model)
    if d.world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=model.config.use_moe)

    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.toml").write_text(to_toml(cfg))
        if not cfg.resume:
            (run / "metrics.jsonl").unlink(missing_ok=True)
    loggers = Loggers(cfg, run) if d.main else None
    n_params = model.num_parameters()
    say(f"model: {model.config.name} {n_params:,} parameters | {device} {str(dtype).removeprefix('torch.')} | "
        f"{d.world} process(es) x {cfg.batch_size} rows x {accum} accumulation = {rows_per_step} rows/step | "
        f"{total} steps")
    fpt = flops_per_token(model.config, cfg.seq_len)
    peak = peak_flops(device, dtype) * d.world if d.main else 1.0

    model.train()
    bar = progress_bar(total, step, d.main, cfg.progress)
    t_last, tokens_since, start_step = time.perf_counter(), 0, step
    t_start, step_ends, planned = t_last, [], total
    while step < total:
        if cfg.time_budget and not cfg.resume and len(step_ends) >= 4 and step % 5 == 0:
            # Fit the run to its time budget from the recent pace (this machine's speed drifts); the cosine
            # schedule then decays over the steps that remain. The window is long because length-grouped
            # steps differ several-fold in cost, and a short one makes the planned length (and so the
            # learning rate) jump about. The first step (warm-up, compilation) is left out.
            recent = step_ends[max(1, len(step_ends) - 101):]
            per_step = (recent[-1] - recent[0]) / (len(recent) - 1)
            left = cfg.time_budget - (time.perf_counter() - t_start)
            total = d.first(max(step + 1, min(planned, step + int(left / per_step))))
            bar.set_total(total)
        lr = learning_rate(cfg, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = global_rows(len(data), samples, rows_per_step, cfg.seed, lengths)
        micro = []
        for m in range(accum):
            lo = (m * d.world + d.rank) * cfg.batch_size
            micro.append(stage.collate([data[i] for i in rows[lo:lo + cfg.batch_size]]))
        if hasattr(stage, "prepare"):
            micro = stage.prepare(model, micro)
        train_loss, grad_norm, extras = train_step(net, model, stage, micro, optimizer, cfg.grad_clip, device,
                                                   autocast, scaler, d)
        step += 1
        samples += rows_per_step
        step_ends.append(time.perf_counter())
        tokens_since += sum(b["input_ids"].numel() for b in micro) * d.world  # SFT rows are padded per batch
        bar.update(1)

        last = step == total
        if step % cfg.log_every == 0 or last or step == start_step + 1:
            sync(device)
            now = time.perf_counter()
            tps = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            record = {"step": step, "loss": round(train_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
                      "tokens_per_s": round(tps, 1), "mfu": round(tps * fpt / peak, 4),
                      **{k: round(v, 6) for k, v in extras.items()}}
            eta = (total - step) * (now - t_start) / max(step - start_step, 1)
            bar.write(f"step {step}/{total} | loss {train_loss:.4f} | lr {lr:.2e} | grad {grad_norm:.2f} | "
                      f"{tps:,.0f} tok/s | MFU {100 * record['mfu']:.1f}% | ETA {format_seconds(eta)}")
            if loggers:
                loggers.log(record)
        if val is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            val_loss = evaluate(net, stage, val, cfg, device, autocast, d)
            bar.write(f"step {step}/{total} | validation loss {val_loss:.4f}")
            if loggers:
                loggers.log({"step": step, "val_loss": round(val_loss, 6)})
            model.train()
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            if d.main:
                trainer = {"optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
                if device.type == "cuda":
                    trainer["rng"]["cuda"] = torch.cuda.get_rng_state(device)
                if scaler:
                    trainer["scaler"] = scaler.state_dict()
                save_resume(checkpoints, step, model, trainer,
                            {"samples": samples, "total": total, "world_size": d.world, "stage": cfg.stage},
                            cfg.keep_last)
            d.barrier()
    bar.close()
    out = run / getattr(stage, "output", "model")  # a LoRA stage writes an adapter directory instead
    if d.main:
        getattr(stage, "save", save_model)(model, out, tokenizer)
        if loggers:
            loggers.close()
        plot_losses(run / "metrics.jsonl", run / "loss.png")
        say(f"saved {out}")
    d.barrier()
    return out


@torch.no_grad()
def evaluate(net, stage, data, cfg: TrainConfig, device, autocast, d: Dist) -> float:
    """Mean loss per token over the first eval_batches x batch_size rows (the same rows every time)."""
    net.eval()
    n = min(len(data), cfg.eval_batches * cfg.batch_size)
    total, count = 0.0, 0
    for lo in range(d.rank * cfg.batch_size, n, cfg.batch_size * d.world):
        batch = stage.collate([data[i] for i in range(lo, min(lo + cfg.batch_size, n))])
        with autocast:
            loss, tokens, _ = stage.loss(net, {k: v.to(device) for k, v in batch.items()})
        total += float(loss)
        count += tokens
    return d.sum(total) / max(d.sum(count), 1)


# ---- output ------------------------------------------------------------------------------------------


class Printer:
    def __init__(self, main: bool) -> None:
        self.main = main

    def __call__(self, text: str) -> None:
        if self.main:
            print(text, flush=True)


class progress_bar:  # noqa: N801 - used like tqdm
    """A tqdm bar on an interactive terminal (when asked for); log lines go above it, or plainly to stdout."""

    def __init__(self, total: int, initial: int, main: bool, bar: bool) -> None:
        self.bar = None
        if main and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
        self.enabled = main

    def update(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def set_total(self, total: int) -> None:
        if self.bar:
            self.bar.total = total
            self.bar.refresh()

    def write(self, text: str) -> None:
        if self.bar:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Loggers:
    """metrics.jsonl always; TensorBoard, Weights & Biases and SwanLab when asked for and installed."""

    def __init__(self, cfg: TrainConfig, run: Path) -> None:
        self.path = run / "metrics.jsonl"
        self.sinks: list[Any] = []
        for name in cfg.loggers:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    writer = SummaryWriter(str(run / "tensorboard"))
                    self.sinks.append(lambda r, w=writer: [w.add_scalar(k, v, r["step"]) for k, v in r.items()
                                                           if k != "step"])
                elif name in ("wandb", "swanlab"):
                    lib = __import__(name)
                    lib.init(project="minimind", name=run.name, config=vars(cfg))
                    self.sinks.append(lambda r, lib=lib: lib.log(r, step=r["step"]))
                else:
                    raise MiniMindError(f"unknown logger {name!r} (tensorboard, wandb, swanlab)")
            except ImportError:
                print(f"note: logger {name!r} is not installed; logging to metrics.jsonl only", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        self.sinks.clear()


def plot_losses(metrics: Path, out: Path) -> None:
    if not metrics.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
