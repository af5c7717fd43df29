"""Weight-only int8 quantisation for inference: `quantize_int8(model)` swaps the Linear layers (attention, MLP,
experts, output head) for Int8Linear layers: int8 weights with one scale per output row; activations stay bf16.

Why: decoding one token reads every weight once, so at batch 1 it runs at the speed of memory, not of
arithmetic. int8 weights are a quarter of fp32's bytes, and PyTorch's CPU kernel for int8 weights with bf16
activations (`torch._weight_int8pack_mm`) streams them at close to memory speed. The cost is a rounding error of
at most 0.4% of each weight row's largest value (llama.cpp's q8_0 is the same idea with a scale per block of
32 weights). bench/generate.py has the speed figures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimind import MiniMindError
from minimind.device import cpu_has_bf16
from minimind.model import MiniMindForCausalLM, MoE

SCHEMES = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows times a per-row scale (symmetric, round to nearest)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise MiniMindError("int8 quantisation expects bias-free Linear layers")
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        # Past `kernel_rows` rows (a prefill) a matmul on a dequantised copy beats the int8 kernel. A CPU without
        # bf16 instructions emulates bf16 arithmetic, so there the copy is fp32: measured on such a CPU at 512
        # rows, fp32 2.2x the int8 kernel and 4.2x a bf16 copy; break-even between 128 and 256 rows. With bf16
        # instructions (not measured: no such CPU here) the copy stays bf16 from 32 rows, as before.
        self.fp32_matmul = not cpu_has_bf16()
        self.kernel_rows = 128 if self.fp32_matmul else 32

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        rows = x.numel() // self.in_features
        # The int8 kernel wins while reading the weights is the cost (decoding, a few rows: 2.5x bf16 at one
        # row). It is CPU-only here; elsewhere always dequantise.
        if x.device.type != "cpu" or rows > self.kernel_rows:
            dtype = torch.float32 if x.device.type == "cpu" and self.fp32_matmul else x.dtype
            return F.linear(x.to(dtype), self.dequantized().to(dtype)).to(x.dtype)
        return torch._weight_int8pack_mm(x.reshape(rows, self.in_features), self.weight,
                                         self.scale).view(*x.shape[:-1], self.out_features)


def quantize_int8(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """Quantise in place for inference (not training): every decoder Linear but MoE routers becomes Int8Linear;
    the rest (embedding, norms, routers, a vision model's tower and projector) goes to bf16. A tied output head
    gets its own int8 copy, so the embedding lookup stays exact."""
    model.eval().to(torch.bfloat16)
    # A vision model's tower and projector (Linear layers with biases, run once per image) stay bf16.
    vision = {id(m) for part in ("vision_encoder", "vision_proj") if hasattr(model, part)
              for m in getattr(model, part).modules()}
    for parent in list(model.modules()):
        if id(parent) in vision:
            continue
        for name, child in list(parent.named_children()):
            # An MoE router stays bf16: it is small, and its top-k choice is discrete, so rounding its weights
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
