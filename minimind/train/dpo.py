"""Direct preference optimisation: raise the policy's log-probability of the chosen reply over the rejected one,
relative to a frozen reference model. `minimind train dpo --config configs/dpo.toml`."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.checkpoint import load_model
from minimind.data.formats import BadLine, iter_rows
from minimind.data.pack import PackStats
from minimind.logprobs import response_logps
from minimind.train.config import TrainConfig
from minimind.train.stage import Dist, Stage

Pair = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # chosen ids, chosen mask, rejected ids, rejected mask


def _response_only(mask: list[int], earlier_turns: int) -> list[int]:
    """The loss mask without its first `earlier_turns` runs of ones: assistant turns that belong to the
    shared prompt (history before the last user turn) are context, not the response being compared."""
    out, run = list(mask), 0
    for i, m in enumerate(mask):
        if m and (i == 0 or not mask[i - 1]):
            run += 1
        if m and run <= earlier_turns:
            out[i] = 0
    return out


def encode_side(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
    """One side of a pair as (ids, mask) with loss only on the reply after the last user turn."""
    ids, mask = encode_chat(tokenizer, messages, tools)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    earlier = sum(m["role"] == "assistant" for m in messages[:last_user])
    return ids, _response_only(mask, earlier)


class PairDataset:
    """Tokenized preference pairs, in memory (DPO files are small). Pairs longer than seq_len have their
    response cut (counted in stats.truncated); a pair with no response token left on a side is dropped."""

    def __init__(self, pairs: list[Pair], stats: PackStats, dropped: int) -> None:
        self.pairs, self.stats, self.dropped = pairs, stats, dropped

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]

    def lengths(self) -> np.ndarray:
        """Padded width of each pair (its longer side), for the loop's length-grouped batches."""
        return np.array([max(len(p[0]), len(p[2])) for p in self.pairs], dtype=np.int64)


def read_pairs(path: str, tokenizer, seq_len: int, skip_bad: bool = False) -> PairDataset:
    """Read a DPO file (either layout, via formats.iter_rows) and tokenize both sides of every pair."""
    bad: list[BadLine] | None = [] if skip_bad else None
    stats, pairs, dropped = PackStats(), [], 0
    for _, row in iter_rows(path, "dpo", bad):
        stats.documents += 1
        sides = []
        for side in ("chosen", "rejected"):
            ids, mask = encode_side(tokenizer, row[side], row["tools"])
            stats.longest = max(stats.longest, len(ids))
            sides.append((ids, mask))
        if any(len(ids) > seq_len for ids, _ in sides):
            stats.truncated += 1
            stats.dropped_tokens += sum(max(0, len(ids) - seq_len) for ids, _ in sides)
            sides = [(ids[:seq_len], mask[:seq_len]) for ids, mask in sides]
        if any(sum(mask) == 0 for _, mask in sides):  # the prompt alone fills seq_len: nothing to compare
            dropped += 1
            stats.no_loss_rows += 1
            continue
        stats.rows += 1
        stats.tokens += sum(len(ids) for ids, _ in sides)
        stats.loss_tokens += sum(sum(mask) for _, mask in sides)
        pairs.append(tuple(np.asarray(x, dtype=np.int32 if k % 2 == 0 else np.uint8)
                           for k, x in enumerate((*sides[0], *sides[1]))))
    stats.skipped_bad = len(bad or [])
    return PairDataset(pairs, stats, dropped)


def collate_pairs(rows: list[Pair], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Chosen sides in rows 0..B-1, rejected in B..2B-1, right-padded to the longest (the causal mask alone
    hides the padding); labels are the ids on response tokens, -100 elsewhere."""
    sides = [(r[0], r[1]) for r in rows] + [(r[2], r[3]) for r in rows]
    width = max(len(ids) for ids, _ in sides)
    ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sides), width), -100, dtype=torch.long)
    for i, (row, mask) in enumerate(sides):
        t = torch.from_numpy(np.asarray(row, dtype=np.int64))
        ids[i, :len(t)] = t
        labels[i, :len(t)] = torch.where(torch.from_numpy(np.asarray(mask, dtype=bool)), t, -100)
    return {"input_ids": ids, "labels": labels}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO loss from summed response log-probs, and the batch means of the logged metrics.

    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h), with h the policy's log-ratio
    margin over the reference; eps > 0 is conservative DPO (a share eps of labels assumed flipped)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    logits = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    margin = logits.detach()
    extras = {"chosen_reward": chosen.detach().mean(), "rejected_reward": rejected.detach().mean(),
              "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}
    return losses, extras


class DPOStage(Stage):
    """Batches of (chosen, rejected) pairs; the unit the loop averages over is a pair."""

    kind = "dpo"

    def __init__(self, cfg: TrainConfig, tokenizer, dist: Dist | None = None) -> None:
        if cfg.dpo_beta <= 0:
            raise MiniMindError(f"dpo_beta must be > 0, got {cfg.dpo_beta}")
        if not 0 <= cfg.dpo_label_smoothing < 0.5:
            raise MiniMindError(f"dpo_label_smoothing must be in [0, 0.5), got {cfg.dpo_label_smoothing}")
        if cfg.dpo_nll_weight < 0:
            raise MiniMindError(f"dpo_nll_weight must be >= 0, got {cfg.dpo_nll_weight}")
        super().__init__(cfg, tokenizer, dist)
        self.ref: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        """The reference: the ref_model directory, else a frozen copy of the policy as it starts (setup runs
        before a resume loads newer weights, so a resumed run keeps the same reference)."""
        if self.cfg.ref_model:
            ref = load_model(self.cfg.ref_model, device=device)
            if ref.config.vocab_size != model.config.vocab_size:
                raise MiniMindError(f"{self.cfg.ref_model}: reference vocab_size {ref.config.vocab_size} differs "
                                    f"from the policy's {model.config.vocab_size}; they must share a tokenizer")
        else:
            ref = copy.deepcopy(model)
        ref.eval().requires_grad_(False)
        self.ref = ref

    def dataset(self, path: str) -> PairDataset:
        data = read_pairs(path, self.tokenizer, self.cfg.seq_len, self.cfg.skip_bad)
        if data.dropped:
            self.say(f"{path}: {data.dropped:,} of {data.stats.documents:,} pairs have no response token within "
                     f"seq_len {self.cfg.seq_len}; training skips them")
        return data

    def collate(self, rows: list[Pair]) -> dict[str, torch.Tensor]:
        return collate_pairs(rows, self.tokenizer.pad_token_id or 0)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        if self.ref is None:
            raise MiniMindError("DPOStage.setup(model, device) must run before loss (it builds the reference)")
        ids, labels = batch["input_ids"], batch["labels"]
        n = ids.shape[0] // 2
        out = model(ids)  # chosen and rejected in one forward: one DDP all-reduce per micro-batch
        policy = response_logps(out.logits, labels)
        with torch.no_grad():
            ref = response_logps(self.ref(ids).logits, labels)
        losses, extras = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.cfg.dpo_beta,
                                  self.cfg.dpo_label_smoothing)
        if self.cfg.dpo_nll_weight:
            nll = -policy[:n] / (labels[:n, 1:] != -100).sum(-1).clamp(min=1)
            losses = losses + self.cfg.dpo_nll_weight * nll
            extras["chosen_nll"] = nll.detach().mean()
        if out.aux_loss is not None:
            extras["aux_loss"] = out.aux_loss
        return losses.sum(), n, extras
