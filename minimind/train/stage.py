"""The contract between the training loop and a stage: `Stage`, the base class every stage subclasses, and
`Dist`, the process-group facts the loop passes to it. `class MyStage(Stage): ...; train(cfg, MyStage)`."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minimind.checkpoint import save_model
from minimind.train.config import TrainConfig

Batch = dict[str, torch.Tensor]


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

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (a picklable CPU object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def target_tokens(batch: Batch) -> int:
    """Positions with a next-token label: the unit a language-model loss averages over."""
    return int((batch["labels"][:, 1:] != -100).sum())


def real_lengths(batch: Batch) -> list[int]:
    """Each row's tokens less its padding: as the attention_mask says, or else up to the last non-zero id (rows
    are right-padded with id 0, <|endoftext|>, which no rendered chat or pair ends with)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum(1).tolist()
    ids = batch["input_ids"]
    return ((ids != 0) * torch.arange(1, ids.shape[1] + 1, device=ids.device)).amax(1).tolist()


class Stage(ABC):
    """What a stage supplies to the loop, with the defaults spelled out. The loop calls, in this order:

      Stage(cfg, tokenizer, dist)   read and check the stage's settings
      setup(model, device)          after the model is on its device, before the optimizer is built and a
                                    resume state is loaded: freeze or wrap layers (LoRA), add heads, load a
                                    reference or teacher model; may return a model that replaces it (on
                                    the device), as a vision stage returns a VLM built around the LLM
      rate_of(name)                 per trainable parameter, the config field of its peak rate ("lr")
      dataset(path)                 the training (and validation) rows; rank 0 builds it first
      load_state(state)             on --resume, what state() returned when the checkpoint was written
      collate(rows) -> batch        per micro-batch of rows
      prepare(model, micro)         turn each step's micro-batches into training batches (RL rollouts)
      count(batch), loss(model, batch)   per micro-batch, for the gradient
      flop_shape(batch)             per micro-batch, for MFU: real tokens per row, output-head positions
      tokens(batch)                 per micro-batch, for tokens/s: the positions it runs (padding included)
      state() -> dict               with every checkpoint: whatever else decides the next steps (tensors,
                                    numbers, strings, lists and dicts only: it is read with weights_only)
      save(model, out, tokenizer)   once at the end, into run_dir / output

    `loss` returns (sum of per-unit losses, number of units, extra metrics): the loop divides by the unit count
    of the whole global batch (`count`), so the gradient is the same whatever the split over micro-batches and
    processes. An extra named `aux_loss` (MoE load balancing) is added to the loss."""

    output = "model"  # the product's directory under the run directory
    passes = 3  # for MFU: a training step costs 3 forwards (forward, input gradients, weight gradients)

    def __init__(self, cfg: TrainConfig, tokenizer, dist: Dist | None = None) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.dist = dist or Dist()

    def setup(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
        """Nothing to add: the model trains as it is."""
        return None

    def rate_of(self, name: str) -> str:
        """Every parameter at lr (AdamW's; Muon's matrices take muon_lr)."""
        return "lr"

    @abstractmethod
    def dataset(self, path: str) -> Any:
        """A sized, indexable set of rows with `.stats` (tokens, truncated, skipped_bad) and optionally
        `.lengths()` (per-row lengths, for length-grouped batches)."""

    @abstractmethod
    def collate(self, rows: list) -> Batch:
        """The rows of one micro-batch as tensors."""

    def prepare(self, model: torch.nn.Module, micro: list[Batch]) -> list[Batch]:
        return micro

    def count(self, batch: Batch) -> int:
        return target_tokens(batch)

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """(sum of per-unit losses, number of units, extra metrics) of one batch."""

    def flop_shape(self, batch: Batch) -> tuple[list[int], int]:
        """(real tokens of each row, positions the output head runs at) of a training batch, for MFU
        (loop.batch_flops): by default the head runs at every real token."""
        lengths = real_lengths(batch)
        return lengths, sum(lengths)

    def tokens(self, batch: Batch) -> int:
        """The batch's token positions, padding included (tokens/s counts what the step runs)."""
        return batch["input_ids"].numel()

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore: a stateless stage resumes from the weights and data position alone."""
        return None

    def save(self, model: torch.nn.Module, out: Path, tokenizer) -> Any:
        return save_model(model, out, tokenizer)

    def say(self, text: str) -> None:
        """Print once per run (on rank 0)."""
        if self.dist.main:
            print(text, flush=True)
