"""Loading a model directory for inference, and the sampling settings to decode it with (chat, generate, eval,
serve and data distill share them). `model, tok = load_for_inference(d)`; `params = sampling_params(d, top_k=0)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minimind import MiniMindError
from minimind.checkpoint import load_model
from minimind.device import pick_device, pick_dtype
from minimind.generation import SamplingParams, sampling_defaults
from minimind.lora import load_adapter
from minimind.quant import quantize as apply_quantization
from minimind.tokenizer import load_tokenizer


def load_for_inference(model_dir: str | Path, lora: str | Path | None = None, device: str = "auto",
                       dtype: str = "auto", quantize: str | None = "none",
                       rope_scaling: str | None = None, compile: bool = False) -> tuple[Any, Any]:
    """The model of `model_dir` (with the LoRA adapter `lora` folded in, q/k/v and gate/up fused, then
    quantised by `quantize`) on `device` in `dtype`, and its tokenizer. rope_scaling ("yarn", "none")
    overrides config.json's. compile=True makes generation compile its decode step (generation.decode)."""
    dev = pick_device(device)
    model = load_model(model_dir, device=dev, dtype=pick_dtype(dtype, dev), rope_scaling=rope_scaling)
    if lora:
        model = load_adapter(model, lora, merge=True)  # folded in: decoding costs nothing extra
    model = apply_quantization(model.eval().fuse_projections(), quantize)
    model.compile_decode = compile
    tokenizer = load_tokenizer(model_dir)
    if len(tokenizer) > model.config.vocab_size:
        raise MiniMindError(f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                            f"is {model.config.vocab_size}")
    return model, tokenizer


def sampling_params(model_dir: str | Path, **overrides: Any) -> SamplingParams:
    """The model's own sampling defaults (its generation_config.json, as transformers and vLLM read it), with
    every override that is not None on top: a flag the user gave wins, one left out keeps the model's value."""
    values = {**sampling_defaults(model_dir), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return SamplingParams(**values)
    except ValueError as e:
        raise MiniMindError(str(e)) from None
