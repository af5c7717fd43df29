"""Log-probabilities of labelled tokens under a model's logits, shared by training and evaluation.
`logp = response_logps(model(ids).logits, labels)` (labels -100 where a token is not scored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the labelled (response) tokens: [B, T, V], [B, T] -> [B]."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                          reduction="none")
    return -nll.view_as(targets).sum(-1)
