"""Vision-language training, MiniMind-V's two stages on the one loop: vision-pretrain (captions; freeze_llm 2: the
projector only) and vision-sft (questions; freeze_llm 1: the projector and the decoder's first and last layers).
`minimind train vision-pretrain --config configs/minimind-3v_pretrain.toml --init-from LLM_DIR`."""

from __future__ import annotations

import torch

from minimind import MiniMindError
from minimind.data.vision import VisionDataset, collate_vision
from minimind.train.sft import SFTStage
from minimind.vision.model import VisionLanguageModel, set_trainable


class VisionSFTStage(SFTStage):
    """Conversations with images (MiniMind-V's Parquet, or JSONL with image paths), loss on the assistant's
    replies as in SFT. init_from is a language model directory (a new VLM is built around it: the tiny tower,
    or the transformers tower in vision_encoder, and a fresh projector) or a vision model directory."""

    kind = "vision-sft"
    default_freeze = 1  # MiniMind-V's train_sft_vlm.py

    def __init__(self, cfg, tokenizer, dist=None) -> None:
        super().__init__(cfg, tokenizer, dist)
        self.freeze = self.default_freeze if cfg.freeze_llm == -1 else cfg.freeze_llm
        # For MFU: a frozen decoder still back-propagates to its inputs (the image features), but computes no
        # weight gradients outside the layers that train. (The tower's FLOPs are not counted.)
        self.passes = 3 if self.freeze == 0 else 2

    def setup(self, model: torch.nn.Module, device: torch.device) -> VisionLanguageModel:
        super().setup(model, device)
        if isinstance(model, VisionLanguageModel):
            if self.cfg.vision_encoder:
                raise MiniMindError(f"init_from {self.cfg.init_from} is a vision model already (its tower is "
                                    f"{model.vision.kind}); leave vision_encoder empty")
        else:
            model = VisionLanguageModel.from_llm(model, self.cfg.vision_encoder or None, seed=self.cfg.seed)
            self.say(f"vision: a new model around {self.cfg.init_from or 'a fresh language model'}: "
                     f"{self.cfg.vision_encoder or 'the tiny tower (from scratch)'} + a new projector")
        trainable = set_trainable(model, self.freeze, self.cfg.train_encoder)
        tower = sum(p.numel() for p in model.vision_encoder.parameters())
        self.say(f"vision: freeze_llm {self.freeze}, tower {tower:,} parameters "
                 f"({'training' if self.cfg.train_encoder else 'frozen'}); {trainable:,} trainable in all")
        self.vision = model.vision
        return model.to(device)

    def rate_of(self, name: str) -> str:
        """vision_lr (when set) for the tower and projector, which may start from scratch; lr for the decoder."""
        return "vision_lr" if self.cfg.vision_lr and name.startswith(("vision_encoder.", "vision_proj.")) else "lr"

    def conversations(self, path: str) -> VisionDataset:
        data = VisionDataset(path, self.tokenizer, self.cfg.seq_len, self.vision.image_spec(),
                             self.vision.image_tokens, newline_loss=self.cfg.train_newline_after_eos,
                             skip_bad=self.cfg.skip_bad, cache_dir=self.cfg.cache_dir or None)
        if data.image_token_id != self.vision.image_token_id:
            raise MiniMindError(f"{path}: the tokenizer's <|image_pad|> is id {data.image_token_id}, the model's "
                                f"image token id {self.vision.image_token_id}")
        return data

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return collate_vision(rows)


class VisionPretrainStage(VisionSFTStage):
    """The same rows and loss (MiniMind-V's pretrain data is describe-the-image conversations); by default only
    the projector trains (MiniMind-V's train_pretrain_vlm.py)."""

    kind = "vision-pretrain"
    default_freeze = 2
