"""Vision towers: transformers' SigLIP / SigLIP2 (fixed resolution) / CLIP vision models, built from a config
or read from a local directory, and their patch features. `load_tower("siglip-dir/")` -> (VisionConfig, tower)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from minimind import MiniMindError
from minimind.vision.config import TOWERS, VisionConfig


def _classes(kind: str) -> tuple[type, type]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    return {"siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
            "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel)}[kind]


def build_tower(vision: VisionConfig) -> nn.Module:
    """A tower with fresh weights for `vision.encoder` (on the current default device, meta included)."""
    config_cls, model_cls = _classes(vision.kind)
    config = config_cls.from_dict(vision.encoder)
    config._attn_implementation = "sdpa"
    return model_cls(config)


def tower_config(tower: nn.Module) -> dict:
    """The tower's transformers config as config.json will hold it (JSON types: a reloaded config compares equal)."""
    d = tower.config.to_dict()
    for noise in ("transformers_version", "id2label", "label2id"):  # label maps are for classifier heads
        d.pop(noise, None)
    return json.loads(json.dumps(d))


def load_tower(directory: str | Path) -> tuple[VisionConfig, nn.Module]:
    """A pretrained tower from a transformers directory: a vision model (SiglipVisionModel, CLIPVisionModel) or a
    whole SigLIP / CLIP model, whose vision half is taken. SigLIP2's fixed-resolution checkpoints (e.g.
    siglip2-base-patch32-256, MiniMind-V's encoder) are SigLIP models; the NaFlex ones are not supported.
    preprocessor_config.json, when present, gives the normalisation."""
    directory = Path(directory)
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniMindError(f"{path}: cannot read a vision encoder's config ({e})") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    kind = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}.get(kind, kind)
    if kind not in TOWERS:
        hint = " (SigLIP2 NaFlex towers take variable patch grids; use a fixed-resolution one)" \
            if kind and "siglip2" in kind else ""
        raise MiniMindError(f"{path}: model_type {raw.get('model_type')!r} is not a supported vision encoder "
                            f"(siglip, siglip_vision_model, clip, clip_vision_model){hint}")
    _, model_cls = _classes(kind)
    try:
        tower = model_cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as e:
        raise MiniMindError(f"{directory}: cannot load the vision encoder ({str(e).splitlines()[0]})") from None
    norm = {}
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        try:
            p = json.loads(pre.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MiniMindError(f"{pre}: invalid JSON ({e})") from None
        norm = {k: [float(x) for x in p[k]] for k in ("image_mean", "image_std") if isinstance(p.get(k), list)}
    vision = VisionConfig(encoder=tower_config(tower), **norm)
    return vision, tower.eval()


def reset_buffers(tower: nn.Module) -> None:
    """Recompute the tower's non-persistent buffers, which a model built on the meta device lacks. SigLIP's and
    CLIP's only one is `position_ids` (0..n-1); anything else is refused rather than left uninitialised."""
    for name, module in tower.named_modules():
        for key, buf in list(module._buffers.items()):
            if key in module._non_persistent_buffers_set:
                if key != "position_ids" or buf is None:
                    raise MiniMindError(f"vision encoder: cannot rebuild buffer {name}.{key}")
                module._buffers[key] = torch.arange(buf.shape[-1], device=buf.device).expand(1, -1)


def patch_features(tower: nn.Module, kind: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] normalised images -> [N, patches, hidden]: SigLIP's last_hidden_state (after its
    post_layernorm), as MiniMind-V takes it; CLIP's without the class token."""
    out = tower(pixel_values=pixel_values).last_hidden_state
    return out[:, 1:] if kind == "clip_vision_model" else out
