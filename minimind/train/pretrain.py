"""Pretraining: next-token prediction on packed rows of raw text. Also the base of every language-model
stage (SFT only changes the data). `minimind train pretrain --config configs/tiny_pretrain.toml`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from minimind.data.pack import pack
from minimind.logprobs import cross_entropy_sum
from minimind.train.stage import Stage, target_tokens


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], weight: torch.Tensor | None = None):
    """Sum of next-token cross-entropies over the positions whose label is not -100, their count, and the
    MoE load-balancing loss when the model has one. `weight` (one per vocabulary id) scales the loss of
    chosen target tokens."""
    labels = batch["labels"][:, 1:]
    target = labels != -100
    # Position t predicts label t + 1: the output head runs only where that label is a target.
    # A vision batch's images (see data.vision.collate_vision) go to a VisionLanguageModel.
    images = {k: batch[k] for k in ("pixel_values", "image_counts") if k in batch}
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), logits_mask=F.pad(target, (0, 1)),
                document_ids=batch.get("document_ids"), **images)
    loss = cross_entropy_sum(out.logits, labels[target], weight)
    extra = {"aux_loss": out.aux_loss} if out.aux_loss is not None else {}
    return loss, int(target.sum()), extra


# load_tokenizer holds every tokenizer to <|im_start|> = 1 (MiniMind's bos), so the id needs no tokenizer.
BOS_ID = 1


def document_ids(ids: torch.Tensor, bos: int) -> torch.Tensor:
    """Which document each token of packed rows [B, T] belongs to: the packer starts every document with
    `bos`, so a new one begins at each (a literal <|im_start|> inside a text, which the tokenizer reads as
    that token, starts one too)."""
    return (ids == bos).cumsum(-1)


class PretrainStage(Stage):
    kind = "pretrain"


    def dataset(self, path: str):
        return pack(path, self.tokenizer, self.kind, self.cfg.seq_len, cache_dir=self.cfg.cache_dir or None,
                    workers=self.cfg.workers or None,
                    skip_bad=self.cfg.skip_bad, progress=self.cfg.progress, seed=self.cfg.seed,
                    **self.pack_options())

    def pack_options(self) -> dict:
        return {}

    def collate(self, rows: list[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        batch = {"input_ids": ids, "labels": ids}  # packed rows are full: every position is a target
        # (SFT's collate has no such split: its row is one conversation, whose turns each open with a bos.)
        if self.cfg.doc_mask:
            batch["document_ids"] = document_ids(ids, BOS_ID)
        return batch

    loss = staticmethod(token_loss)

    def flop_shape(self, batch: dict[str, torch.Tensor]) -> tuple[list[int], int]:
        """Packed rows are full; token_loss runs the output head at target positions only."""
        ids = batch["input_ids"]
        return [ids.shape[1]] * ids.shape[0], target_tokens(batch)
