"""THE training loop, shared by every stage: a stage (the contract: train/stage.py) supplies data, batches and loss;
this file does the rest (devices, precision, DDP, accumulation, schedule, logging, eval, checkpoints, exact resume).
`minimind train pretrain --config configs/tiny_pretrain.toml`, or under `torchrun --nproc_per_node N -m minimind`."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from minimind import MiniMindError
from minimind.checkpoint import LATEST, clean_debris, load_model, load_newest_resume, save_resume
from minimind.config import ModelConfig
from minimind.device import pick_device, pick_dtype
from minimind.files import atomic_path
from minimind.model import MiniMindForCausalLM, MoE
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig, to_toml
from minimind.train.muon import Muon, ns_dtype
from minimind.train.stage import Batch, Dist, Stage

# ---- machine ------------------------------------------------------------------------------------------


def peak_flops(device: torch.device, dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...] = ()) -> float:
    """The matmul rate MFU is measured against, probed once per run on this machine (GPUs included, so the
    figure is honest for whatever card this is): the best rate of a square matmul and of each (m, k, n) shape
    given (the model's own: a small model's head can outrun a square probe), each warmed up first and then
    timed for half a second at the training dtype. A short probe on a busy host reads low, and MFU then reads
    over 100%: log_step says "peak unknown" instead."""
    n = 2048 if device.type != "cpu" else 1024
    # Its own generator: the global RNG stream must not move, or a resumed run would drift (dropout).
    g = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for m, k, n_out in ((n, n, n), *shapes):
        a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
        b = torch.randn(k, n_out, device=device, dtype=dtype, generator=g)
        for seconds in (0.1, 0.5):  # warm-up (caches, clocks, kernel choice), then the timed part
            sync(device)
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                reps += 1
            sync(device)
            rate = 2 * m * k * n_out * reps / (time.perf_counter() - start)
        best = max(best, rate)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_flops(cfg: ModelConfig, lengths: list[int], head_positions: int, passes: int = 3) -> float:
    """Training FLOPs (`passes` x forward: 3 when the backward computes input and weight gradients, 2 for a
    frozen base under LoRA) the model does usefully on a batch: rows of `lengths`
    real tokens (padding is not counted: it is waste, and MFU should show it) and the output head run at
    `head_positions` positions (training runs it only where there is a target). Per real token, 2 FLOPs per
    multiply of each matmul weight of the blocks (attention and MLP projections, the active experts and the
    router); per causal (query, key) pair, 2 x 2 x heads x head_dim for the scores and the weighted sum."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    if cfg.use_moe:
        mlp = cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size + d * cfg.num_experts
    else:
        mlp = 3 * d * cfg.intermediate_size
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    forward = (2 * cfg.num_hidden_layers * (attn + mlp) * tokens
               + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * pairs
               + 2 * d * cfg.vocab_size * head_positions)
    return float(passes * forward)


# ---- schedule and data order -----------------------------------------------------------------------------


def lr_scale(cfg: TrainConfig, step: int, total: int) -> float:
    """The schedule, as a factor on each optimizer's peak rate: linear warmup, then cosine decay to
    min_lr_ratio."""
    warmup = cfg.warmup_steps or max(1, int(0.02 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


GROUP_WINDOW = 64  # length grouping sorts within windows of this many groups: order stays random across them
# The one epoch order in use, with the lengths array it was grouped by: held, so that array's id cannot be
# reused by another one, and compared by identity (hashing a large array every step would cost more).
_order_cache: dict[tuple, tuple[np.ndarray | None, torch.Tensor]] = {}


def epoch_order(n_rows: int, epoch: int, seed: int, lengths: np.ndarray | None = None,
                group_rows: int = 0) -> torch.Tensor:
    """One epoch's seeded shuffle of the rows. Given row lengths, rows of similar length are put in the same
    group of group_rows rows (sorted within windows of GROUP_WINDOW groups, then the groups shuffled), so a
    padded batch wastes little on padding, as transformers' group_by_length does."""
    key = (n_rows, epoch, seed, group_rows if lengths is not None else 0)
    cached = _order_cache.get(key)
    if cached is None or cached[0] is not lengths:
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(n_rows, generator=g)
        if lengths is not None and group_rows > 0:
            window = group_rows * GROUP_WINDOW
            pieces = []
            for lo in range(0, n_rows, window):
                chunk = order[lo:lo + window]
                chunk = chunk[torch.from_numpy(np.argsort(np.asarray(lengths)[chunk.numpy()], kind="stable"))]
                groups = list(chunk.split(group_rows))
                pieces += [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
            order = torch.cat(pieces)
        _order_cache.clear()  # the loop walks epochs in order: one cached epoch is enough
        _order_cache[key] = cached = (lengths, order)
    return cached[1]


def global_rows(n_rows: int, start: int, count: int, seed: int, lengths: np.ndarray | None = None,
                group_rows: int | None = None) -> list[int]:
    """Rows `start .. start+count` of the endless sequence of epochs, each epoch its own seeded shuffle
    (grouped by length when `lengths` is given, group_rows rows to a group, by default `count`). The position
    is counted in rows and the order depends on group_rows, not on the rows per step, so a run resumes at the
    same row of the same order with any number of processes (the loop groups by micro-batch: batch_size)."""
    out: list[int] = []
    group_rows = group_rows or count
    while count > 0:
        epoch, offset = divmod(start, n_rows)
        take = epoch_order(n_rows, epoch, seed, lengths, group_rows)[offset:offset + count].tolist()
        out += take
        start += len(take)
        count -= len(take)
    return out


# ---- one optimizer step ------------------------------------------------------------------------------


OPTIMIZERS = ("adamw", "muon")


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable weights Muon takes: the matrices of every linear layer inside the decoder blocks
    (attention and MLP projections, MoE experts, LoRA adapters A and B). Not the embedding or the output head
    (tied or not): they map tokens in and out rather than hidden states to hidden states, which is what Muon's
    orthogonalised update is made for. Not the MoE router either: it is a small classifier head (experts x
    hidden) whose logits' scale sets how sharply tokens are routed, and orthogonalising its update would give
    every expert's row the same step size."""
    routers = {id(m.gate) for m in model.modules() if isinstance(m, MoE)}
    return [m.weight for m in model.model.layers.modules()
            if isinstance(m, torch.nn.Linear) and id(m) not in routers and m.weight.requires_grad]


def make_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    rate_of: Callable[[str], str] | None = None) -> list[torch.optim.Optimizer]:
    """The optimizers of a run, each owning its own trainable parameters: AdamW (fused where torch has the
    kernel; weight decay on matrices only, not norms) on everything, or with optimizer = "muon" on everything
    but muon_matrices(), which go to Muon (torch's, orthogonalising in fp32 on CPUs without bf16 units). Muon
    runs with adjust_lr_fn="match_rms_adamw": its update is scaled to the RMS of a typical AdamW update
    (0.2 x sqrt(max side)), so the rate and weight decay tuned for AdamW carry over (Moonshot's "Muon is
    Scalable for LLM Training"), hence muon_lr defaults to lr. rate_of(parameter name): the TrainConfig field
    holding an AdamW parameter's peak rate (Stage.rate_of; by default "lr" for all)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise MiniMindError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")
    muon = muon_matrices(model) if cfg.optimizer == "muon" else []
    if cfg.optimizer == "muon" and not muon:
        raise MiniMindError("optimizer = \"muon\": this model has no trainable hidden matrices for Muon")
    taken = {id(p) for p in muon}
    rest: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in taken:
            rest.setdefault(rate_of(name) if rate_of else "lr", []).append(p)
    # "rate" names the config field of the group's peak rate, so set_lr reads it afresh (a resumed run too).
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": cfg.weight_decay, "rate": rate}
              for rate, ps in rest.items()] + \
             [{"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "rate": rate}
              for rate, ps in rest.items()]
    groups = [g for g in groups if g["params"]]  # LoRA under Muon leaves AdamW nothing
    optimizers: list[torch.optim.Optimizer] = []
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                            fused=device.type in ("cuda", "cpu")))
    if muon:
        optimizers.append(Muon(muon, ns_dtype(device), lr=cfg.muon_lr or cfg.lr, weight_decay=cfg.weight_decay,
                               adjust_lr_fn="match_rms_adamw"))
    return optimizers


def peak_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, group: dict | None = None) -> float:
    if isinstance(optimizer, torch.optim.Muon):
        return cfg.muon_lr or cfg.lr
    return getattr(cfg, (group or {}).get("rate", "lr")) or cfg.lr


def set_lr(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig, scale: float) -> None:
    """The schedule's factor on each optimizer's own peak rate (set every step, so a resumed run takes the
    rates of its config, not those saved in the checkpoint)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr(optimizer, cfg, group) * scale


def train_step(net: torch.nn.Module, model: torch.nn.Module, stage: Stage, micro: list[Batch],
               optimizers: list[torch.optim.Optimizer], grad_clip: float, device: torch.device, autocast,
               scaler: torch.amp.GradScaler | None, d: Dist) -> tuple[float, float, dict[str, float]]:
    """Forward and backward over the micro-batches, clip, step. Returns (mean loss per target token over
    the global batch, gradient norm before clipping, stage extras averaged over micro-batches)."""
    accum = len(micro)
    n_tokens = d.sum(sum(stage.count(b) for b in micro))
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
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    for optimizer in optimizers:
        if scaler:
            scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.update()
    return d.sum(loss_sum) / max(n_tokens, 1), grad_norm, extras


# ---- the run, phase by phase: build, plan, resume, then per step: batch, step, log, evaluate, checkpoint ----


@dataclass
class Plan:
    """The run's shape, settled before the first step (a time budget may shorten `total` as it goes)."""

    accum: int  # micro-batches per optimizer step, per process
    rows_per_step: int  # rows per optimizer step over all processes
    total: int  # optimizer steps
    dtype: torch.dtype
    lengths: np.ndarray | None  # row lengths, when steps group rows of similar length


@dataclass
class Position:
    """Where the run stands: optimizer steps taken and rows consumed (the data position, counted in rows)."""

    step: int = 0
    samples: int = 0


@dataclass
class Clock:
    """The run's timing: throughput since the last log line, ETA, and the pace a time budget is fitted to."""

    start_step: int
    planned: int  # the step count before any time-budget fit
    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = field(default_factory=time.perf_counter)
    tokens_since: int = 0
    flops_since: float = 0.0  # this process's share: log_step sums it over processes
    step_ends: list[float] = field(default_factory=list)


def train(cfg: TrainConfig, stage_class: type[Stage]) -> Path:
    """Run a stage; returns the directory it wrote (runs/<name>/model, or the stage's `output`)."""
    d = Dist()
    device = pick_device(cfg.device, d.local_rank)
    d.start(device)
    try:
        return _train(cfg, stage_class, d, device)
    finally:
        d.stop()


def _train(cfg: TrainConfig, stage_class: type[Stage], d: Dist, device: torch.device) -> Path:
    say = Printer(d.main)
    model, tokenizer, stage = build(cfg, stage_class, d, device)
    data, val = load_data(cfg, stage, d, say)
    plan = make_plan(cfg, data, d, device)
    autocast = torch.autocast(device.type, dtype=plan.dtype) if plan.dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if plan.dtype == torch.float16 else None
    optimizers = make_optimizers(model, cfg, device, stage.rate_of)
    at = resume(cfg, model, stage, optimizers, scaler, plan, d, device, say)
    net = wrap(model, cfg, d, device)
    loggers = start_run_dir(cfg, d, at.step)
    say(f"model: {model.config.name} {model.num_parameters():,} parameters | {device} "
        f"{str(plan.dtype).removeprefix('torch.')} | {d.world} process(es) x {cfg.batch_size} rows x {plan.accum} "
        f"accumulation = {plan.rows_per_step} rows/step | {plan.total} steps | {describe(optimizers, cfg)}")
    peak = peak_flops(device, plan.dtype, (probe_shape(model.config, cfg),)) * d.world if d.main else 0.0

    model.train()
    bar = progress_bar(plan.total, at.step, d.main, cfg.progress)
    clock = Clock(start_step=at.step, planned=plan.total)
    while at.step < plan.total:
        fit_to_budget(cfg, plan, at, clock, d, bar)
        scale = lr_scale(cfg, at.step, plan.total)
        set_lr(optimizers, cfg, scale)
        micro = stage.prepare(model, next_batches(cfg, stage, data, plan, at, d))
        train_loss, grad_norm, extras = train_step(net, model, stage, micro, optimizers, cfg.grad_clip, device,
                                                   autocast, scaler, d)
        at.step += 1
        at.samples += plan.rows_per_step
        clock.step_ends.append(time.perf_counter())
        clock.tokens_since += sum(stage.tokens(b) for b in micro) * d.world  # SFT rows are padded per batch
        clock.flops_since += sum(batch_flops(model.config, *stage.flop_shape(b), stage.passes) for b in micro)
        bar.update(1)

        last = at.step == plan.total
        if at.step % cfg.log_every == 0 or last or at.step == clock.start_step + 1:
            log_step(at.step, plan.total, train_loss, cfg.lr * scale, grad_norm, extras, peak, clock, device, d, bar,
                     loggers)
        paused = time.perf_counter()
        if val is not None and eval_due(cfg, at.step, plan.total):
            validate(model, stage, val, cfg, device, autocast, d, at.step, plan.total, bar, loggers)
        if (cfg.save_every and at.step % cfg.save_every == 0) or last:
            checkpoint(cfg, model, stage, optimizers, scaler, plan, at, d, device)
        clock.t_last += time.perf_counter() - paused  # tokens/s and MFU measure training, not evaluating or saving
    bar.close()
    return finish(cfg, model, tokenizer, stage, loggers, d, say)


def build_model(cfg: TrainConfig) -> tuple[MiniMindForCausalLM, Any]:
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


def build(cfg: TrainConfig, stage_class: type[Stage], d: Dist,
          device: torch.device) -> tuple[MiniMindForCausalLM, Any, Stage]:
    """The model on its device, its tokenizer, and the stage set up on it (before the optimizer exists)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.data:
        raise MiniMindError("no training data: set data = \"file.jsonl\" in the config or pass --data FILE")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same initial weights in every process
    model, tokenizer = build_model(cfg)
    model.to(device)
    stage = stage_class(cfg, tokenizer, d)
    model = stage.setup(model, device) or model  # a vision stage puts a language model inside a new VLM
    return model, tokenizer, stage


def load_data(cfg: TrainConfig, stage: Stage, d: Dist, say: Printer) -> tuple[Any, Any]:
    """The training rows (rank 0 tokenizes; the others wait, then open the same cache) and the validation
    rows, if any."""
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
    return data, val


def make_plan(cfg: TrainConfig, data: Any, d: Dist, device: torch.device) -> Plan:
    """Accumulation from the global batch size, the step count from steps or epochs, the precision."""
    per_micro = cfg.batch_size * cfg.seq_len * d.world
    accum = max(1, round(cfg.global_batch_tokens / per_micro)) if cfg.global_batch_tokens else 1
    rows_per_step = cfg.batch_size * accum * d.world
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(data) / rows_per_step))
    lengths = data.lengths() if cfg.group_by_length and hasattr(data, "lengths") else None
    if lengths is not None and lengths.min() == lengths.max():
        lengths = None  # packed pretraining rows are all full: nothing to group
    return Plan(accum, rows_per_step, total, pick_dtype(cfg.dtype, device), lengths)


def resume(cfg: TrainConfig, model: torch.nn.Module, stage: Stage, optimizers: list[torch.optim.Optimizer],
           scaler: torch.amp.GradScaler | None, plan: Plan, d: Dist, device: torch.device,
           say: Printer) -> Position:
    """On --resume, everything the latest checkpoint holds (weights, optimizer, scaler, RNG, data position,
    the stage's state) and the position to go on from; else position 0."""
    checkpoints = cfg.run_dir / "checkpoints"
    if not cfg.resume:
        if d.main and ((cfg.run_dir / "model").exists() or (checkpoints / LATEST).is_file()):
            say(f"note: {cfg.run_dir} already holds a run; starting afresh (use --resume to continue it)")
        return Position()
    if d.main:
        clean_debris(checkpoints)
    found = load_newest_resume(checkpoints, model, say)
    if found is None:
        raise MiniMindError(f"{checkpoints}: no checkpoint to resume from")
    target, trainer, state = found
    saved = state.get("optimizer", "adamw")
    if saved != cfg.optimizer:
        raise MiniMindError(f"{target}: this run was trained with optimizer = \"{saved}\", not \"{cfg.optimizer}\"; "
                            f"resume it with --optimizer {saved} (an exact resume needs the same optimizer)")
    states = trainer["optimizer"]
    for optimizer, optimizer_state in zip(optimizers, [states] if isinstance(states, dict) else states, strict=True):
        optimizer.load_state_dict(optimizer_state)
    if scaler is not None and "scaler" in trainer:
        scaler.load_state_dict(trainer["scaler"])
    same_layout = state["world_size"] == d.world
    if same_layout:  # RNG streams (dropout) continue exactly only on the same layout
        torch.set_rng_state(trainer["rng"]["torch"])
        if device.type == "cuda" and "cuda" in trainer["rng"]:
            torch.cuda.set_rng_state(trainer["rng"]["cuda"], device)
    if "stage" in trainer:  # one state per process; on another layout every process takes rank 0's
        stage.load_state(trainer["stage"][d.rank if same_layout else 0])
    if cfg.time_budget:
        plan.total = state.get("total", plan.total)  # a time-budgeted run keeps the length it settled on
    say(f"resumed from {target} (step {state['step']}, {state['samples']:,} rows seen, {state['world_size']} "
        f"process(es) then, {d.world} now)")
    return Position(state["step"], state["samples"])


def wrap(model: torch.nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> torch.nn.Module:
    """What the forward goes through: the model, compiled if asked, inside DDP on several processes."""
    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(model)
    if d.world > 1:
        # Unused parameters in a step: MoE experts no token chose; a vision model's projector (and tower) in a
        # step whose batch has no image.
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=model.config.use_moe or hasattr(model, "vision"))
    return net


def start_run_dir(cfg: TrainConfig, d: Dist, resumed_step: int) -> Loggers | None:
    """The run directory with its resolved config.toml and rank 0's loggers. A fresh run starts a fresh
    metrics.jsonl; a resumed one keeps the records up to its checkpoint's step, since the steps after it run
    again and would be logged twice (a line cut short by a kill goes too)."""
    if not d.main:
        return None
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.toml").write_text(to_toml(cfg))
    metrics = cfg.run_dir / "metrics.jsonl"
    if not cfg.resume:
        metrics.unlink(missing_ok=True)
    elif metrics.is_file():
        kept = [r for r in metric_records(metrics) if r["step"] <= resumed_step]
        with atomic_path(metrics) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return Loggers(cfg, cfg.run_dir)


def fit_to_budget(cfg: TrainConfig, plan: Plan, at: Position, clock: Clock, d: Dist, bar: progress_bar) -> None:
    """Fit the run to its time budget from the recent pace (this machine's speed drifts); the cosine schedule
    then decays over the steps that remain. The window is long because length-grouped steps differ several-fold
    in cost, and a short one makes the planned length (and so the learning rate) jump about. The first step
    (warm-up, compilation) is left out."""
    if not cfg.time_budget or cfg.resume or len(clock.step_ends) < 4 or at.step % 5:
        return
    recent = clock.step_ends[max(1, len(clock.step_ends) - 101):]
    per_step = (recent[-1] - recent[0]) / (len(recent) - 1)
    left = cfg.time_budget - (time.perf_counter() - clock.t_start)
    plan.total = d.first(max(at.step + 1, min(clock.planned, at.step + int(left / per_step))))
    bar.set_total(plan.total)


def next_batches(cfg: TrainConfig, stage: Stage, data: Any, plan: Plan, at: Position, d: Dist) -> list[Batch]:
    """This process's micro-batches of the next step: its share of the next rows_per_step rows of the data."""
    # Grouped by micro-batch, the unit that is padded: the order is then the same whatever the process count.
    rows = global_rows(len(data), at.samples, plan.rows_per_step, cfg.seed, plan.lengths, cfg.batch_size)
    micro = []
    for m in range(plan.accum):
        lo = (m * d.world + d.rank) * cfg.batch_size
        micro.append(stage.collate([data[i] for i in rows[lo:lo + cfg.batch_size]]))
    return micro


def log_step(step: int, total: int, train_loss: float, lr: float, grad_norm: float, extras: dict[str, float],
             peak: float, clock: Clock, device: torch.device, d: Dist, bar: progress_bar,
             loggers: Loggers | None) -> None:
    """One line per logged step (step, loss, lr, gradient norm, tokens/s, MFU, ETA) and a metrics record. MFU is
    the batches' FLOPs (batch_flops, summed over processes) per second over the probed peak; a figure over 100%
    means the probe read low, and is shown as "peak unknown" (null in metrics.jsonl), never as a number."""
    sync(device)
    flops = d.sum(clock.flops_since)
    now = time.perf_counter()
    elapsed = max(now - clock.t_last, 1e-9)
    tps = clock.tokens_since / elapsed
    clock.t_last, clock.tokens_since, clock.flops_since = now, 0, 0.0
    mfu = flops / elapsed / peak if peak else None
    mfu = round(mfu, 4) if mfu is not None and mfu <= 1 else None
    record = {"step": step, "loss": round(train_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
              "tokens_per_s": round(tps, 1), "mfu": mfu, **{k: round(v, 6) for k, v in extras.items()}}
    eta = (total - step) * (now - clock.t_start) / max(step - clock.start_step, 1)
    bar.write(f"step {step}/{total} | loss {train_loss:.4f} | lr {lr:.2e} | grad {grad_norm:.2f} | "
              f"{tps:,.0f} tok/s | MFU {'peak unknown' if mfu is None else f'{100 * mfu:.1f}%'} | "
              f"ETA {format_seconds(eta)}")
    if loggers:
        loggers.log(record)


def eval_due(cfg: TrainConfig, step: int, total: int) -> bool:
    """Validation (see validate) every eval_every steps or, by default, `evals` times spread over the run, and at
    the end. A time-budgeted run settles its length from its 5th step on (fit_to_budget), so its points spread
    over the steps it will take."""
    every = cfg.eval_every or math.ceil(total / max(cfg.evals, 1))
    return step % every == 0 or step == total


def describe(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig) -> str:
    """Which optimizer holds how many trainable parameters at what peak rate, e.g. "adamw 207,616 (lr
    2.00e-03) + muon 2,949,120 (lr 2.00e-03)"."""
    parts = []
    for o in optimizers:
        by_rate: dict[float, int] = {}
        for g in o.param_groups:
            rate = peak_lr(o, cfg, g)
            by_rate[rate] = by_rate.get(rate, 0) + sum(p.numel() for p in g["params"])
        parts += [f"{type(o).__name__.lower()} {n:,} (lr {rate:.2e})" for rate, n in by_rate.items()]
    return " + ".join(parts)


def probe_shape(cfg: ModelConfig, train: TrainConfig) -> tuple[int, int, int]:
    """The model's widest matmul, for peak_flops: a micro-batch's tokens (capped, so the CPU probe stays short)
    through the output head."""
    return min(train.batch_size * train.seq_len, 2048), cfg.hidden_size, cfg.vocab_size


def checkpoint(cfg: TrainConfig, model: torch.nn.Module, stage: Stage, optimizers: list[torch.optim.Optimizer],
               scaler: torch.amp.GradScaler | None, plan: Plan, at: Position, d: Dist, device: torch.device) -> None:
    """Rank 0 writes checkpoints/step_N: weights, optimizers, scaler, RNG, data position and every process's
    stage state (gathered here, so all processes take part)."""
    stage_states = d.gather(stage.state())
    if d.main:
        trainer = {"optimizer": [o.state_dict() for o in optimizers], "rng": {"torch": torch.get_rng_state()},
                   "stage": stage_states}
        if device.type == "cuda":
            trainer["rng"]["cuda"] = torch.cuda.get_rng_state(device)
        if scaler:
            trainer["scaler"] = scaler.state_dict()
        save_resume(cfg.run_dir / "checkpoints", at.step, model, trainer,
                    {"samples": at.samples, "total": plan.total, "world_size": d.world, "stage": cfg.stage,
                     "optimizer": cfg.optimizer},
                    cfg.keep_last)
    d.barrier()


def finish(cfg: TrainConfig, model: torch.nn.Module, tokenizer, stage: Stage, loggers: Loggers | None, d: Dist,
           say: Printer) -> Path:
    """The stage's product (a model directory, or a LoRA adapter), the loss plot; returns the product's path."""
    out = cfg.run_dir / stage.output
    if d.main:
        stage.save(model, out, tokenizer)
        if loggers:
            loggers.close()
        plot_losses(cfg.run_dir / "metrics.jsonl", cfg.run_dir / "loss.png")
        say(f"saved {out}")
    d.barrier()
    return out


@torch.no_grad()
def evaluate(model, stage, data, batches: int, subset: int, cfg: TrainConfig, device, autocast,
             d: Dist) -> tuple[float, float]:
    """Mean loss per token over the first `batches` x batch_size rows (the same rows every time), and over the
    first `subset` batches of those (the same pass: they come first).

    `model` is the unwrapped model, not DDP: DDP broadcasts buffers on each forward, and a process with no
    validation batch would leave the others waiting in that broadcast."""
    model.eval()
    n = min(len(data), batches * cfg.batch_size)
    total, count, sub_total, sub_count = 0.0, 0, 0.0, 0
    for b in range(d.rank, math.ceil(n / cfg.batch_size), d.world):
        lo = b * cfg.batch_size
        batch = stage.collate([data[i] for i in range(lo, min(lo + cfg.batch_size, n))])
        with autocast:
            loss, tokens, _ = stage.loss(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss)
        count += tokens
        if b < subset:
            sub_total += float(loss)
            sub_count += tokens
    return d.sum(total) / max(d.sum(count), 1), d.sum(sub_total) / max(d.sum(sub_count), 1)


def validate(model, stage, data, cfg: TrainConfig, device, autocast, d: Dist, step: int, total: int,
             bar: progress_bar, loggers: Loggers | None) -> None:
    """With eval_every, a full evaluation (eval_batches) every eval_every steps. Otherwise `evals` points of a
    validation curve, each on the first fifth of those batches only (the demo's 2 cores cannot afford more),
    logged as val_loss_subset; the full evaluation runs once, at the end, and logs its subset figure too, so the
    curve reaches the end on the same rows."""
    subset = 0 if cfg.eval_every else max(1, cfg.eval_batches // 5)
    full = bool(cfg.eval_every) or step == total
    loss, part = evaluate(model, stage, data, cfg.eval_batches if full else subset, subset, cfg, device, autocast, d)
    record: dict[str, Any] = {"step": step}
    if full:
        record["val_loss"] = round(loss, 6)
        bar.write(f"step {step}/{total} | validation loss {loss:.4f}")
    if subset:
        record["val_loss_subset"] = round(part, 6)
        bar.write(f"step {step}/{total} | validation loss {part:.4f} on the first {subset} batch(es)")
    if loggers:
        loggers.log(record)
    model.train()


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


def metric_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, less any line that is not a whole JSON object (one cut short by a kill)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def smooth(values: list[float], half: int) -> list[float]:
    """Centred moving average: each point the mean of those within `half` places of it (fewer at the ends). An
    EMA would lag the curve and draw it above the raw losses while they fall; a centred mean does not."""
    sums = np.cumsum([0.0, *values])
    n = len(values)
    return [float(sums[min(n, i + half + 1)] - sums[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
            for i in range(n)]


def plot_losses(metrics: Path, out: Path) -> None:
    """loss.png: the logged training losses (light), their centred moving average over about a twentieth of
    the run (length-grouped SFT steps mix task families, so the raw curve is a saw-tooth), the validation curve
    and the full validation figures."""
    if not metrics.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metric_records(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    curve = [(r["step"], r["val_loss_subset"]) for r in rows if "val_loss_subset" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        half = max(1, len(train) // 40)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        ax.plot(steps, smooth(list(losses), half), color="tab:blue",
                label=f"train, mean of {2 * half + 1} logged steps")
    if curve:
        ax.plot(*zip(*curve), "o-", color="tab:orange", markersize=4, label="validation, first fifth of the rows")
    if val:
        ax.plot(*zip(*val), "D" if curve else "o-", color="tab:red", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
