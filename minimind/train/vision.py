"""Vision-language training, MiniMind-V's two stages on the one loop: vision-pretrain (captions; freeze_llm 2: the
projector only) and vision-sft (questions; freeze_llm 1: the projector and the decoder's first and last layers);
before them, for a tower trained from scratch on the built-in images, vision-tower (the tower alone on scene labels).
`minimind train vision-pretrain --config configs/minimind-3v_pretrain.toml --init-from LLM_DIR`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimind import MiniMindError
from minimind.checkpoint import save_model
from minimind.data.images import NO_LABEL, SCENE_LABELS, SceneDataset
from minimind.data.vision import VisionDataset, collate_vision
from minimind.train.sft import SFTStage
from minimind.train.stage import Stage
from minimind.vision.encoders import patch_features
from minimind.vision.model import VisionLanguageModel, set_trainable


def vision_model(model: torch.nn.Module, cfg, say) -> VisionLanguageModel:
    """init_from's model as a vision model: a vision model as it is, a language model inside a new one (the tiny
    tower, or the transformers tower in vision_encoder, and a fresh projector, from cfg.seed)."""
    if isinstance(model, VisionLanguageModel):
        if cfg.vision_encoder:
            raise MiniMindError(f"init_from {cfg.init_from} is a vision model already (its tower is "
                                f"{model.vision.kind}); leave vision_encoder empty")
        return model
    say(f"vision: a new model around {cfg.init_from or 'a fresh language model'}: "
        f"{cfg.vision_encoder or 'the tiny tower (from scratch)'} + a new projector")
    return VisionLanguageModel.from_llm(model, cfg.vision_encoder or None, seed=cfg.seed)


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
        model = vision_model(model, self.cfg, self.say)
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


class VisionTowerStage(Stage):
    """The tower alone, before vision-pretrain: a linear head per scene label (data.images.SCENE_LABELS: count,
    and each object's shape, colour, size and place) on the mean of its patch features; the loss per image is
    the sum of the cross-entropies of the labels it has. A tower learning from scratch only through the decoder's
    answers learned colour and little else in the vision demo; these direct targets teach it counts, places and
    (more slowly) shapes and sizes within a minute of one CPU thread. Only the tower trains; the saved model
    is the vision model without the heads (its decoder and new projector as they were), for vision-pretrain to go
    on from. Data: the built-in images' Parquet (write_vision_builtin), whose `key` column names each scene.
    One process: the heads run outside the model's forward, which DDP would not see."""

    kind = "vision-tower"

    def setup(self, model: torch.nn.Module, device: torch.device) -> VisionLanguageModel:
        if self.dist.world > 1:
            raise MiniMindError("vision-tower trains on one process (it takes seconds); run it without torchrun")
        model = vision_model(model, self.cfg, self.say)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("vision_encoder.")
        width, dtype = model.vision.feature_size, model.vision_proj.mlp[1].weight.dtype
        self.say(f"vision-tower: {sum(p.numel() for p in model.vision_encoder.parameters()):,} tower parameters "
                 f"with heads for {', '.join(SCENE_LABELS)} (dropped when saved)")
        # Inside the tower's module, so checkpoints name them under `vision_encoder.` as resume expects.
        model.vision_encoder.tower_heads = nn.ModuleDict(
            {k: nn.Linear(width, n) for k, n in SCENE_LABELS.items()}).to(dtype)
        self.vision = model.vision
        return model.to(device)

    def dataset(self, path: str) -> SceneDataset:
        return SceneDataset(path, self.vision.image_spec(), self.vision.image_tokens)

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([p for p, _ in rows]), "labels": torch.stack([y for _, y in rows])}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pixel_values"]) * self.vision.image_tokens

    def flop_shape(self, batch: dict[str, torch.Tensor]) -> tuple[list[int], int]:
        return [], 0  # MFU counts the decoder's FLOPs, and the decoder does not run here

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        tower = model.vision_encoder
        pooled = patch_features(tower, self.vision.kind, batch["pixel_values"].to(tower.dtype)).mean(1)
        total, extras = pooled.new_zeros((), dtype=torch.float32), {}
        for j, (name, head) in enumerate(tower.tower_heads.items()):
            logits, target = head(pooled).float(), batch["labels"][:, j]
            total = total + F.cross_entropy(logits, target, ignore_index=NO_LABEL, reduction="sum")
            has = target != NO_LABEL
            if has.any():  # training accuracy per label, for the log
                extras[f"accuracy_{name}"] = (logits.detach().argmax(-1)[has] == target[has]).float().mean()
        return total, len(pooled), extras

    def save(self, model: torch.nn.Module, out, tokenizer) -> None:
        tower = model.vision_encoder
        heads = tower.tower_heads
        del tower.tower_heads
        try:
            save_model(model, out, tokenizer)
        finally:
            tower.tower_heads = heads
