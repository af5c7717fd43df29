"""Causal self-attention for training on a CPU, about 1.3x as fast as SDPA's CPU flash kernel (forward and
backward) at training lengths. `bench/train.py` measures the whole step.

Queries go in blocks of 64; each block scores only the keys up to its own end, so the masked upper triangle is
mostly never computed. Scores, softmax and its backward are fp32 as in SDPA's kernel; the matmuls with v and
the stored probabilities use the input dtype (bf16 under autocast). The probabilities are kept for the backward
instead of being recomputed, which costs memory (about T * T / 2 values per head), so the model takes this path
only up to 1,024 positions, which is also where it is faster."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64
MAX_LEN = 1024


def usable(q: torch.Tensor) -> bool:
    """Whether causal attention over q [B, H, T, D] should take this path (training on a CPU, short rows)."""
    return q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad and q.shape[2] <= MAX_LEN


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """softmax(q k^T / sqrt(D) + mask) v for q [B, H, T, D] and k, v [B, KV, T, D] (H a multiple of KV). `mask`
    [B, 1, T, T] (True: may attend) must already be causal, as the model's padding masks are; None: causal.
    Under autocast the inputs are cast to its dtype, as autocast does for SDPA (q/k-norm leaves q and k fp32)."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    B, _, T, _ = q.shape
    # Zero-pad to whole blocks: then a position's numbers never depend on how long the batch is, so a row gets
    # the same gradient whatever it is batched with (and under DDP whichever rank holds it).
    pad = -T % BLOCK
    q, k, v = (F.pad(t.to(dtype), (0, 0, 0, pad)) for t in (q, k, v))
    if mask is not None and pad:
        causal = torch.ones(T + pad, T + pad, dtype=torch.bool, device=mask.device).tril()
        mask = torch.cat([torch.cat([mask, causal[:T, T:].expand(B, 1, T, pad)], -1),
                          causal[T:].expand(B, 1, pad, T + pad)], -2)
    with torch.autocast(device, enabled=False):
        return _BlockedCausal.apply(q, k, v, None if mask is None else ~mask)[:, :, :T]


class _BlockedCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        B, H, T, D = q.shape
        group = H // k.shape[1]
        # Each query head gets its key/value head's copy: [B*H, T, D] makes every product one batched matmul.
        k = k.repeat_interleave(group, 1).flatten(0, 1)
        v = v.repeat_interleave(group, 1).flatten(0, 1)
        q = (q * D ** -0.5).flatten(0, 1)
        out = torch.empty_like(q)
        # Scores and softmax in fp32 as SDPA's CPU kernel has them (with bf16 scores, one SFT A/B trailed SDPA on
        # held-out arithmetic); the probabilities go back to the input dtype for the product with v.
        acc = torch.promote_types(q.dtype, torch.float32)
        q_acc, k_acc = q.to(acc), k.to(acc)
        upper = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=q.device).triu(1)
        probs = []
        for start in range(0, T, BLOCK):
            end = start + BLOCK
            scores = torch.bmm(q_acc[:, start:end], k_acc[:, :end].transpose(1, 2))
            if hidden is None:
                scores[:, :, start:].masked_fill_(upper, float("-inf"))
            else:
                scores.view(B, H, BLOCK, end).masked_fill_(hidden[:, :, start:end, :end], float("-inf"))
            p = torch.softmax(scores, -1).to(q.dtype)
            out[:, start:end] = torch.bmm(p, v[:, :end])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.group = group
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors
        B, H, T, D = grad_out.shape
        grad_out = grad_out.reshape(B * H, T, D)
        grad_q = torch.empty_like(q)
        # Key blocks collect gradient from every later query block: accumulate in fp32 at least.
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_k = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_v = torch.zeros(q.shape, dtype=acc, device=q.device)
        v_acc = v.to(acc)
        for p, start in zip(probs, range(0, T, BLOCK)):
            end = start + BLOCK
            g = grad_out[:, start:end]
            grad_v[:, :end] += torch.bmm(p.transpose(1, 2), g)
            # softmax's own backward kernel, in fp32: p * (grad_p - rowsum(p * grad_p)) in one pass
            grad_p = torch.bmm(g.to(acc), v_acc[:, :end].transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_p, p.to(acc), -1, acc).to(q.dtype)
            grad_q[:, start:end] = torch.bmm(grad_scores, k[:, :end])
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q[:, start:end])
        kv = H // ctx.group
        grad_k = grad_k.view(B, kv, ctx.group, T, D).sum(2).to(k.dtype)
        grad_v = grad_v.view(B, kv, ctx.group, T, D).sum(2).to(v.dtype)
        return (grad_q * D ** -0.5).view(B, H, T, D), grad_k, grad_v, None
