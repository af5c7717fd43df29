"""A vision model directory as one transformers loads with no remote code: `Lfm2VlForConditionalGeneration` with
our SigLIP tower and our qwen3 / qwen3_moe / llama / qwen2_moe decoder. `minimind export lfm2-vl --model D --out D`.

Why LFM2-VL and not LLaVA or InternVL (transformers 5.24): our image features are the SigLIP tower's
last_hidden_state (after its post_layernorm) through LayerNorm -> Linear -> GELU -> Linear, placed at the
image-token positions in order. LLaVA's projector has no LayerNorm (Linear -> act -> Linear), which no linear map can
stand in for, and it reads hidden_states[vision_feature_layer], which are before the post_layernorm. InternVL's
projector is ours (with downsample_ratio 1 its pixel shuffle is the identity), but it builds its tower from
InternVLVisionConfig whatever config.json says, a ViT with a class token and layer scale, not SigLIP. LFM2-VL builds
the tower named in config.json (AutoConfig: SiglipVisionModel as is), takes its last_hidden_state, and with
downsample_factor 1 and projector_use_layernorm its projector is exactly ours; its text model is whatever
text_config names. Its forward needs spatial_shapes ([[8, 8]] per image for an 8x8 grid) besides pixel_values, and
LFM2-VL's processor (image tiling, start/end tokens) is not our prompt format: build input_ids with 64
<|image_pad|> per image as we do. CLIP towers are not exportable this way: LFM2-VL keeps the class token we drop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from minimind import MiniMindError
from minimind.checkpoint import load_model
from minimind.config import EXTRA_KEY
from minimind.files import atomic_path
from minimind.vision.model import VisionLanguageModel

PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}  # our vision_proj.mlp.N -> LFM2-VL's names
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def lfm2_vl_name(key: str) -> str:
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    if key.startswith("vision_encoder."):
        return "model.vision_tower." + key.removeprefix("vision_encoder.")
    if key.startswith("vision_proj.mlp."):
        _, _, index, param = key.split(".")
        return f"model.multi_modal_projector.{PROJECTOR[index]}.{param}"
    return key  # lm_head.weight


def lfm2_vl_config(model: VisionLanguageModel, dtype: str) -> dict:
    cfg, vision = model.config, model.vision
    text = cfg.to_hf_dict(dtype)
    text.pop(EXTRA_KEY)
    return {
        "architectures": ["Lfm2VlForConditionalGeneration"],
        "model_type": "lfm2_vl",
        "text_config": text,
        "vision_config": vision.encoder,
        "image_token_id": vision.image_token_id,
        "projector_hidden_act": "gelu",  # exact erf GELU, as nn.GELU()
        "projector_hidden_size": cfg.hidden_size,
        "projector_bias": True,
        "projector_use_layernorm": True,
        "downsample_factor": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype,
        EXTRA_KEY: {"vision": vision.to_dict()},
    }


def export_lfm2_vl(model_dir: str | Path, out: str | Path) -> Path:
    """Write `out`, a transformers directory of the vision model in `model_dir` (weights as stored there)."""
    model_dir = Path(model_dir)
    model = load_model(model_dir, dtype=None)
    if not isinstance(model, VisionLanguageModel):
        raise MiniMindError(f"{model_dir}: not a vision model (config.json has no {EXTRA_KEY}.vision); a language "
                            "model directory is already a transformers directory")
    if model.vision.kind != "siglip_vision_model":
        raise MiniMindError(f"{model_dir}: a {model.vision.kind} tower cannot be exported: LFM2-VL would keep the "
                            "class token that we drop (only SigLIP towers export exactly)")
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    state = {lfm2_vl_name(k): v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(lfm2_vl_config(model, dtype), indent=2) + "\n")
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in COPIED:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
    return Path(out)
