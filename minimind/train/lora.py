"""LoRA fine-tuning: SFT data and loss, but only low-rank adapters train; writes runs/<name>/adapter (PEFT
layout). `minimind train lora --config configs/lora.toml`; the built-in example is minimind/recipes/lora.py."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.lora import freeze_base, inject_lora, save_adapter
from minimind.train.config import TrainConfig
from minimind.train.sft import SFTStage


def adapter_dir(cfg: TrainConfig) -> Path:
    """Where a LoRA run writes its adapter: runs/<name>/adapter."""
    return cfg.run_dir / "adapter"


class LoRAStage(SFTStage):
    """SFT with a frozen base. setup() runs before the optimizer is built and before a resume state is
    loaded, so the optimizer sees only the adapters and the checkpoint (base + adapters) loads by name."""

    output = "adapter"  # the run's product is runs/<name>/adapter, not a model directory
    passes = 2  # for MFU: the frozen base needs no weight gradients (the adapters' FLOPs are left out: rank << width)

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        cfg = self.cfg
        if not cfg.init_from:
            raise MiniMindError("LoRA adapts an existing model: set init_from (a model directory, e.g. "
                                "runs/sft/model)")
        names = inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        trainable, total = freeze_base(model)
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        self.say(f"LoRA: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {len(names)} layers "
                 f"({', '.join(kinds)}): {trainable:,} trainable parameters, {100 * trainable / total:.2f}% of "
                 f"{total:,}")

    def save(self, model: torch.nn.Module, out: Path, tokenizer=None) -> Path:
        """The adapter only (runs/<name>/adapter), not a model directory: merge it with `minimind lora merge`."""
        return save_adapter(model, adapter_dir(self.cfg), base_model_dir=self.cfg.init_from)
