"""Summed cross-entropy over bf16 (or any float) logits, in fp32 (at least) a few rows at a time.

`F.cross_entropy(logits.float(), ...)` writes an fp32 copy of the logits, its log-softmax, a zero-filled gradient
and an fp32 gradient: four passes over [N, vocab] floats each way. Here each chunk of rows is upcast while it sits
in cache, and the backward recomputes its softmax from the saved log-sum-exp, so only the logits themselves and
their gradient in their own dtype ever span all N rows. Same value and gradient as the fp32 formula."""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 18  # fp32 values upcast at once (1 MiB): rows per chunk = this // vocab


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w[t_i] * (logsumexp(logits_i) - logits_i[t_i]) in fp32, for logits [N, V] and targets [N];
    `weight` [V] is F.cross_entropy's class weight (None: all 1)."""
    row_weight = None if weight is None else weight[targets].to(torch.promote_types(logits.dtype, torch.float32))
    return _CrossEntropySum.apply(logits, targets, row_weight)


def _chunks(n: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, n, step):
        yield start, min(start + step, n)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
        n, vocab = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        picked = torch.empty(n, dtype=acc, device=logits.device)
        for start, end in _chunks(n, vocab):
            chunk = logits[start:end].to(acc)
            lse[start:end] = torch.logsumexp(chunk, -1)
            picked[start:end] = chunk.gather(1, targets[start:end, None]).squeeze(1)
        losses = lse - picked
        ctx.save_for_backward(logits, targets, lse, row_weight)
        return (losses if row_weight is None else losses * row_weight).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, row_weight = ctx.saved_tensors
        n, vocab = logits.shape
        scale = grad.to(lse.dtype).expand(n) if row_weight is None else grad.to(lse.dtype) * row_weight
        grad_logits = torch.empty_like(logits)
        for start, end in _chunks(n, vocab):
            # d/dlogits = (softmax - one_hot(target)) * the row's weight
            p = (logits[start:end] - lse[start:end, None]).exp_()  # a new tensor: the saved logits stay as they were
            p[torch.arange(end - start, device=p.device), targets[start:end]] -= 1
            grad_logits[start:end] = p.mul_(scale[start:end, None])
        return grad_logits, None, None
