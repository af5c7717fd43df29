"""Log-probabilities of chosen tokens: the one place every loss and score that needs log p(token) computes it
(pretraining and SFT loss, DPO, distillation's cross-entropy, GRPO/PPO, rollouts, multiple choice, perplexity).

`token_logprobs(logits, labels)` -> [B, T-1], position t holding log p(labels[t+1] | ids <= t), 0 where the
label is -100. Underneath, the per-row negative log-likelihood runs in fp32 (at least) a few rows at a time:
`F.cross_entropy(logits.float(), ...)` writes an fp32 copy of the logits, its log-softmax, a zero-filled gradient
and an fp32 gradient, four passes over [N, vocab] floats each way. Here each chunk of rows is upcast while it
sits in cache, and the backward recomputes its softmax from the saved log-sum-exp, so only the logits and their
gradient in their own dtype ever span all N rows. Same value and gradient as the fp32 formula."""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 18  # fp32 values upcast at once (1 MiB): rows per chunk = this // vocab


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[:, t + 1]) under logits[:, t] for t = 0..T-2, in fp32: [B, T, V], [B, T] -> [B, T-1]; 0 where
    the label is -100 (prompt, padding, tool output). Differentiable; the head's rows that predict nothing are
    never upcast."""
    targets = labels[:, 1:]
    keep = targets != -100
    out = torch.zeros(targets.shape, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    out[keep] = -token_nll(logits[:, :-1][keep], targets[keep])
    return out


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the labelled (response) tokens: [B, T, V], [B, T] -> [B]."""
    return token_logprobs(logits, labels).sum(-1)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w[t_i] * (logsumexp(logits_i) - logits_i[t_i]) in fp32, for logits [N, V] and targets [N];
    `weight` [V] is F.cross_entropy's class weight (None: all 1)."""
    nll = token_nll(logits, targets)
    return nll.sum() if weight is None else (nll * weight[targets].to(nll.dtype)).sum()


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each row's distribution, in fp32 a chunk at a time: [N, V] -> [N] (no gradient)."""
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for start, end in _chunks(n, vocab):
        lsm = logits[start:end].to(out.dtype).log_softmax(-1)
        out[start:end] = -(lsm.exp() * lsm).sum(-1)
    return out


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits_i)[t_i] for each row: [N, V], [N] -> [N] in fp32 (fp64 stays fp64), chunked."""
    return _TokenNLL.apply(logits, targets)


def _chunks(n: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, n, step):
        yield start, min(start + step, n)


class _TokenNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        picked = torch.empty(n, dtype=acc, device=logits.device)
        for start, end in _chunks(n, vocab):
            chunk = logits[start:end].to(acc)
            lse[start:end] = torch.logsumexp(chunk, -1)
            picked[start:end] = chunk.gather(1, targets[start:end, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        n, vocab = logits.shape
        scale = grad.to(lse.dtype)
        grad_logits = torch.empty_like(logits)
        for start, end in _chunks(n, vocab):
            # d/dlogits = (softmax - one_hot(target)) * the row's incoming gradient
            p = (logits[start:end] - lse[start:end, None]).exp_()  # a new tensor: the saved logits stay as they were
            p[torch.arange(end - start, device=p.device), targets[start:end]] -= 1
            grad_logits[start:end] = p.mul_(scale[start:end, None])
        return grad_logits, None
