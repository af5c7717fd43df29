"""torch.optim.Muon with its Newton-Schulz iteration in a dtype the hardware runs fast. torch's runs in bf16
always, which a CPU without bf16 matmul units (no AMX, no AVX-512 BF16) emulates: `tiny` took 1.1 s per Muon
step there against 0.011 s for AdamW. In fp32 the same iteration costs a few matmuls per matrix."""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

from minimind.device import cpu_has_bf16


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where matmuls run natively in it (GPUs, AMX CPUs), as torch does; fp32 elsewhere."""
    return torch.bfloat16 if device.type != "cpu" or cpu_has_bf16() else torch.float32


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Towards the nearest semi-orthogonal matrix: scale to Frobenius norm 1 (so the spectral norm is at most 1),
    then X <- aX + (bA + cA^2)X with A = XX^T on the wide orientation (the smaller Gram matrix), written with
    torch's fused multiply-adds so that in bf16 it rounds as torch.optim.Muon does."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyper-parameters, state and checkpoints) whose orthogonalisation runs in `dtype`."""

    def __init__(self, params, dtype: torch.dtype, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss
