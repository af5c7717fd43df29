"""VisionConfig: which vision tower a vision-language model has, how its images are normalised and which token
marks their places. Saved in a model directory's config.json under `minimind.vision`; `read_vision_config(dir)`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minimind import MiniMindError
from minimind.config import EXTRA_KEY

IMAGE_TOKEN = "<|image_pad|>"
IMAGE_TOKEN_ID = 12  # <|image_pad|> in MiniMind's tokenizer and ours
IMAGE_TOKENS = 64  # features (and image_pad tokens) per image: an 8x8 patch grid, as MiniMind-V's SigLIP2 gives

# transformers' vision towers we can hold, by model_type. CLIP puts a class token first, which we drop.
TOWERS = ("siglip_vision_model", "clip_vision_model")


@dataclass
class VisionConfig:
    """`encoder` is the tower's transformers config (its `to_dict()`, model_type one of TOWERS). Images are
    RGB, resized to image_size x image_size, scaled to [0, 1], then (x - mean) / std per channel."""

    encoder: dict[str, Any]
    image_token_id: int = IMAGE_TOKEN_ID
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        kind = self.encoder.get("model_type")
        if kind not in TOWERS:
            raise MiniMindError(f"vision encoder model_type {kind!r} is not supported (one of {', '.join(TOWERS)})")
        size, patch = self.encoder.get("image_size"), self.encoder.get("patch_size")
        if not (isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch == 0):
            raise MiniMindError(f"vision encoder: image_size {size!r} must be a multiple of patch_size {patch!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(s > 0 for s in self.image_std):
            raise MiniMindError("vision config: image_mean and image_std need 3 values each (std > 0)")

    @property
    def kind(self) -> str:
        return self.encoder["model_type"]

    @property
    def image_size(self) -> int:
        return self.encoder["image_size"]

    @property
    def image_tokens(self) -> int:
        """Features per image: one per patch (CLIP's class token is dropped)."""
        return (self.encoder["image_size"] // self.encoder["patch_size"]) ** 2

    @property
    def feature_size(self) -> int:
        return self.encoder["hidden_size"]

    def image_spec(self) -> dict[str, Any]:
        """data.vision.preprocess's keyword arguments for this model's images."""
        return {"size": self.image_size, "mean": tuple(self.image_mean), "std": tuple(self.image_std)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> VisionConfig:
        if not isinstance(d, dict) or not isinstance(d.get("encoder"), dict):
            raise MiniMindError(f"{source}: {EXTRA_KEY}.vision must be an object with an `encoder` object")
        try:
            return cls(**d)
        except (MiniMindError, TypeError) as e:
            raise MiniMindError(f"{source}: {EXTRA_KEY}.vision: {e}") from None


def tiny_encoder(image_size: int = 64, patch_size: int = 8, hidden_size: int = 128, layers: int = 2,
                 heads: int = 4) -> dict[str, Any]:
    """The config of a small SigLIP-architecture ViT to train from scratch: 8x8 patches of a 64x64 image give
    IMAGE_TOKENS features. It is an ordinary transformers SiglipVisionModel, so it saves and exports like a
    pretrained tower. No pooling head: only the patch features are used."""
    return dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch_size,
                hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                attention_dropout=0.0, vision_use_head=False)


def read_vision_config(directory: str | Path) -> VisionConfig | None:
    """The VisionConfig of a model directory, None for a text-only model."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniMindError(f"{path}: cannot read ({e})") from None
    vision = (data.get(EXTRA_KEY) or {}).get("vision") if isinstance(data, dict) else None
    return None if vision is None else VisionConfig.from_dict(vision, str(path))
