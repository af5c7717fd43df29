"""Direct preference optimisation: raise the policy's log-probability of the chosen reply over the rejected one,
relative to a frozen reference model. `minimind train dpo --config configs/dpo.toml`."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from minimind import MiniMindError
from minimind.checkpoint import load_model
from minimind.data.preferences import Pair, PairDataset, collate_pairs, read_pairs
from minimind.logprobs import response_logps
from minimind.train.config import TrainConfig
from minimind.train.stage import Dist, Stage


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
        data = read_pairs(path, self.tokenizer, self.cfg.seq_len, self.cfg.skip_bad, self.cfg.train_newline_after_eos)
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
