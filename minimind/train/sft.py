"""Supervised fine-tuning on conversations: loss only on what the assistant writes (its thinking, answer,
tool calls and closing <|im_end|>). `minimind train sft --config configs/tiny_sft.toml`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimind import MiniMindError
from minimind.chat import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, chat_format, with_thinking_default
from minimind.train.pretrain import PretrainStage, token_loss
from minimind.train.stage import real_lengths, target_tokens


class RowsWithLoss:
    """The rows of a packed SFT set that carry loss. A conversation cut off by seq_len before its first
    assistant token would cost a forward and backward pass and teach nothing."""

    def __init__(self, data) -> None:
        self.data, self.stats = data, data.stats
        self.rows = np.flatnonzero(data.loss_tokens_per_row() > 0)
        self.skipped = len(data) - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.data[int(self.rows[i])]

    def lengths(self) -> np.ndarray:
        return self.data.lengths()[self.rows]


class SFTStage(PretrainStage):
    kind = "sft"
    weight: torch.Tensor | None = None

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        """With tag_loss_weight != 1, the structure tokens (think and tool-call tags) weigh more in the loss,
        as MiniMind's reasoning distillation does, so a small model learns to open and close them reliably."""
        if self.cfg.thinks_by_default not in ("auto", "on", "off"):
            raise MiniMindError(f"thinks_by_default must be auto, on or off, not {self.cfg.thinks_by_default!r}")
        if self.cfg.tag_loss_weight != 1.0:
            self.weight = torch.ones(model.config.vocab_size, device=device)
            for tag in (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE):
                self.weight[self.tokenizer.convert_tokens_to_ids(tag)] = self.cfg.tag_loss_weight

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return token_loss(model, batch, self.weight)

    def dataset(self, path: str):
        data = RowsWithLoss(self.conversations(path))
        if data.skipped:
            self.say(f"{path}: {data.skipped:,} of {len(data.data):,} rows have no assistant token within seq_len "
                     f"{self.cfg.seq_len}; training skips them")
        if path == self.cfg.data:
            self.thinking_share = thinking_share(data, self.tokenizer)
        return data

    def conversations(self, path: str):
        """Every conversation of the file as a row (packed, tokenized; a vision stage's rows carry images)."""
        return super().dataset(path)

    def save(self, model: torch.nn.Module, out: Path, tokenizer) -> Any:
        """The model directory, its chat template saying whether the model thinks when a chat does not say
        (thinks_by_default): a model taught its answers with thinking answers worse without it."""
        choice = self.cfg.thinks_by_default
        on = choice == "on" or (choice == "auto" and getattr(self, "thinking_share", 0.0) > 0.5)
        if chat_format(tokenizer) == "minimind-3" and isinstance(tokenizer.chat_template, str):
            tokenizer.chat_template = with_thinking_default(tokenizer.chat_template, on)
        return super().save(model, out, tokenizer)

    def pack_options(self) -> dict:
        return {"system_prompt_prob": self.cfg.system_prompt_prob,
                "keep_empty_think_prob": self.cfg.keep_empty_think_prob,
                "newline_loss": self.cfg.train_newline_after_eos}

    def flop_shape(self, batch: dict[str, torch.Tensor]) -> tuple[list[int], int]:
        """Padded rows (see real_lengths); the head runs at target positions only (token_loss)."""
        return real_lengths(batch), target_tokens(batch)

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


def thinking_share(data: RowsWithLoss, tokenizer, sample: int = 2000) -> float:
    """The share of training rows whose assistant writes thinking (a non-empty think block), from a fixed
    sample of rows: the estimate is within a few points, at a few milliseconds."""
    if not len(data):
        return 0.0
    open_id, close_id = (tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE))
    rows = np.random.default_rng(0).choice(len(data), size=min(sample, len(data)), replace=False)
    thinking = 0
    for i in rows:
        ids, mask = data[int(i)][:2]  # a vision row carries its images third
        opens = np.flatnonzero((ids == open_id) & (mask > 0))
        closes = np.flatnonzero(ids == close_id)
        for start in opens:
            end = closes[np.searchsorted(closes, start)] if closes.size and closes[-1] > start else len(ids)
            if tokenizer.decode(ids[start + 1:end].tolist()).strip():
                thinking += 1
                break
    return thinking / len(rows)
