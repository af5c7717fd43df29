"""Model directories (the transformers layout: config.json, model.safetensors, tokenizer files) and resume
states. `save_model(model, "out/", tokenizer)`; `model = load_model("out/")`."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimind import MiniMindError
from minimind.config import ModelConfig
from minimind.device import DTYPES
from minimind.files import atomic_path
from minimind.generation import GENERATION_DEFAULTS
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import save_tokenizer
from minimind.vision.config import VisionConfig, read_vision_config

WEIGHTS = "model.safetensors"


def save_model(model: MiniMindForCausalLM, directory: str | Path, tokenizer: Any = None,
               dtype: str | None = None, generation: dict[str, Any] | None = None) -> Path:
    """Write a model directory that transformers and our loader both read. The directory appears whole
    or not at all. `dtype` converts the weights on the way out (default: as they are)."""
    cfg = model.config
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it; safetensors refuses shared tensors
    if dtype is None:
        dtype = next(k for k, v in DTYPES.items() if v == model.model.embed_tokens.weight.dtype)
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
           **GENERATION_DEFAULTS}
    gen.update(generation or {})
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        vision = getattr(model, "vision", None)  # a VisionLanguageModel's tower and image settings
        cfg.save(tmp, dtype=dtype, extra={"vision": vision.to_dict()} if vision is not None else None)
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return Path(directory)


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a model directory: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    directory = Path(directory)
    single, index = directory / WEIGHTS, directory / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(directory / shard))
            return state
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise MiniMindError(f"{single if single.is_file() else index}: cannot read weights ({e})") from None
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise MiniMindError(f"{directory}: no weights found (expected {WEIGHTS})")


def our_name(key: str) -> str:
    """One key as we spell it: no `module.` or `_orig_mod.` prefix, and under `model.` unless it is lm_head or a
    vision model's tower or projector."""
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key if key.startswith(("model.", "lm_head.", "vision_encoder.", "vision_proj.")) else "model." + key


def layer_count(keys: Iterable[str], source: str) -> int:
    """How many decoder layers the weights hold, read off their `model.layers.N.` keys. N must be a number and
    the layers 0..count-1 all present, so that no model is ever built for a stray index like 100000000."""
    found: set[int] = set()
    for key in keys:
        name = our_name(key)
        if name.startswith("model.layers."):
            index = name.split(".")[2]
            if not (index.isascii() and index.isdigit()):
                raise MiniMindError(f"{source}: key {key!r}: layer index {index!r} is not a number")
            found.add(int(index))
    if found != set(range(len(found))):
        gap = min(set(range(len(found))) - found)
        raise MiniMindError(f"{source}: the weights' layers are not numbered 0..{len(found) - 1} "
                            f"(no layer {gap}, highest index {max(found)})")
    return len(found)


def to_our_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Accept the spellings others write: fused MoE experts (transformers 5 in memory), a `module.` or
    `_orig_mod.` prefix (DDP, torch.compile), a missing `model.` prefix, and an explicit tied lm_head."""
    out = {our_name(key): value for key, value in state.items()}
    for layer in range(cfg.num_hidden_layers):
        base = f"model.layers.{layer}.mlp.experts."
        fused = out.pop(base + "gate_up_proj", None)
        down = out.pop(base + "down_proj", None)
        if fused is not None and down is not None:
            for e in range(fused.shape[0]):
                gate, up = fused[e].chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"] = gate
                out[f"{base}{e}.up_proj.weight"] = up
                out[f"{base}{e}.down_proj.weight"] = down[e]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def check_weights(model: MiniMindForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Every key and shape of `state` (in our names) against `model` (which may live on the meta device), and
    every value finite, naming what does not fit instead of a torch traceback (or NaN text much later)."""
    expected = {k: v for k, v in model.state_dict().items()
                if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"shape mismatch: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))
    if problems:
        raise MiniMindError(f"{source}: weights do not match config.json: " + "; ".join(problems))
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise MiniMindError(f"{source}: {len(broken)} weight tensors hold NaN or infinite values (e.g. {broken[0]}); "
                            "the file is damaged or the training that wrote it diverged")


def load_weights(model: MiniMindForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load with every key, shape and value checked (check_weights)."""
    state = to_our_names(state, model.config)
    check_weights(model, state, source)
    model.load_state_dict(state, strict=False)


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                     dtype: torch.dtype, vision: VisionConfig | None = None) -> MiniMindForCausalLM:
    """The model for `cfg` holding `state`. The layer count, names and shapes are checked against the weights
    before anything is allocated (the model is first built on the meta device), so a config.json with absurd
    sizes is an error naming the first mismatch, not an out-of-memory or an hour-long hang. With `vision`, a
    VisionLanguageModel (its tower and projector in `state` too)."""
    count = layer_count(state, source)
    if count != cfg.num_hidden_layers:
        lacking = "missing" if count < cfg.num_hidden_layers else "unexpected"
        raise MiniMindError(f"{source}: weights do not match config.json: {abs(count - cfg.num_hidden_layers)} "
                            f"layer(s) {lacking} (e.g. model.layers.{min(count, cfg.num_hidden_layers)}.*; "
                            f"config.json has {cfg.num_hidden_layers}, the weights {count})")
    state = to_our_names(state, cfg)
    with torch.device("meta"):
        if vision is None:
            model = MiniMindForCausalLM(cfg)
        else:
            from minimind.vision.model import VisionLanguageModel

            model = VisionLanguageModel(cfg, vision)
    check_weights(model, state, source)
    model.to_empty(device="cpu")
    model.to(dtype)
    model.model.rotary.reset()  # the RoPE table is computed, not stored: rebuild it off the meta device
    if vision is not None:
        from minimind.vision.encoders import reset_buffers

        reset_buffers(model.vision_encoder)
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.float32, rope_scaling: str | None = None) -> MiniMindForCausalLM:
    """Read a model directory written by us or by transformers (a VisionLanguageModel when config.json has a
    `minimind.vision` section). dtype=None keeps the stored dtype. rope_scaling
    overrides config.json's ("yarn": MiniMind's YaRN, "none": off; see ModelConfig.with_rope_scaling)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MiniMindError(f"{directory}: model directory not found")
    cfg = ModelConfig.load(directory).with_rope_scaling(rope_scaling)
    state = read_state_dict(directory)
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    vision = read_vision_config(directory)
    return model_from_state(cfg, state, str(directory / WEIGHTS), dtype, vision).to(device)


# ---- resume states -------------------------------------------------------------------------------------
# runs/<name>/checkpoints/step_N/ holds what an exact resume needs; checkpoints/latest names the newest
# complete one and is only rewritten after that directory is whole.

LATEST = "latest"


def clean_debris(checkpoints: str | Path) -> None:
    """Remove what a kill in the middle of save_resume leaves behind: atomic_path's hidden temporary
    directories (`.step_N.*`, `.latest.*`), each as large as a checkpoint. Only rank 0 writes here."""
    for pattern in (".step_*", f".{LATEST}.*"):
        for debris in Path(checkpoints).glob(pattern):
            shutil.rmtree(debris, ignore_errors=True)


def save_resume(checkpoints: str | Path, step: int, model: MiniMindForCausalLM, trainer: dict[str, Any],
                state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoints/step_N atomically, then point `latest` at it, then drop all but the last K."""
    checkpoints = Path(checkpoints)
    clean_debris(checkpoints)
    target = checkpoints / f"step_{step}"
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
               if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    with atomic_path(target) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / WEIGHTS)  # full precision: the master weights, not a half-precision copy
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    with atomic_path(checkpoints / LATEST) as tmp:
        tmp.write_text(target.name + "\n")
    for old in step_dirs(checkpoints)[keep_last:] if keep_last > 0 else []:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def step_dirs(checkpoints: str | Path) -> list[Path]:
    """checkpoints/step_N directories, newest first."""
    found = [p for p in Path(checkpoints).glob("step_*") if re.fullmatch(r"step_[0-9]+", p.name)
             and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def latest_resume(checkpoints: str | Path) -> Path | None:
    """The checkpoint `latest` names (None without one). It must name a step_N directory in `checkpoints`: a
    pointer that leads elsewhere (`../../other-run/...`, or a symlinked step_N) is refused."""
    checkpoints = Path(checkpoints)
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    target = checkpoints / name
    if not re.fullmatch(r"step_[0-9]+", name) or (target.exists() and target.resolve().parent != checkpoints.resolve()):
        raise MiniMindError(f"{pointer}: names {name[:80]!r}, not a step_N directory inside {checkpoints}; refusing "
                            "to follow it (correct or delete the file to resume from the newest checkpoint)")
    return target


def load_resume(target: str | Path, model: MiniMindForCausalLM) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model`; return (trainer dict: optimizer and RNG states, state.json). All three files
    are read and checked before the weights go in; any damage is a MiniMindError naming the file."""
    target = Path(target)
    path = target / "state.json"
    try:
        state = json.loads(path.read_text())
        if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ("step", "samples",
                                                                                     "world_size"))):
            raise ValueError("no step, samples and world_size")
        path = target / "trainer.pt"
        trainer = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(trainer, dict) and "optimizer" in trainer and "rng" in trainer):
            raise ValueError("no optimizer and RNG states")
        path = target / WEIGHTS
        weights = load_file(path)
    except Exception as e:  # unreadable, truncated or garbled: each is one problem with this file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MiniMindError(f"{path}: damaged or incomplete ({first[:200]})") from None
    load_weights(model, weights, str(target / WEIGHTS))
    return trainer, state


def load_newest_resume(checkpoints: str | Path, model: MiniMindForCausalLM,
                       warn: Callable[[str], None]) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """load_resume from the checkpoint `latest` names or, when that one is missing or damaged (a kill, a full
    disk), from the newest other one that is intact, with a warning naming what was wrong. None when there is
    no checkpoint at all; a MiniMindError listing the problems when none is intact."""
    latest = latest_resume(checkpoints)
    candidates = ([latest] if latest else []) + [p for p in step_dirs(checkpoints) if p != latest]
    problems = []
    for target in candidates:
        try:
            trainer, state = load_resume(target, model)
        except MiniMindError as e:
            problems.append(str(e))
            continue
        if problems:
            warn(f"warning: {'; '.join(problems)}; resuming from {target} instead")
        return target, trainer, state
    if problems:
        raise MiniMindError(f"{checkpoints}: no intact checkpoint to resume from: " + "; ".join(problems))
    return None
