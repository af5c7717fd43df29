"""Supervised fine-tuning on conversations: loss only on what the assistant writes (its thinking, answer,
tool calls and closing <|im_end|>). `minimind train sft --config configs/tiny_sft.toml`."""

from __future__ import annotations

import numpy as np
import torch

from minimind.train.pretrain import PretrainStage


class SFTStage(PretrainStage):
    kind = "sft"

    def pack_options(self) -> dict:
        return {"system_prompt_prob": self.cfg.system_prompt_prob,
                "keep_empty_think_prob": self.cfg.keep_empty_think_prob}

    def collate(self, rows: list[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest row: padding sits after the text, so the causal mask alone hides it."""
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, mask) in enumerate(rows):
            ids[i, :len(row)] = torch.from_numpy(row.astype(np.int64))
            target = torch.from_numpy(row.astype(np.int64))
            labels[i, :len(row)] = torch.where(torch.from_numpy(mask.astype(bool)), target, -100)
        return {"input_ids": ids, "labels": labels}
