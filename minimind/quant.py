"""int8 quantisation for inference: `quantize_int8(model)` swaps the Linear layers (attention, MLP, experts,
output head) for Int8Linear layers: int8 weights with one scale per output row.

Why: decoding one token reads every weight once, so at batch 1 it runs at the speed of memory, not of
arithmetic, and int8 weights are a quarter of fp32's bytes. On the CPU the activations are rounded to int8 too,
one scale per row (as llama.cpp's q8_0 rounds them per block of 32), and the product runs on int8 dot-product
instructions with int32 sums (`torch._int_mm`: oneDNN, VNNI or AMX). Each row is rounded on its own, so a
sequence gets the same result in any batch. The cost is a rounding error of at most 0.4% of each weight row's
largest value and of each activation row's. bench/generate.py has the speed figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimind import MiniMindError
from minimind.model import MiniMindForCausalLM, MoE

SCHEMES = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows times a per-row scale (symmetric, round to nearest); on the CPU
    x is rounded the same way, per row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise MiniMindError("int8 quantisation expects bias-free Linear layers")
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # (torch._int_mm is CPU and CUDA only, and on CUDA wants over 16 rows)
            return F.linear(x, self.dequantized().to(x.dtype))
        # Measured on a 2-core AVX-512 VNNI CPU against the int8-weight kernel with bf16 activations
        # (torch._weight_int8pack_mm): 2-4x faster at 1 row, 2.6x at 8, 3-6x at 512; and 1.5-3.4x faster than
        # a dequantised fp32 copy from 32 to 512 rows.
        # In-place where it can be: eager, each elementwise op costs more than the matmul at a few rows.
        rows = x.reshape(-1, self.in_features).float()
        step = rows.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(127)
        product = torch._int_mm(rows.div(step).round_().to(torch.int8), self.weight.t())
        return product.mul(step).mul_(self.scale).to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """Quantise in place for inference (not training): every decoder Linear but MoE routers becomes Int8Linear;
    the rest (embedding, norms, routers, a vision model's tower and projector) keeps the dtype the model was
    loaded in (`--dtype auto`: bf16 on CPUs with bf16 instructions, else fp32, which decoded 10% faster than
    bf16 on such a CPU). A tied output head gets its own int8 copy, so the embedding lookup stays exact."""
    model.eval()
    # A vision model's tower and projector (Linear layers with biases, run once per image) stay as they are.
    vision = {id(m) for part in ("vision_encoder", "vision_proj") if hasattr(model, part)
              for m in getattr(model, part).modules()}
    for parent in list(model.modules()):
        if id(parent) in vision:
            continue
        for name, child in list(parent.named_children()):
            # An MoE router stays unquantised: it is small, and its top-k choice is discrete, so rounding its weights
            # would send some tokens to other experts.
            if isinstance(child, nn.Linear) and not (isinstance(parent, MoE) and name == "gate"):
                setattr(parent, name, Int8Linear(child))
    return model


def quantize(model: MiniMindForCausalLM, scheme: str | None) -> MiniMindForCausalLM:
    """Apply `scheme` (None or "none": leave the model as it is)."""
    if scheme in (None, "none"):
        return model
    if scheme not in SCHEMES:
        raise MiniMindError(f"unknown quantisation {scheme!r}; expected one of none, {', '.join(SCHEMES)}")
    return quantize_int8(model)
