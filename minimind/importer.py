"""Import weights into our model directory: a transformers directory (Qwen3, Qwen3-MoE, Qwen2-MoE, Llama, or
MiniMind's `model_type: minimind` export) or MiniMind's native `.pth` state dict. `minimind import SRC --out DIR`.
MiniMind-V's `.pth` (the decoder and `vision_proj.*`, without the frozen tower) needs the tower's directory:
`minimind import sft_vlm_768.pth --vision-encoder siglip2-base-p32-256-ve/ --tokenizer DIR --out DIR`.

MiniMind2's MoE adds its shared experts to the routed output ungated (`y + shared(x)`). transformers has no
model type with that and our attention (qwen2_moe always gates its shared expert by sigmoid(w . x); DeepSeek's
ungated one comes with multi-head latent attention), so it becomes qwen2_moe with the gate's weight 0 and the
shared down projection doubled: sigmoid(0) * 2W = W exactly, as halving and doubling are exact in floating point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minimind import MiniMindError
from minimind.config import PRESETS, ModelConfig

if TYPE_CHECKING:  # torch and the model load lazily, so that `minimind --help` stays fast
    import torch

    from minimind.vision.config import VisionConfig

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# Flags of MiniMind's own scripts (--hidden_size, --num_hidden_layers, --use_moe) and a few more, as ModelConfig
# fields: what a `.pth` cannot tell us by itself comes from here or from the preset.
CONFIG_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "use_moe", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "rope_theta", "rms_norm_eps", "max_position_embeddings")


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, loaded with weights_only=True (a pickle never runs code here). Accepts a bare state
    dict or one wrapped as {"model": ...} / {"state_dict": ...} (resume files)."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure is one problem with this file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MiniMindError(f"{path}: cannot read as a weights-only torch state dict ({first})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MiniMindError(f"{path}: expected a state dict (names -> tensors)")
    return dict(obj)


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def infer_config(state: dict[str, torch.Tensor], preset: str | None = None, source: str = "state dict",
                 **overrides: Any) -> ModelConfig:
    """A config for MiniMind's state dict: the preset (default: minimind-3, or the minimind2 family when the
    weights have no q/k-norm), then what the weights show (hidden size, layers, vocab, FFN width, MoE, experts,
    and the heads when q/k-norm gives head_dim), then explicit overrides. Without q/k-norm the number of heads
    cannot be read off the shapes: it comes from the preset or the flags (a wrong shape fails in load_weights).
    `source` names the file in errors."""
    import torch

    from minimind.checkpoint import layer_count

    keys = {_strip(k): v for k, v in state.items()}
    embed = keys.get("model.embed_tokens.weight")
    if embed is None or embed.dim() != 2:
        raise MiniMindError("no model.embed_tokens.weight in the state dict: not MiniMind's key names")
    qk_norm = any(".self_attn.q_norm." in k for k in keys)
    experts = {int(k.split(".")[5]) for k in keys if ".mlp.experts." in k and k.split(".")[5].isdigit()}
    shared = keys.get("model.layers.0.mlp.shared_expert.gate_proj.weight")
    if preset is None:
        preset = ("minimind-3" if qk_norm else "minimind2-moe" if shared is not None
                  else "minimind2-small" if embed.shape[1] == 512 else "minimind2")
    seen: dict[str, Any] = dict(vocab_size=embed.shape[0], hidden_size=embed.shape[1], qk_norm=qk_norm,
                                num_hidden_layers=layer_count(keys, source), use_moe=bool(experts))
    if experts:
        seen["num_experts"] = max(experts) + 1
    layer0 = "model.layers.0."
    if qk_norm:  # head_dim is the q-norm's width, and then the projections give the head counts
        hd = keys[layer0 + "self_attn.q_norm.weight"].shape[0] if layer0 + "self_attn.q_norm.weight" in keys else 0
        q, k = keys.get(layer0 + "self_attn.q_proj.weight"), keys.get(layer0 + "self_attn.k_proj.weight")
        if hd and q is not None and k is not None:
            seen.update(head_dim=hd, num_attention_heads=q.shape[0] // hd, num_key_value_heads=k.shape[0] // hd)
    gate = keys.get(layer0 + "mlp.experts.0.gate_proj.weight" if experts else layer0 + "mlp.gate_proj.weight")
    if gate is not None:
        seen["moe_intermediate_size" if experts else "intermediate_size"] = gate.shape[0]
    if experts:
        seen["shared_expert_intermediate_size"] = 0 if shared is None else shared.shape[0]
    if "lm_head.weight" in keys and not torch.equal(keys["lm_head.weight"], embed):
        seen["tie_word_embeddings"] = False
    fields = {**seen, **{k: v for k, v in overrides.items() if v is not None}}
    if shared is not None:  # MiniMind2's router renormalises the top-k weights only when k > 1
        k = fields.get("num_experts_per_tok") or PRESETS[preset].get("num_experts_per_tok", 1)
        fields.setdefault("norm_topk_prob", k > 1)
    if fields.get("hidden_size") != PRESETS.get(preset, {}).get("hidden_size"):
        # then the preset's head_dim and FFN width do not apply: MiniMind's rules derive them from hidden_size
        fields.setdefault("intermediate_size", None)
        fields.setdefault("head_dim", None)
    return ModelConfig.preset(preset, **fields)


def gate_shared_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiniMind2's ungated shared experts (`mlp.shared_experts.K.*`) as one qwen2_moe shared expert with its
    gate: several experts are one expert of their summed width (SwiGLU is per hidden unit), and the gate's
    weight 0 with the down projection doubled gives exactly the ungated sum (see the module docstring)."""
    import torch

    keys = {_strip(k): v for k, v in state.items()}
    out = {k: v for k, v in keys.items() if ".mlp.shared_experts." not in k}
    layers = sorted({k.split(".mlp.shared_experts.")[0] for k in keys if ".mlp.shared_experts." in k})
    for layer in layers:
        base = f"{layer}.mlp.shared_experts."
        count = len({k[len(base):].split(".")[0] for k in keys if k.startswith(base)})
        parts = {p: [keys[f"{base}{i}.{p}.weight"] for i in range(count)]
                 for p in ("gate_proj", "up_proj", "down_proj")}
        out[f"{layer}.mlp.shared_expert.gate_proj.weight"] = torch.cat(parts["gate_proj"], 0)
        out[f"{layer}.mlp.shared_expert.up_proj.weight"] = torch.cat(parts["up_proj"], 0)
        out[f"{layer}.mlp.shared_expert.down_proj.weight"] = torch.cat(parts["down_proj"], 1) * 2
        down = parts["down_proj"][0]
        out[f"{layer}.mlp.shared_expert_gate.weight"] = torch.zeros(1, down.shape[0], dtype=down.dtype)
    return out


def _minimind_hf_dict(d: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """MiniMind's custom-code export (`model_type: minimind`) as the qwen3 / qwen3_moe / qwen2_moe / llama
    config it equals (`state` with its shared experts already gated)."""
    qk_norm = any(".self_attn.q_norm." in _strip(k) for k in state)
    shared = state.get("model.layers.0.mlp.shared_expert.gate_proj.weight")
    moe = "qwen3_moe" if qk_norm else "qwen2_moe"
    out = {**d, "model_type": moe if d.get("use_moe") else ("qwen3" if qk_norm else "llama")}
    if d.get("use_moe"):
        out.setdefault("num_experts", d.get("n_routed_experts", 4))
        if "aux_loss_alpha" in d:
            out.setdefault("router_aux_loss_coef", d["aux_loss_alpha"])
        if shared is not None:
            out.update(shared_expert_intermediate_size=shared.shape[0], qkv_bias=False,
                       norm_topk_prob=bool(d.get("norm_topk_prob", True)) and out.get("num_experts_per_tok", 2) > 1)
    if d.get("inference_rope_scaling") and not d.get("rope_scaling"):
        out["rope_scaling"] = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                               "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    return out


def _with_tower(state: dict[str, torch.Tensor], directory: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """MiniMind-V saves its weights without the frozen tower (`vision_encoder.*`): add the tower's, from its
    directory, under that prefix. Tower weights the file does hold are kept."""
    from minimind.vision.encoders import load_tower

    vision, tower = load_tower(directory)
    keys = {_strip(k) for k in state}
    extra = {f"vision_encoder.{k}": v for k, v in tower.state_dict().items() if f"vision_encoder.{k}" not in keys}
    if not any(k.startswith("vision_proj.") for k in keys):
        raise MiniMindError("the weights have no vision_proj.* (MiniMind-V's projector): --vision-encoder is for "
                            "MiniMind-V checkpoints")
    return vision, {**state, **extra}


def _find_tokenizer(src: Path, tokenizer: str | Path | None):
    from minimind.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if src.is_dir() and (src / "tokenizer.json").is_file():
        return load_tokenizer(src)
    raise MiniMindError(f"{src}: has no tokenizer.json; give the tokenizer directory with --tokenizer DIR "
                        "(for MiniMind's weights, its model/ folder or the tokenizer of a published model)")


def import_model(src: str | Path, out: str | Path, tokenizer: str | Path | None = None, preset: str | None = None,
                 dtype: str | None = None, rope_scaling: str | None = None,
                 vision_encoder: str | Path | None = None, **overrides: Any) -> Path:
    """Write our model directory at `out` from `src`: a transformers model directory or a MiniMind `.pth`.
    `tokenizer` (a directory) is required when `src` has none; `preset` and `overrides` (ModelConfig fields)
    only apply to `.pth` files. `dtype` (float32, bfloat16, float16) converts; default: as stored.
    `rope_scaling` ("yarn": MiniMind's inference_rope_scaling; "none") sets the RoPE scaling written.
    `vision_encoder` (a transformers SigLIP / CLIP directory) makes a MiniMind-V `.pth` a vision model."""
    import torch

    from minimind.checkpoint import model_from_state, read_state_dict, save_model
    from minimind.device import DTYPES

    src = Path(src)
    if not src.exists():
        raise MiniMindError(f"{src}: not found")
    if dtype is not None and dtype not in DTYPES:
        raise MiniMindError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tok = _find_tokenizer(src, tokenizer)
    if src.is_dir():
        if preset or any(v is not None for v in overrides.values()):
            raise MiniMindError(f"{src}: --preset and shape flags are for .pth files; a directory has config.json")
        path = src / "config.json"
        if not path.is_file():
            raise MiniMindError(f"{path}: not found (is {src} a transformers model directory?)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MiniMindError(f"{path}: invalid JSON ({e})") from None
        state = read_state_dict(src)
        if isinstance(raw, dict) and raw.get("model_type") == "minimind":
            state = gate_shared_experts(state)
            raw = _minimind_hf_dict(raw, state)
        cfg = ModelConfig.from_hf_dict(raw, source=str(path))
        source = str(src)
    else:
        state = gate_shared_experts(read_pth(src))
        source = str(src)
        vision_keys = [k for k in state if _strip(k).startswith(("vision_proj.", "vision_encoder."))]
        if vision_keys and vision_encoder is None:
            raise MiniMindError(f"{src}: holds a vision projector ({vision_keys[0]}): a MiniMind-V checkpoint; give "
                                "its vision encoder's directory with --vision-encoder DIR")
        cfg = infer_config({k: v for k, v in state.items() if k not in vision_keys}, preset, source, **overrides)
    vision = None
    if vision_encoder is not None:
        if src.is_dir():
            raise MiniMindError(f"{src}: --vision-encoder is for MiniMind-V's .pth files")
        vision, state = _with_tower(state, vision_encoder)
    cfg = cfg.with_rope_scaling(rope_scaling)
    stored = next(iter(state.values())).dtype
    if stored not in DTYPES.values():
        stored = torch.float32
    # Built in the dtype asked for: a float32 tower added to a half-precision .pth is not rounded on the way.
    model = model_from_state(cfg, state, source, DTYPES[dtype] if dtype else stored, vision)
    if len(tok) > cfg.vocab_size:
        raise MiniMindError(f"{source}: the tokenizer has {len(tok)} tokens but the weights only {cfg.vocab_size}")
    return save_model(model, out, tok, dtype=dtype)
