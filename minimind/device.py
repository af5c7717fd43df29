"""Which device and which precision to run on: one rule for training, chat, serving and benchmarks.
`device = pick_device("auto"); dtype = pick_dtype("auto", device)`."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from minimind import MiniMindError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: the local process's GPU, else Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = f"cuda:{local_rank}"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MiniMindError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MiniMindError("device cuda was asked for, but this torch build sees no CUDA GPU")
        torch.cuda.set_device(device)
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """AMX or AVX-512 BF16. On such CPUs bf16 trains about 1.7x faster than fp32 and decodes faster too,
    since decoding is bound by reading the weights (DESIGN.md section 5)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware runs it natively (recent GPUs, AMX CPUs), fp16 on older GPUs, else fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise MiniMindError(f"dtype must be auto, bfloat16, float16 or float32, not {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32
